"""HTTP service (FastAPI): routes per resource (``api/routes``), their request and response
models (``api/schemas.py``), dependencies (``api/deps.py``) and the HTML dashboard (``api/ui``,
``api/templates``). The work itself lives in the service core (``service``) and the Celery
workers; nothing here imports torch, so the API starts fast.
"""
