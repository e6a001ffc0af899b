"""policies.rain (policy, params) and rain.embeddings: the parameters, the server's caps on the budgets, and the
embedder's torch threads. tests/engine/test_rain.py runs the policy on the real model."""

from __future__ import annotations

import numpy as np
import pytest

from refine_server.policies import LimitExceeded, PolicyRegistry
from refine_server.policies.rain.embeddings import _encode
from refine_server.policies.rain.policy import RainParams, RainPolicy


def test_params_follow_the_criterion_and_refuse_inconsistent_settings() -> None:
    assert RainParams().early_stop_visits == 6
    assert RainParams(criterion="truthful").early_stop_visits == 16
    with pytest.raises(ValueError, match="needs `question`"):
        RainParams(criterion="custom")
    with pytest.raises(ValueError, match="only used with criterion 'custom'"):
        RainParams(question="Is it short?")
    with pytest.raises(ValueError, match="exceeds max_iterations_per_commit"):
        RainParams(max_iterations_per_commit=5, min_iterations_per_commit=15)
    with pytest.raises(ValueError):
        RainParams(unknown=1)


def test_server_caps_apply_to_the_budgets() -> None:
    registry = PolicyRegistry([RainPolicy], {"rain": {"max_engine_calls": 100}})
    with pytest.raises(LimitExceeded):
        registry.resolve("rain", {"max_engine_calls": 101})
    with pytest.raises(LimitExceeded):
        registry.resolve("rain", {"max_iterations_per_commit": 1000})


def test_the_embedder_narrows_torch_threads_only_while_it_encodes() -> None:
    """The server process's torch setting is the embedder's only while it encodes (a shared machine)."""
    import torch

    seen = []

    class Model:
        def encode(self, texts, **_):
            seen.append(torch.get_num_threads())
            return np.zeros((len(texts), 3))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _encode(Model(), ["a"])
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


async def test_a_model_folder_this_machine_cannot_read_falls_back_to_the_engines_tokenizer(tmp_path) -> None:
    from refine_server.policies.rain.engine_calls import load_local_tokenizer

    assert await load_local_tokenizer(None) is None
    assert await load_local_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub name, not a folder
    assert await load_local_tokenizer(str(tmp_path)) is None  # a folder without tokenizer files


async def test_a_readable_model_folder_gives_its_tokenizer_and_every_id_vllm_ends_an_answer_at(tmp_path) -> None:
    """vLLM stops at the tokenizer's end-of-sequence id and at every id of the generation config's: RAIN's drawn
    sets (set_drawing.py) end a sample at the same ids."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from refine_server.policies.rain.engine_calls import load_local_tokenizer

    raw = RawTokenizer(WordLevel({"<unk>": 0, "<end>": 1, "<turn>": 2, "hello": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<end>", unk_token="<unk>").save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[1, 2]).save_pretrained(tmp_path)
    local = await load_local_tokenizer(str(tmp_path))
    assert local is not None and local.tokenizer.encode("hello", add_special_tokens=False) == [3]
    assert local.end_ids == {1, 2}
    (tmp_path / "generation_config.json").unlink()
    assert (await load_local_tokenizer(str(tmp_path))).end_ids == {1}
