# syntax=docker/dockerfile:1
#
# The one image every cachefs component runs on Kubernetes: the Ray head (coordinator),
# the Ray workers (cache nodes), the bootstrap and operator sidecars, and the CSI node
# plugin (FUSE mounts). See helm/cachefs and docs/kubernetes.md.
#
#   docker build -t ghcr.io/cachefs/cachefs:0.1.0 .
#
# RAY_VERSION must equal the chart's ray.version: KubeRay requires the rayVersion of the
# RayCluster to match the Ray in the image.

ARG PYTHON_VERSION=3.11

# ---- build: wheels for cachefs and every dependency ----------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG RAY_VERSION=2.60.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Every dependency comes as a wheel: the CSI plugin's FUSE server is pure Python
# (csi/fuse/), so nothing is compiled here.
WORKDIR /src
# Only what the package is made of: no tests, benchmarks, chart or local state.
COPY pyproject.toml README.md ./
COPY cachefs ./cachefs
COPY shard ./shard
COPY server ./server
COPY csi ./csi
RUN pip wheel --wheel-dir /wheels ".[server,csi,operator]" "ray[default]==${RAY_VERSION}"

# ---- runtime ------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim
ARG RAY_VERSION=2.60.0
LABEL org.opencontainers.image.title="cachefs" \
      org.opencontainers.image.description="A distributed dataset cache for ML training" \
      org.opencontainers.image.source="https://github.com/cachefs/cachefs" \
      org.opencontainers.image.licenses="Apache-2.0"

# fuse3: fusermount3, for mounts by a non-root `cachefs mount` (the root CSI plugin
# mounts with mount(2) itself). wget: KubeRay's default probes on Ray containers call it. tini: a PID 1 that
# reaps the mount processes the CSI plugin spawns and forwards signals.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      fuse3 ca-certificates wget tini \
 && rm -rf /var/lib/apt/lists/* \
 && echo user_allow_other >> /etc/fuse.conf

# The cache runs as uid 1000 (the chart's pod security contexts say so too); only the
# CSI plugin runs as root, because mounting needs it.
RUN groupadd --gid 1000 cachefs \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/cachefs --shell /bin/bash cachefs \
 && mkdir -p /cachefs/home /cachefs/disk /cachefs/state \
 && chown -R 1000:1000 /cachefs

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "cachefs[server,csi,operator]" "ray[default]==${RAY_VERSION}" \
 && cachefs --help >/dev/null

ENV CACHEFS_HOME=/cachefs/home \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
USER 1000:1000
WORKDIR /home/cachefs
EXPOSE 8477
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["cachefs", "--help"]
