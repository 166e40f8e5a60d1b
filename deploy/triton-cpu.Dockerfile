# syntax=docker/dockerfile:1
# Triton for machines without a GPU: NVIDIA's image plus what the CPU model repository's
# Python backend imports (model_repository/cpu runs the ONNX model with onnxruntime).
# numpy stays below 2: the Python backend stub returns empty outputs with numpy 2.
# Built by docker-compose when TRITON_DEVICE=cpu; nothing is installed at container start.
ARG TRITON_VERSION=24.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3
RUN python3 -m pip install --no-cache-dir "numpy>=1.26,<2" "onnxruntime>=1.18,<1.21"
# The unprivileged user NVIDIA's image creates; its uid is the image's business.
# hadolint ignore=DL3066
USER triton-server
