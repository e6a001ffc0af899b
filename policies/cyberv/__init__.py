"""CyberV as a policy, one concept a module.

- `policy.py`: the control loop (round 1, the gate, the feedback round), streaming and the trace;
- `params.py`: its parameters and the server's caps;
- `question.py`: the question read from the client's request, and the prompts built around it;
- `sensor.py`: the sensor's signals per candidate and the gate's decision, as pure functions;
- `stopping.py`: when the adaptive round 1 may stop (certain, or forecast), as pure functions;
- `prompts/`: the direct, reasoning, final-answer and feedback prompts.
"""

from refine_server.policies.cyberv.policy import CyberVPolicy

__all__ = ["CyberVPolicy"]
