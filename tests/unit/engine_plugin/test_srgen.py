"""engine_plugin.srgen: the entropy monitor and its threshold."""

from __future__ import annotations

import pytest

from refine_server.contract.params import SRGenParams
from refine_server.engine_plugin.srgen import EntropyMonitor


def test_monitor_uses_the_fixed_threshold_until_the_window_fills() -> None:
    monitor = EntropyMonitor(SRGenParams(window=3, warmup_threshold=2.0, max_corrections=5))
    assert monitor.observe(2.5) == (True, 2.0)
    assert monitor.observe(1.0) == (False, 2.0)
    assert monitor.observe(1.0) == (False, 2.0)


def test_monitor_dynamic_threshold_uses_the_sample_standard_deviation() -> None:
    params = SRGenParams(window=4, k=2.0, min_std=0.5, min_threshold=1.8, max_corrections=1)
    monitor = EntropyMonitor(params, history=[1.0, 1.0, 1.0, 1.0])
    fired, tau = monitor.observe(2.5)
    assert tau == pytest.approx(1.0 + 2.0 * 0.5)  # std 0 -> min_std
    assert fired
    # The window now holds [1, 1, 1, 2.5]: mean 1.375, sample std (N-1, as torch.std) 0.75; budget spent.
    fired, tau = monitor.observe(9.0)
    assert tau == pytest.approx(1.375 + 2 * 0.75)
    assert not fired


def test_monitor_floor() -> None:
    monitor = EntropyMonitor(SRGenParams(window=2, k=0.0, min_std=0.0, min_threshold=1.8), history=[0.1, 0.1])
    assert monitor.observe(1.0) == (False, 1.8)
