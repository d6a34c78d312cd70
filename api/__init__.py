"""HTTP service (FastAPI): routes per resource (``api/routes``), their request and response
models (``api/schemas.py``), dependencies (``api/deps.py``) and the HTML dashboard (``api/ui``,
``api/templates``). The work itself lives in the service core (``service``) and the Celery
workers; it must start fast and install without the ML stack (``pip install '.[service]'``), so
nothing here imports torch (tests/test_packaging.py, tests/test_layout.py).
"""
