# syntax=docker/dockerfile:1
# One image for every peer: `docker run p2p-node:local` starts a peer with
# /etc/p2p-node/node.toml (configs/compose/standalone.toml); docker-compose.yml runs a swarm.
#
# torch: by default the CPU build pinned in constraints-cpu.txt (torch==2.13.0+cpu),
# from PyTorch's CPU wheel index. (PyPI's plain `torch` wheel for Linux x86_64 is the CUDA
# build with several GB of nvidia-* dependencies, so the default does not come from PyPI.)
# Another torch, e.g. a CUDA build:
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/<cuda tag> -t p2p-node:cuda .
# TORCH_SPEC is any pip requirement for torch the package accepts (torch>=2.3); with it set,
# constraints-cpu.txt is not applied. The image itself stays CUDA-free; a CUDA torch wheel
# brings its CUDA runtime with it, and the host needs the NVIDIA container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: a venv with everything
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# fastecdsa (a py-libp2p dependency) has no wheel for every platform: it compiles against GMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libgmp-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/p2p-node
ENV PATH=/opt/p2p-node/bin:$PATH
WORKDIR /src
# torch first, in its own layer: by far the largest download, and it changes least often.
COPY constraints-cpu.txt ./
RUN if [ -n "$TORCH_SPEC" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install --index-url "$TORCH_INDEX_URL" -c constraints-cpu.txt torch; \
    fi
COPY . .
# The torch installed above already satisfies the package's `torch>=2.3`, so pip keeps it.
RUN if [ -n "$TORCH_SPEC" ]; then \
        pip install .; \
    else \
        pip install -c constraints-cpu.txt .; \
    fi \
 && p2p-node --help >/dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="p2p-node" \
      org.opencontainers.image.description="Peer-to-peer DiLoCo training daemon over libp2p"
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgmp10 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 p2p \
 && useradd --system --uid 10001 --gid p2p --home-dir /data --no-create-home --shell /usr/sbin/nologin p2p \
 && mkdir -p /data /etc/p2p-node \
 && chown p2p:p2p /data
COPY --from=build /opt/p2p-node /opt/p2p-node
COPY configs/compose/standalone.toml /etc/p2p-node/node.toml
ENV PATH=/opt/p2p-node/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER p2p
WORKDIR /data
# Identity key, content store and state. A named volume keeps the peer id across restarts.
VOLUME ["/data"]
# 4001: libp2p (TCP). 8470: HTTP status (publish it on the host's loopback only).
EXPOSE 4001/tcp 8470/tcp
# /healthz answers 200 while libp2p runs. Set P2P_NODE_STATUS_PORT if the config moves the port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('P2P_NODE_STATUS_PORT', '8470'), timeout=4)"]
ENTRYPOINT ["p2p-node"]
CMD ["start", "--config", "/etc/p2p-node/node.toml"]
