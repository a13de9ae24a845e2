# syntax=docker/dockerfile:1
# dmae-certify images. Two targets from one source tree:
#   docker build --target api    -t dmae-certify-api .     # FastAPI + migrations, CPU torch
#   docker build --target worker -t dmae-certify-worker .  # Celery GPU worker, CUDA 13.0
# Both install the project with `pip install .` and start it with the `dmae-certify` console
# script, exactly as CI and `make run` do. See docs/DEPLOYMENT.md.

# One set of versions: these must equal the torch/torchvision pins in pyproject.toml
# (tests/test_deployment.py checks it).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# ---------------------------------------------------------------------------------------------
# api: python:3.11 (the project requires 3.11) with the CPU build of the pinned torch. The API
# only converts uploads and enqueues jobs; certification runs on the workers, so it needs no
# CUDA and stays ~3 GB smaller than the worker.
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS api
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && python -m pip install --upgrade pip \
 && python -m pip install --index-url https://download.pytorch.org/whl/cpu \
      "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY . .
# torch==X is satisfied by the X+cpu build above, so this installs the rest and keeps CPU torch.
RUN python -m pip install . \
 && useradd --system --user-group --uid 10001 --create-home --home-dir /home/dmae dmae \
 && mkdir -p /data /checkpoints /datasets \
 && chown dmae:dmae /data /checkpoints /datasets
WORKDIR /home/dmae
ENV DMAE_DATA_DIR=/data \
    DMAE_CHECKPOINT_DIR=/checkpoints \
    DMAE_DATASET_DIR=/datasets
USER dmae
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["dmae-certify", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# worker: CUDA 13.0 base, because torch 2.14.1 on PyPI is the cu130 build (it requires
# cuda-toolkit==13.0.*). The `base` flavour is enough: that wheel brings its own cuBLAS/cuDNN
# /NCCL as nvidia-* wheels, so the `runtime`/`cudnn-runtime` flavours would only add a second,
# unused copy (~3 GB). What the base image does provide is the NVIDIA container contract:
# NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES, and NVIDIA_REQUIRE_CUDA=cuda>=13.0, so a host
# whose driver is too old for CUDA 13 (< 580) fails at `docker run` with a clear message instead
# of torch silently falling back. Ubuntu 22.04 because it packages Python 3.11 (24.04 has only
# 3.12, which pyproject excludes).
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-base-ubuntu22.04 AS worker
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && python -m pip install --upgrade pip \
 && python -m pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY . .
RUN python -m pip install . \
 && useradd --system --user-group --uid 10001 --create-home --home-dir /home/dmae dmae \
 && mkdir -p /data /checkpoints /datasets \
 && chown dmae:dmae /data /checkpoints /datasets
WORKDIR /home/dmae
ENV DMAE_DATA_DIR=/data \
    DMAE_CHECKPOINT_DIR=/checkpoints \
    DMAE_DATASET_DIR=/datasets
USER dmae
EXPOSE 9101
CMD ["dmae-certify", "worker", "--pool", "threads", "--concurrency", "8", "--metrics-port", "9101"]
