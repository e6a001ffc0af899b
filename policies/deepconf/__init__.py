"""DeepConf ("Deep Think with Confidence", arXiv 2508.15260) online, as a policy, one concept a module.

- `policy.py`: the loop (warmup, threshold, stopped batches, weighted vote, consensus stop), streaming, trace;
- `params.py`: its parameters and the server's caps;
- `streamed.py`: the stop without refine's plugin (the proxy reads `top_logprobs` and aborts the stream).

The measures themselves (token and group confidence, threshold, weighted vote) are `policies/confidence.py`.
"""

from refine_server.policies.deepconf.policy import DeepConfPolicy

__all__ = ["DeepConfPolicy"]
