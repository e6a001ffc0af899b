"""What `--model` names: a bundled model, by name, or a local Hugging Face folder, by path.

Anything else stops refine at start. Handed to vLLM, an unknown name would be looked up on the model hub, fail,
and be restarted with backoff forever while /ready said "vLLM is starting".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refine_server.models.catalog import BUNDLED, BundledModel


class UnknownModel(ValueError):
    """`--model` is neither a bundled model's name nor a folder."""


@dataclass(frozen=True)
class ModelChoice:
    bundled: BundledModel | None  # provisioned into the cache before the engine's first start
    folder: Path | None  # a Hugging Face folder served as it is

    @property
    def name(self) -> str:
        """The model id clients send unless --served-model-name says otherwise."""
        return self.bundled.name if self.bundled else self.folder.name  # type: ignore[union-attr]


def resolve_model(value: str) -> ModelChoice:
    """A bundled model's name wins over a folder of the same name (give such a folder as ./NAME)."""
    if value in BUNDLED:
        return ModelChoice(BUNDLED[value], None)
    folder = Path(value).expanduser()
    if folder.is_dir():
        return ModelChoice(None, folder)
    raise UnknownModel(
        f"--model {value!r} is neither a bundled model nor a model folder; the bundled models are: "
        f"{', '.join(BUNDLED)} (or give the path of a local Hugging Face model folder)"
    )
