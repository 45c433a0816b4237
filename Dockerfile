# soundline: one image for the pipeline (`dvc repro` on a mounted checkout) and serving.
# Build: podman/docker build -t soundline .    (CPU-only PyTorch)
# Corporate/offline builds: --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_EXTRA_INDEX_URL=...
#   and extra CA certificates in ./certs/*.crt (copied into the trust store).
FROM debian:bookworm-slim AS build
ARG PIP_FIND_LINKS=""
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_FIND_LINKS=${PIP_FIND_LINKS} PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-venv python3-dev build-essential ca-certificates && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
WORKDIR /opt/soundline
COPY pyproject.toml requirements.lock README.md ./
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install -q -c requirements.lock .

FROM debian:bookworm-slim
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 libsndfile1 espeak-ng git ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 soundline
COPY --from=build /etc/ssl/certs/ /etc/ssl/certs/
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MPLBACKEND=Agg
USER soundline
WORKDIR /work
# Mount a checkout at /work:  docker run -v $PWD:/work soundline dvc repro
CMD ["dvc", "repro"]
