"""HTTP service (FastAPI): datasets, training/sampling jobs, batches, reports.

Built on the core in ``ml`` through the Celery workers; it must start fast, so nothing here imports
torch. In place so far (groundwork for issue #3): typed settings (``api.core.config``), the ORM
schema (``api.db.models``) with its Alembic migrations, and sessions (``api.db.session``); the
routes, workers and storage come with the rest of that issue.
"""
