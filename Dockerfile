# ptserve: one frozen LM serving many soft prompts.
#   GPU (default):  docker build -t ptserve .
#   CPU only:       docker build -t ptserve --build-arg TORCH_INDEX=cpu .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# "cuda": PyPI's default torch wheel (CUDA-enabled); "cpu": the CPU-only wheel index.
ARG TORCH_INDEX=cuda
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models \
    PTSERVE_MODEL_CACHE=/models/ptserve \
    PTSERVE_HOST=0.0.0.0 \
    PTSERVE_PORT=8000 \
    PTSERVE_STORE=/data

# A fixed UID and GID (1000:1000): deploy/k8s runs the container as exactly
# these, with a read-only root file system.
RUN groupadd --gid 1000 ptserve \
    && useradd --create-home --uid 1000 --gid 1000 ptserve \
    && mkdir -p /models /data && chown ptserve:ptserve /models /data

# torch first: the largest layer, and the one that changes least.
RUN if [ "$TORCH_INDEX" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/cpu"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /app
# Dependencies next, from pyproject.toml alone, so that editing the code does
# not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# Then the whole source tree, less what .dockerignore leaves out, so a new
# package is copied by construction. The import check runs isolated (-I): it
# imports the installed copy, not ./, as the entrypoint will.
COPY . .
RUN pip install --no-deps . \
    && python -I -c "import server.api.app, server.cli, ptuning.train, ptclient.client"

USER 1000:1000
VOLUME ["/models", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
ENTRYPOINT ["ptserve", "serve"]
