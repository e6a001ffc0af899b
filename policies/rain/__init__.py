"""RAIN as a policy, one concept a module.

- `policy.py`: the policy (the client's request, budgets, streaming each committed set, the response, the trace);
- `params.py`: its parameters and the server's caps;
- `search.py`: the search (select, expand, evaluate, back up, commit), the self-evaluation and the judge guard;
- `tree.py`: the search tree's bookkeeping (no engine calls);
- `engine_calls.py`: every engine call the search makes, and the served model's tokenizer;
- `set_drawing.py`: a level's token sets drawn together from one streamed greedy path;
- `embeddings.py`: the sentence embedder of the similarity update;
- `prompts/`: the self-evaluation prompts, one file per criterion.
"""

from refine_server.policies.rain.policy import RainPolicy

__all__ = ["RainPolicy"]
