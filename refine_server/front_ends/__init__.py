"""The APIs refine answers generation requests in, each a front end over the same policies.

- `base.py`: what a front end is; OpenAI's chat completions and completions, the policies' own shapes;
- `responses.py`: OpenAI's Responses API;
- `messages.py`: Anthropic's Messages API.
"""

from refine_server.front_ends.base import FrontEnd
from refine_server.front_ends.messages import MessagesFrontEnd
from refine_server.front_ends.responses import ResponsesFrontEnd
from refine_server.policies.request import Endpoint

FRONT_ENDS: dict[Endpoint, FrontEnd] = {
    "chat": FrontEnd("chat"),
    "completions": FrontEnd("completions"),
    "responses": ResponsesFrontEnd(),
    "messages": MessagesFrontEnd(),
}

__all__ = ["FRONT_ENDS", "FrontEnd"]
