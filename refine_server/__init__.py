"""refine: an OpenAI-compatible server in front of vLLM with per-request self-correction policies."""
