"""Celery workers that run the service's jobs: training, sampling and evaluation on the ``gpu``
queue (through the core, ``ml``), Label Studio review syncs on ``default``.
``service.job_state`` claims, heartbeats, re-queues, finishes and reaps jobs so none runs twice
and a run that lost its job writes nothing; ``workers.lifecycle`` is a running job's context;
``workers.progress`` turns stages into progress and ETA.
"""
