# refine as a proxy in front of an external vLLM: no engine, no torch.
FROM python:3.11-slim
COPY pyproject.toml README.md /opt/refine/
COPY refine_server /opt/refine/refine_server
COPY policies /opt/refine/policies
COPY kernels /opt/refine/kernels
RUN pip install --no-cache-dir /opt/refine
EXPOSE 8000
ENTRYPOINT ["refine", "--host", "0.0.0.0", "--port", "8000"]
