"""HTTP service (FastAPI): datasets, training/sampling jobs, batches, reports.

Built on the core in ``ml`` through the Celery workers; it must start fast, so nothing here imports
torch. The service itself lands with the service issue (#3); this package only reserves its place.
"""
