# soundline: one CPU-only image for the three jobs of the project (README "Containers"):
#   pipeline  podman run --rm -v "$PWD:/work" soundline          (soundline-repro: data, then dvc repro)
#   service   podman run --rm -p 127.0.0.1:3000:3000 -v soundline_bentoml:/bentoml soundline \
#               bentoml serve soundline:latest --host 0.0.0.0 --port 3000
#   MLflow    soundline mlflow server ...                          (docker-compose.yml)
#
# Build:  podman build -t soundline .      (docker build works the same)
# Corporate / offline builds (all optional; none of them reaches the runtime stage):
#   --build-arg PIP_FIND_LINKS=DIR|URL     a wheel folder or page (podman: -v /opt/wheels:/opt/wheels:ro)
#   --build-arg PIP_INDEX_URL=URL          a PyPI mirror instead of pypi.org
#   --build-arg PIP_EXTRA_INDEX_URL=URL    e.g. https://download.pytorch.org/whl/cpu
#   certs/*.crt                            extra CA certificates (TLS-intercepting proxy)
# requirements.lock pins torch==2.13.0+cpu, which is not on PyPI: it must come from
# PIP_FIND_LINKS or the PyTorch CPU index, so the CUDA build (and its ~3 GB of nvidia-* wheels)
# can never be installed by accident; the build checks it.
# Never put a token in these URLs: build args are recorded in the build stages' history. Use a
# mirror that needs no credentials (or a pip.conf/netrc passed as a build secret).

# ---- python: Debian's python3 and the trust store, shared by the build stages ----------------
FROM debian:bookworm-slim AS python
ENV DEBIAN_FRONTEND=noninteractive
# Debian's own python3 (3.11, what pyproject.toml requires) keeps the build reproducible from
# the Debian archive alone; python3-venv for `python3 -m venv`; binutils for `strip`.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends python3 python3-venv binutils ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/*
# Extra CA certificates before anything talks HTTPS: pip must trust a corporate proxy.
COPY certs/ /tmp/certs/
RUN find /tmp/certs -maxdepth 1 -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
    && update-ca-certificates >/dev/null && rm -rf /tmp/certs
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# ---- deps-list: pyproject.toml's dependency list alone ------------------------------------------
# The slow layer below (~1.5 GB of wheels) is keyed on this list and requirements.lock, not on
# all of pyproject.toml, so editing its comments or tool settings does not reinstall torch.
FROM python AS deps-list
COPY pyproject.toml /tmp/
RUN python3 -c "import tomllib; print(*tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /deps.txt

