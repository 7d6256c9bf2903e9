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
# Dependencies next, from pyproject.toml alone (empty packages stand in for the
# code), so that editing the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir prompt_store server ptuning \
    && touch prompt_store/__init__.py server/__init__.py ptuning/__init__.py \
    && pip install . \
    && rm -rf prompt_store server ptuning
COPY prompt_store ./prompt_store
COPY server ./server
COPY ptuning ./ptuning
RUN pip install --no-deps .

USER 1000:1000
VOLUME ["/models", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
ENTRYPOINT ["ptserve", "serve"]
