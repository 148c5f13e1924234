# syntax=docker/dockerfile:1.7
# HeadCT-Serve gateway: FastAPI/uvicorn, numpy/scipy preprocessing, Triton gRPC client.
# Slim, non-root (uid 10001), no torch, no Triton server, no ONNX Runtime. Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t ghcr.io/headct-serve/gateway:0.1.0 .
# Pin PYTHON_IMAGE by digest in CI (python:3.11.x-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Versions come from pyproject.toml, the project's single place for pins.
COPY pyproject.toml ./
COPY docker/gateway_requirements.py docker/
RUN python docker/gateway_requirements.py pyproject.toml > /tmp/requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY api/ /app/api/
COPY headct/ /app/headct/
WORKDIR /app
# The gRPC modules (api/grpc/proto/**/*_pb2*.py) are generated, never committed, and kept out of the build
# context (gateway.Dockerfile.dockerignore), so a clean clone builds and a dev checkout cannot ship stale
# ones. Generate them from the .proto with `make setup`'s command and the grpcio-tools just installed from
# pyproject.toml's pin (its bundled protoc decides the generated code).
RUN /opt/venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
        api/grpc/proto/headct/v1/headct.proto
# Fail the build if the app does not import, or drags in torch / the Triton server.
RUN /opt/venv/bin/python -c "import sys, api.main; bad = {'torch', 'pytriton', 'onnxruntime'} & set(sys.modules); sys.exit(f'gateway imports {bad}' if bad else 0)" \
    && /opt/venv/bin/python -m compileall -q /app /opt/venv/lib

# checkov:skip=CKV_DOCKER_7: the base image is an ARG whose default is a pinned version tag (never latest)
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="headct-gateway" \
      org.opencontainers.image.description="HeadCT-Serve API gateway (FastAPI) in front of Triton" \
      org.opencontainers.image.source="https://github.com/headct-serve/headct-serve" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 headct \
    && useradd --system --uid 10001 --gid headct --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin headct
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HEADCT_HOST=0.0.0.0 \
    HEADCT_PORT=8080
WORKDIR /app
USER 10001:10001
EXPOSE 8080 50051
# For `docker run`; Kubernetes uses the chart's probes instead.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('HEADCT_PORT', '8080'), timeout=2)"]
# SIGTERM goes straight to the server (exec form, no shell): it drains in-flight requests and exits.
ENTRYPOINT ["python", "-m", "api"]
