# syntax=docker/dockerfile:1
# protomed API image: FastAPI under uvicorn. The same image runs the `migrate` one-shot
# (alembic upgrade head) and the light CPU worker of the `default` queue.
#
#   docker build -f docker/api.Dockerfile -t protomed-api .
#
# torch is a hard dependency of the package (pyproject pins torch==2.14.1), but the API never
# imports torch at start-up (api/ keeps the ML core out of its import path; training and sampling
# run in the workers). So the CPU wheels are installed first: they satisfy the pins
# (2.14.1+cpu matches ==2.14.1) and keep the image small, without the CUDA libraries that the
# PyPI build pulls in.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The service never downloads weights; fail fast instead of trying.
    HF_HUB_OFFLINE=1

WORKDIR /app

RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1+cpu torchvision==0.29.1+cpu

# Dependencies in their own layer (rebuilt only when pyproject.toml changes), then the code.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import torch; assert torch.version.cuda is None, 'a CUDA torch replaced the CPU wheel'"

COPY ml ./ml
COPY api ./api
COPY workers ./workers
COPY protomed_cli ./protomed_cli
COPY service ./service
RUN pip install --no-deps .
# Migrations run from /app: alembic.ini sets script_location to ./migrations.
COPY alembic.ini ./
COPY migrations ./migrations

RUN useradd --create-home --uid 10001 protomed \
    && mkdir -p /work \
    && chown protomed:protomed /work
USER protomed
ENV PROTOMED_WORK_DIR=/work \
    PROTOMED_CACHE_DIR=/work/cache

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# --proxy-headers trusts X-Forwarded-* only from FORWARDED_ALLOW_IPS (uvicorn's default:
# 127.0.0.1); set that variable to the reverse proxy's address when one sits in front.
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