# ---- build: the venv with every pinned dependency, trimmed ------------------------------------
FROM python AS build
# `pesq` ships only an sdist: its C extension is compiled here. The runtime stage copies the
# venv alone, so it gets no compiler.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev >/dev/null \
    && rm -rf /var/lib/apt/lists/*
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY --from=deps-list /deps.txt ./
COPY requirements.lock ./
# requirements.lock pins everything, uv included (`bentoml build` in the package stage would
# otherwise pip-install it at run time, which fails in this read-only venv and offline).
RUN /opt/venv/bin/pip install -q -c requirements.lock -r deps.txt \
    && /opt/venv/bin/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') else 'not the CPU build of torch: ' + v)"
# Size (goal < 2 GB; ~2.5 GB without this): drop what no soundline job runs. torch's C++ test
# binaries and headers (torch.compile's C++ backend would need a compiler, which the runtime
# image lacks anyway), pyarrow's headers and the packages' own test suites (~370 MB), then the
# libraries' symbol tables (~220 MB; strip_libs.py keeps any library stripping would break).
# The import check proves nothing needed went. The .pyc files stay: every DVC stage is a new
# Python process, and importing the stack without them takes ~3x longer (25 s vs 8 s here).
COPY container/strip_libs.py /tmp/strip_libs.py
RUN cd /opt/venv/lib/python3.11/site-packages \
    && rm -rf torch/test torch/include pyarrow/include \
    && find torch/bin -maxdepth 1 -type f ! -name torch_shm_manager -delete \
    && find . -type d -name tests ! -path './mlflow/*' -prune -exec rm -rf {} + \
    && /opt/venv/bin/python /tmp/strip_libs.py /opt/venv \
    && /opt/venv/bin/python -c "import torch, lightning, torchmetrics, librosa, numba, soundfile, soxr, sklearn, scipy.stats, pandas, pyarrow.parquet, matplotlib.pyplot, mlflow, mlflow.server, bentoml, dvc.repo, great_expectations, pesq, pystoi, noisereduce"

# ---- wheel: the project itself, as a wheel (pipeline/ and serving/) ------------------------------
FROM python AS wheel
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN python3 -m venv /tmp/venv && /tmp/venv/bin/pip wheel -q --no-deps -w /wheels .

# ---- runtime: Debian python3 + the venv; no compilers, pip caches or build args ----------------
FROM debian:bookworm-slim
ARG DEBIAN_FRONTEND=noninteractive
# The extra CAs first, so the ca-certificates package puts them in the system store it builds.
COPY --from=python /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/
# python3: the interpreter the venv links to. espeak-ng: the embedded default corpus.
# git: dvc and the MLflow git_commit tag. libsndfile comes inside the soundfile wheel.
# safe.directory '*': a checkout mounted from the host may belong to another uid, and git
# (hence dvc) refuses to work in it otherwise.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends python3 espeak-ng git ca-certificates >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
    && find /usr/share/doc -type f ! -name copyright -delete && rm -rf /usr/share/man/* \
    && git config --system --add safe.directory '*' \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash soundline \
    && mkdir -p /work /bentoml /mlflow && chown soundline:soundline /work /bentoml /mlflow \
    && chmod 1777 /home/soundline
COPY --from=build /opt/venv /opt/venv
# The project on top of the venv in a layer of its own: a code change rebuilds this (seconds),
# not the venv. A checkout mounted at /work still wins (`python -m` puts the working directory
# first on sys.path), so `dvc repro` always runs the checkout's code; the installed copy serves
# `python -m pipeline.data.corpus` and friends without one.
COPY --from=wheel /wheels/ /tmp/wheels/
# The service reads params.yaml's serve section at import (a Bento carries its own); the check
# gives it an empty one.
RUN /opt/venv/bin/pip install -q --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && echo 'serve: {}' > /tmp/params.yaml \
    && SOUNDLINE_PARAMS=/tmp/params.yaml /opt/venv/bin/python -c "import pipeline.tracking, pipeline.stages.train, pipeline.stages.evaluate, pipeline.stages.package, serving.service, pipeline.enhancement, pipeline.models.unet" \
    && rm /tmp/params.yaml
COPY container/soundline-repro /usr/local/bin/soundline-repro
# HOME is world-writable (mode 1777) and every cache lives under /tmp, so the image also runs
# as any uid (`docker run --user $(id -u):$(id -g)`), not only as soundline (1000).
# NUMBA_CACHE_DIR: librosa's numba kernels would cache beside site-packages (not writable).
# BENTOML_HOME=/bentoml: one volume shared by the pipeline (the package stage writes the Bento)
# and the service (serves it). SSL_CERT_FILE/REQUESTS_CA_BUNDLE: Python HTTP clients use the
# system store, which holds the certs/ CAs, instead of certifi's bundle.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/soundline \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MPLBACKEND=Agg MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    BENTOML_HOME=/bentoml BENTOML_DO_NOT_TRACK=True \
    DVC_NO_ANALYTICS=1 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
USER soundline
WORKDIR /work
EXPOSE 3000 5000
# Default: reproduce the pipeline on the checkout mounted at /work (arguments go to dvc repro).
CMD ["soundline-repro"]
