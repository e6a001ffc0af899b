# A GPU vLLM server with refine's engine plugin installed: vLLM finds it through the
# `vllm.logits_processors` entry point, so nothing else changes in how the server is started.
FROM vllm/vllm-openai:v0.33.0
COPY pyproject.toml README.md /opt/refine/
COPY refine_server /opt/refine/refine_server
COPY policies /opt/refine/policies
COPY kernels /opt/refine/kernels
# --no-deps: the image already has vLLM, torch and the server libraries refine needs.
RUN pip install --no-cache-dir --no-deps /opt/refine
