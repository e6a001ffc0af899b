"""tap: the forward pass's capture, read to the host once per step."""

from __future__ import annotations

import torch

from refine_server.engine_plugin.tap import ForwardCapture


def test_forward_capture_maps_batch_rows_to_their_tokens_and_first_positions() -> None:
    """Read to the host once per step: a decode row (one token at position 9) then a prefill chunk (4 tokens)."""
    capture = ForwardCapture(
        hidden=torch.randn(5, 4), positions=torch.tensor([9, 0, 1, 2, 3]), query_start_loc=torch.tensor([0, 1, 5])
    )
    assert capture.host_rows == [(0, 1, 9), (1, 5, 0)]
