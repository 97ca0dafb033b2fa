# syntax=docker/dockerfile:1
# Ovis2 OpenAI-compatible server on an NVIDIA GPU.
#   docker build -t ovis2-serve .
#   docker run --gpus all -p 8000:8000 -v ovis2-hf:/data ovis2-serve --model thisisiron/Ovis2-2B-hf
#
# torch 2.13.0's default (PyPI) CUDA build is CUDA 13.0, so the base image is CUDA 13.0 and torch comes
# from the matching cu130 index. For another CUDA build, change the three together, e.g.
#   --build-arg CUDA_VERSION=12.9.1 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129
# (torch 2.13.0 is published for cu126, cu129, cu130 and cu132). The host driver must support the CUDA
# version (CUDA 13.0 needs driver >= 580).
ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=24.04
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}

# ---- build: a virtual environment with CUDA torch and the project installed from its wheel ----
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu package versions are pinned by the base image's release; pinning them here breaks on every
# security update of the archive, so DL3008 is ignored for this line.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index, so the project's `torch>=2.4` requirement is already met by it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ovis2 ./ovis2
COPY server ./server
COPY bench ./bench
# The project's own wheel (its dependencies resolve from PyPI; torch is already installed).
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install /wheels/*.whl

# ---- runtime: the CUDA runtime, Python, the venv; no compilers, no sources, no pip cache ----
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# Same reason as above: apt versions follow the pinned base image. DL3008 ignored.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 ovis2 \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin ovis2 \
    && mkdir -p /data/huggingface \
    && chown -R ovis2:ovis2 /data
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/ovis2/healthcheck.py

# Configuration: every server flag is also an OVIS2_* variable (see `ovis2-serve --help`).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface \
    OVIS2_HOST=0.0.0.0 \
    OVIS2_PORT=8000 \
    OVIS2_DEVICE=cuda \
    OVIS2_SHUTDOWN_GRACE_SECONDS=30
# Downloaded weights survive restarts and are shared between containers on a host.
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/ovis2
EXPOSE 8000
# start-period covers downloading and loading the weights (tens of GB for the large sizes).
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["python3", "/opt/ovis2/healthcheck.py"]
# The server finishes in-flight requests for OVIS2_SHUTDOWN_GRACE_SECONDS after SIGTERM; give
# `docker stop` more than that: docker stop -t 45 (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ovis2-serve"]
