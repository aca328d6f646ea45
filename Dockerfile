# syntax=docker/dockerfile:1
# Stage 1: export the default engine (untrained unless weights are supplied) with the trainer extra.
FROM python:3.11-slim AS engine
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY model_repo ./model_repo
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[train]' \
 && cxr-triage export densenet121-nih14

# Stage 2: the serving image: no torch, no compiler.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 cxr
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
# hadolint ignore=DL3013
RUN pip install --no-cache-dir .
COPY --from=engine --chown=cxr:cxr /src/model_repo ./model_repo
USER 10001
# 0.0.0.0 needs CXR_API_KEYS (or CXR_BEHIND_AUTH_PROXY=true) at run time: the service refuses
# to listen beyond loopback without authentication.
ENV CXR_HOST=0.0.0.0 \
    CXR_PORT=8000 \
    CXR_MODEL_REPO=/app/model_repo \
    CXR_METRICS_DIR=/tmp/cxr-metrics
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"]
ENTRYPOINT ["cxr-triage", "serve"]
