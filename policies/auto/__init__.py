"""`auto`: the plain answer where the model is sure, a correcting policy where it is not."""

from refine_server.policies.auto.policy import AutoPolicy

__all__ = ["AutoPolicy"]
