# syntax=docker/dockerfile:1.7
# HeadCT-Serve engine-build image: NVIDIA's Triton image + the `export` package + TensorRT's Python
# bindings of exactly the TensorRT version that this Triton serves engines with. The Helm chart runs
# `python -m export build-engine` from it in the Triton pod's init container, on the serving GPU.
# Build it FROM the same Triton tag as the chart's triton.image (an engine only loads in the TensorRT
# version that built it; the chart's serve step checks and falls back to ONNX Runtime otherwise):
#   docker build -f docker/engine-build.Dockerfile \
#     --build-arg TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-py3 \
#     -t ghcr.io/headct-serve/engine-build:0.1.0-triton26.07-py3 .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-py3
# checkov:skip=CKV_DOCKER_7: the base image is an ARG whose default is a pinned version tag (never latest)
FROM ${TRITON_IMAGE}

USER 0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# TensorRT version of this image: $TRT_VERSION (NGC) or the libnvinfer.so.X.Y.Z on disk; CUDA major
# from $CUDA_VERSION. The wheel pin is that exact version (any build number). Wheel names differ by
# TensorRT major: 10.x is `tensorrt-cu<CUDA major>` (pypi.org); 8.6 (Triton 24.01-24.04) is `tensorrt`,
# whose libs/bindings wheels come from pypi.nvidia.com. TensorRT < 8.6 is refused (export.tensorrt_build
# refuses it too). numpy (the parity gate reads model.reference.npz) is added only if the image lacks it.
RUN trt="${TRT_VERSION:-}"; \
    if [ -z "$trt" ]; then \
      lib="$(find /usr/lib /usr/local -name 'libnvinfer.so.*.*.*' -print -quit 2>/dev/null)"; \
      trt="${lib##*libnvinfer.so.}"; \
    fi; \
    test -n "$trt" || { echo "cannot tell this image's TensorRT version" >&2; exit 1; }; \
    cuda="${CUDA_VERSION%%.*}"; \
    test -n "$cuda" || { echo "CUDA_VERSION is not set" >&2; exit 1; }; \
    trt3="$(echo "$trt" | cut -d. -f1-3)"; \
    major="${trt3%%.*}"; minor="$(echo "$trt3" | cut -d. -f2)"; \
    if [ "$major" -ge 10 ]; then \
      python3 -m pip install --no-cache-dir --target /opt/headct/site "tensorrt-cu${cuda}==${trt3}.*"; \
    elif { [ "$major" -eq 8 ] && [ "$minor" -ge 6 ]; } || [ "$major" -eq 9 ]; then \
      python3 -m pip install --no-cache-dir --target /opt/headct/site \
        --extra-index-url https://pypi.nvidia.com "tensorrt==${trt3}.*"; \
    else \
      echo "TensorRT $trt is older than 8.6: not supported (use a Triton 24.01 or later image)" >&2; exit 1; \
    fi; \
    PYTHONPATH=/opt/headct/site python3 -c "import tensorrt, sys; v = tensorrt.__version__; print('tensorrt', v); sys.exit(0 if v.startswith('$trt3') else 'TensorRT mismatch: ' + v)"; \
    PYTHONPATH=/opt/headct/site python3 -c "import numpy" 2>/dev/null \
      || python3 -m pip install --no-cache-dir --target /opt/headct/site "numpy==1.26.4"
# Only what `python -m export build-engine` imports (no torch: the export CLI loads it lazily).
COPY export/ /opt/headct/src/export/
COPY headct/ /opt/headct/src/headct/
ENV PYTHONPATH=/opt/headct/src:/opt/headct/site
RUN python3 -m export build-engine --help > /dev/null \
    && python3 -m compileall -q /opt/headct
LABEL org.opencontainers.image.title="headct-engine-build" \
      org.opencontainers.image.description="NVIDIA Triton + HeadCT export: builds TensorRT engines on the serving GPU" \
      org.opencontainers.image.source="https://github.com/headct-serve/headct-serve"
# triton-server, the NGC image's unprivileged user.
USER 1000:1000
HEALTHCHECK NONE
