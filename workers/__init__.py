"""Celery workers that run the service's jobs: training, sampling and evaluation on the ``gpu``
queue (through the core, ``ml``), Label Studio review syncs on ``default``.
``workers.lifecycle`` claims, heartbeats, re-queues and reaps jobs so none runs twice;
``workers.progress`` turns stages into progress and ETA.
"""
