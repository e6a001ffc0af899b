"""The contract between the proxy (refine_server, policies) and refine's engine plugin inside vLLM.

Both sides import this package and nothing of each other, and it imports neither torch, vLLM nor FastAPI:
- `protocol.py`: the signed `vllm_xargs` a request carries, the handshake and its reply, the event files, the
  environment variables the engine reads, and `PROTOCOL_VERSION`, bumped whenever any of this changes meaning;
- `params.py`: the parameter and cap models every policy uses, and SRGen's, which the plugin validates again;
- `token_stats_file.py`: the binary per-token statistics file the engine's sensor writes and the proxy reads.
"""

from refine_server.contract.protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
