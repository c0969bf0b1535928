# syntax=docker/dockerfile:1
# The real-scale image: the project, its CUDA lock and Quarto, so that
#   docker build -t repro .
#   docker run --gpus all --shm-size=2g -v "$PWD/cache:/cache" -v "$PWD/results:/repro/results" \
#       repro nox -s all -- --profile pythia-70m-deduped
#   docker run -v "$PWD/results:/repro/results" -e PYTHIA_ATTRIBUTION_PROFILE=pythia-70m-deduped \
#       repro quarto render paper/pythia.qmd
# is the whole run (README, "Real scale"). torch and faiss bring CUDA as wheels (requirements/cuda.lock),
# so the base image needs nothing but Python; the NVIDIA Container Toolkit injects the driver.
#
# Base: python:3.11.14-slim-bookworm, pinned by its multi-platform index digest. The digest was taken
# from public Dockerfiles that pin the same tag (no registry is reachable from the machines this project
# is developed on); `docker buildx imagetools inspect python:3.11.14-slim-bookworm` shows the current one.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Quarto, pinned by version and by the sha256 of its release tarball (quarto-$V-checksums.txt).
ARG QUARTO_VERSION=1.9.38
ARG QUARTO_SHA256=ea8c897368791ad9f200010c087ea3111b2e556b12a960487dd4e216902aa102

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

RUN curl -fsSL --retry 5 -o /tmp/quarto.tar.gz \
      "https://github.com/quarto-dev/quarto-cli/releases/download/v${QUARTO_VERSION}/quarto-${QUARTO_VERSION}-linux-amd64.tar.gz" \
 && echo "${QUARTO_SHA256}  /tmp/quarto.tar.gz" | sha256sum -c - \
 && mkdir -p /opt/quarto \
 && tar -xzf /tmp/quarto.tar.gz -C /opt/quarto --strip-components=1 \
 && rm /tmp/quarto.tar.gz \
 && ln -s /opt/quarto/bin/quarto /usr/local/bin/quarto

# The pinned stack: exactly requirements/cuda.lock, every wheel checked against its hash. Nothing is
# resolved at build time (--no-deps), and nox installs nothing (PYTHIA_ATTRIBUTION_PYTHON).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHIA_ATTRIBUTION_PYTHON=/opt/venv/bin/python
COPY requirements/cuda.lock /tmp/cuda.lock
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/cuda.lock \
 && rm /tmp/cuda.lock

WORKDIR /repro
COPY pyproject.toml README.md LICENSE CITATION.cff noxfile.py ./
COPY src ./src
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation -e .
COPY experiments ./experiments
COPY data_manifests ./data_manifests
COPY paper ./paper

# A fixed non-root user. The Hub cache and the project's source cache live on /cache, the results on
# /repro/results: mount both as volumes. Quarto (deno, typst) caches under $HOME, so HOME is writable.
RUN groupadd --gid 10001 repro \
 && useradd --create-home --uid 10001 --gid 10001 repro \
 && mkdir -p /cache /repro/results \
 && chown -R repro:repro /cache /repro/results /repro/paper
ENV HF_HOME=/cache/huggingface \
    PYTHIA_ATTRIBUTION_CACHE=/cache/pythia-attribution \
    HOME=/home/repro
VOLUME ["/cache", "/repro/results"]
USER 10001:10001

CMD ["nox", "-s", "all"]
