"""What runs inside vLLM: refine's engine plugin. Imports neither FastAPI nor the proxy's policies.

- `entry.py`: the entry points vLLM loads (the general plugin and the logits processor for both runners).
- `admission.py`: checks at request admission (signature, parameters, caps, what the engine supports).
- `tap.py`: the model's final hidden states for each step.
- `v1_processor.py`, `v2_processor.py`: SRGen and the token-statistics sensor behind each model runner's
  logits-processor interface.
- `corrector.py`: one SRGen step over a batch, runner-independent; `sequences.py`: its state per sequence.
- `srgen.py`: SRGen's monitor and reflection (its parameters and caps are in `contract/params.py`).
- `sensor.py`: the token-statistics sensor (per-token entropy, varentropy, margin, sampled-token probability), runner-
  independent; `sampler_hook.py`: the tokens the sampler drew, in the same step; `stats_writer.py`: its
  records to the proxy, off the sampler's path.
- `events.py`: events to the proxy, written off the sampler's path.
The contract with the proxy (signed arguments, the handshake, events, parameters, the statistics file) is
`refine_server.contract` (`contract/`), which imports neither torch nor vLLM.
"""
