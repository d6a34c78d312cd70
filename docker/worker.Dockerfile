# syntax=docker/dockerfile:1
# protomed GPU worker image: Celery worker for the `gpu` (train, sample) and `default` queues.
#
#   docker build -f docker/worker.Dockerfile -t protomed-worker .
#
# Base image: python:3.11-slim, not nvidia/cuda or pytorch/pytorch. torch==2.14.1 from PyPI is
# the CUDA 13.0 build (2.14.1+cu130) and carries its own CUDA runtime, cuDNN, cuBLAS and NCCL as
# nvidia-* wheels, so a CUDA base image would only add a second, unused CUDA toolkit of another
# version (nvidia/cuda:12.8.1 ships 12.8; Ubuntu 22.04 also has Python 3.10, not 3.11), and
# pytorch/pytorch images bring their own conda Python and torch version, which `pip install .`
# would then replace. All the container needs from the host is the NVIDIA driver (>= 580 for
# CUDA 13.0), injected by the NVIDIA Container Toolkit for a GPU device reservation.
# For older drivers, build with the wheels of another CUDA line from the PyTorch index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # What the NVIDIA Container Toolkit mounts into the container (nvidia/cuda images set this).
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    # The service never downloads weights; fail fast instead of trying.
    HF_HUB_OFFLINE=1

WORKDIR /app

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1; \
    fi

# Dependencies in their own layer (rebuilt only when pyproject.toml changes), then the code.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extras['ml'] + extras['service']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'"

COPY ml ./ml
COPY api ./api
COPY workers ./workers
COPY protomed_cli ./protomed_cli
COPY service ./service
COPY migrations ./migrations
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 protomed \
    && mkdir -p /work \
    && chown protomed:protomed /work
USER protomed
# /work is a volume in compose: checkpoints, unpacked uploads and the embedding cache survive
# a container restart: a re-queued training job resumes from its run folder's last.pt.
ENV PROTOMED_WORK_DIR=/work \
    PROTOMED_CACHE_DIR=/work/cache

# One job at a time per machine: a training job itself spreads over all visible GPUs (DDP).
CMD ["celery", "-A", "workers.celery_app", "worker", "-Q", "gpu,default", \
     "--concurrency", "1", "--prefetch-multiplier", "1", "-n", "gpu@%h", "--loglevel", "INFO"]
