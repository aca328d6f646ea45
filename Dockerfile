# syntax=docker/dockerfile:1
# CPU image (default):  docker build -t cxr-triage .
# GPU image (CUDA):     docker build --build-arg RUNTIME=gpu -t cxr-triage:gpu .
ARG RUNTIME=cpu

# Stage 1: export the default engine (untrained unless weights are supplied) with the trainer extra.
FROM python:3.11-slim AS engine
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY model_repo ./model_repo
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[train]' \
 && cxr-triage export densenet121-nih14

# Runtime bases: a slim CPython for CPU, NVIDIA's CUDA + cuDNN runtime for GPU.
FROM python:3.11-slim AS base-cpu
ENV ORT_PACKAGE=onnxruntime

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS base-gpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3
ENV ORT_PACKAGE=onnxruntime-gpu

# Stage 2: the serving image: no torch, no compiler. onnxruntime and onnxruntime-gpu provide
# the same module, so the GPU image swaps one for the other.
# hadolint ignore=DL3006
FROM base-${RUNTIME}
RUN useradd --create-home --uid 10001 cxr
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir . \
 && if [ "$ORT_PACKAGE" != onnxruntime ]; then \
      python3 -m pip uninstall -y onnxruntime && python3 -m pip install --no-cache-dir "$ORT_PACKAGE"; \
    fi
COPY --from=engine --chown=10001:10001 /src/model_repo ./model_repo
USER 10001
# 0.0.0.0 needs CXR_API_KEYS (or CXR_BEHIND_AUTH_PROXY=true) at run time: the service refuses
# to listen beyond loopback without authentication.
ENV CXR_HOST=0.0.0.0 \
    CXR_PORT=8000 \
    CXR_MODEL_REPO=/app/model_repo \
    CXR_DATA_DIR=/home/cxr/data \
    CXR_METRICS_DIR=/tmp/cxr-metrics
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"]
ENTRYPOINT ["cxr-triage", "serve"]
