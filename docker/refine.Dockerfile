# refine as a proxy in front of an external vLLM: no engine; CPU torch only for RAIN's sentence embedder.
FROM python:3.11-slim
COPY pyproject.toml README.md /opt/refine/
COPY refine_server /opt/refine/refine_server
COPY contract /opt/refine/contract
COPY policies /opt/refine/policies
COPY engine_plugin /opt/refine/engine_plugin
COPY kernels /opt/refine/kernels
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu "/opt/refine[rain]"
EXPOSE 8000
ENTRYPOINT ["refine", "--host", "0.0.0.0", "--port", "8000"]
