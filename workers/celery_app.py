"""The Celery application: ``celery -A workers.celery_app worker -Q gpu,default``.

State lives in the database, not in Celery: a task carries only a job id, has no result backend,
and is acknowledged late (after it finishes) so a worker killed mid-job leaves its message to be
redelivered. Jobs are claimed with a conditional UPDATE, so a redelivered or duplicated message
never runs a job twice (``service.job_state``). Importing this module does not import torch.
"""

from __future__ import annotations

import os
from functools import lru_cache

from celery import Celery
from sqlalchemy import create_engine

from ml.data.catalog import PIXELS_ENV
from ml.prototypes.weights import force_offline
from ml.runtime import THREADS_ENV
from service.config import Settings, get_settings
from service.job_kinds import DEFAULT_QUEUE, GPU_QUEUE
from service.queue import transport_options

# Workers never download (open_clip would try the model hub for missing weights): offline mode
# for the hub libraries before any job imports them (ml/__init__ does it too; explicit here).
force_offline()


def make_celery(settings: Settings) -> Celery:
    # The ML core reads its image pixel limit from the environment (training under torchrun
    # has no settings object): hand it the setting, .env included, before any job runs.
    os.environ[PIXELS_ENV] = str(settings.max_image_pixels)
    if settings.threads is not None:  # likewise the thread count (ml.runtime; torchrun too)
        os.environ[THREADS_ENV] = settings.threads
    app = Celery("protomed", broker=settings.broker_url, include=["workers.tasks"])
    app.conf.update(
        task_default_queue=DEFAULT_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # A hard backstop for prefork pools; jobs enforce their own limits (workers.lifecycle).
        task_time_limit=int(max(settings.train_time_limit_s, settings.sample_time_limit_s)) + 600,
    )
    app.conf.broker_transport_options = transport_options(
        settings.broker_url, settings.broker_key_prefix
    )
    return app


def prepare_broker(app: Celery) -> None:
    """For the embedded SQLite broker (a no-op for others): create its tables and queues once,
    before the API and the worker share it, and switch the file to WAL. Left to first use,
    both processes create the same queue row at start-up and the loser's consumer fails on the
    unique name."""
    if not app.conf.broker_url.startswith("sqla+sqlite"):
        return
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in (GPU_QUEUE, DEFAULT_QUEUE):
            channel.queue_declare(queue)
    engine = create_engine(app.conf.broker_url.removeprefix("sqla+"))
    with engine.connect() as db:  # WAL is kept in the file: the pollers stop blocking publishes
        db.exec_driver_sql("PRAGMA journal_mode=WAL")
    engine.dispose()


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    """The process-wide app for the current settings (tests clear the cache)."""
    return make_celery(get_settings())


app = get_celery()
