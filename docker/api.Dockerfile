# syntax=docker/dockerfile:1
# protomed API image: FastAPI under uvicorn. The same image runs the `migrate` one-shot
# (alembic upgrade head) and the light CPU worker of the `default` queue.
#
#   docker build -f docker/api.Dockerfile -t protomed-api .
#
# The API never imports torch (tests/test_packaging.py checks it), so the image installs the
# `service` extra only: no torch, no CUDA libraries. open_clip's source is added without its
# dependencies: the API reads its model and tag tables (ml/weights.py, torch-free) to refuse a
# training request at once when the workers' encoder weights are missing.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The service never downloads weights; fail fast instead of trying.
    HF_HUB_OFFLINE=1

WORKDIR /app

# Dependencies in their own layer (rebuilt only when pyproject.toml changes), then the code.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extras['service'])); print(next(r for r in extras['ml'] if r.startswith('open_clip')), file=open('/tmp/open_clip.txt', 'w'))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps -r /tmp/open_clip.txt \
    && rm /tmp/requirements.txt /tmp/open_clip.txt \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the API image'"

COPY ml ./ml
COPY api ./api
COPY workers ./workers
COPY protomed_cli ./protomed_cli
COPY service ./service
COPY migrations ./migrations
RUN pip install --no-deps .
# `protomed migrate` needs only the installed package; alembic.ini serves the compose file's
# `alembic upgrade head` (run from /app, script_location ./migrations).
COPY alembic.ini ./

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
