"""What runs inside vLLM: refine's engine plugin. Imports neither FastAPI nor the proxy's policies.

- `entry.py`: the entry points vLLM loads (the general plugin and the logits processor for both runners).
- `admission.py`: checks at request admission (signature, parameters, caps, what the engine supports).
- `tap.py`: the model's final hidden states for each step.
- `v1_processor.py`, `v2_processor.py`: SRGen and the token-statistics sensor behind each model runner's
  logits-processor interface.
- `corrector.py`: one SRGen step over a batch, runner-independent; `sequences.py`: its state per sequence.
- `srgen.py`: SRGen's monitor and reflection; `srgen_params.py`: its parameters and caps.
- `token_stats.py`: the sensor (per-token entropy, varentropy, margin, sampled-token probability), runner-
  independent; `sampler_hook.py`: the tokens the sampler drew, in the same step; `stats_writer.py`: its
  records to the proxy, off the sampler's path.
- `events.py`: events to the proxy, written off the sampler's path.
- `protocol.py`, `params.py`, `stats_file.py`: the contract with the proxy (importable without torch or vLLM).
"""
