"""The contract between the proxy and refine's engine plugin, importable without torch or vLLM."""

# `vllm_xargs` key that names the in-engine policy a request wants.
POLICY_ARG = "refine_policy"

# The plugin rejects an unknown in-engine policy with a message that starts with this marker and its
# version; a vLLM without the plugin ignores the argument and generates. That difference is the handshake.
PLUGIN_MARKER = "refine engine plugin"
HANDSHAKE_POLICY = "__handshake__"
