"""HTTP service (FastAPI): datasets, training, sampling and evaluation jobs, batches, reviews,
reports, API keys and the dashboard, over typed settings (``api.core.config``), the ORM schema
(``api.db``) and object storage (``api.storage``).

It queues work for the Celery workers (``workers``), which run the core (``ml``); it must start
fast and install without the ML stack (``pip install '.[service]'``), so nothing here imports
torch (tests/test_packaging.py).
"""
