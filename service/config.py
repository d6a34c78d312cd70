"""Service settings from the environment (``PROTOMED_*``) or a ``.env`` file.

Defaults run everything embedded (SQLite database and Celery broker, local storage) so a laptop
needs no services; production points the URLs at PostgreSQL, Redis and S3/MinIO.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; read once per process through :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="PROTOMED_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str = "sqlite:///./protomed.db"
    # Celery's SQLAlchemy transport: an embedded broker, no Redis needed for development.
    broker_url: str = "sqla+sqlite:///./protomed-broker.db"
    # Redis brokers: a prefix for every key of this installation's queues, so several
    # installations (or test runs) can share one Redis database without taking, or flushing,
    # each other's messages. Empty: kombu's plain key names.
    broker_key_prefix: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Path("./storage")
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_prefix: str = ""  # key namespace inside the bucket, e.g. "protomed/"
    # Dataset registration only accepts folders under these roots, so API clients cannot make
    # the workers read arbitrary server paths. Empty: no dataset can be registered.
    data_roots: list[Path] = Field(default_factory=list)
    max_images_per_request: int = Field(default=1000, ge=1)
    # Guidance: what POST /generate uses for a class without a per-class default (a guidance
    # sweep's, service.sweeps); a sweep's report recommends a scale for a class only where at
    # least two of its scales have this many reviewed images.
    default_guidance: float = Field(default=2.0, ge=0, le=20)
    sweep_min_images: int = Field(default=5, ge=1)
    max_upload_bytes: int = Field(default=512 * 1024**2, ge=1)  # a dataset zip as uploaded
    max_unpacked_bytes: int = Field(default=4 * 1024**3, ge=1)  # ...and once unpacked
    max_upload_files: int = Field(default=200_000, ge=1)
    # Images whose header declares more pixels (width x height) than this are left out of a
    # dataset at registration (listed in its ``skipped``) and never decoded by the workers: a
    # 20 KB PNG can declare 13000x13000 pixels and cost gigabytes once decoded. The ML core
    # reads the same variable, PROTOMED_MAX_IMAGE_PIXELS, from its environment.
    # the ML core's own default (ml.data.catalog.DEFAULT_MAX_IMAGE_PIXELS; a test keeps them equal):
    # the settings load without importing ml
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    # Bootstrap admin key (compose, CI): ensured to exist at start-up; its hash is stored.
    admin_key: str | None = None
    # Every read of datasets, models, batches, images, jobs and reports needs a key (admin or
    # viewer; reviewer keys are refused there, see api/deps.py): there is no open-read switch.
    # Dashboard logins (a cookie made from an API key) last this long, then ask again.
    ui_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)

    # Workers: where they keep local copies (checkpoints, unpacked uploads) and how they
    # prove they are alive. A running job whose heartbeat is older than heartbeat_timeout_s
    # is re-queued (up to max_attempts runs), then failed.
    work_dir: Path = Path("./work")
    heartbeat_s: float = Field(default=10.0, gt=0)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=2, ge=1)
    train_time_limit_s: float = Field(default=7 * 24 * 3600, gt=0)
    sample_time_limit_s: float = Field(default=6 * 3600, gt=0)
    # Processes per training run: 0 = one per visible CUDA GPU (DDP under torchrun when > 1).
    train_processes: int = Field(default=0, ge=0)
    # torch's intra-op threads in a worker process: "auto" (the usable cores less the load of
    # the machine's other processes), or a number. Unset: auto, unless OMP_NUM_THREADS is set.
    # The ML core reads the same variable, PROTOMED_THREADS (ml.runtime.choose_threads).
    threads: str | None = Field(default=None, pattern=r"^(auto|[1-9][0-9]*)$")

    # Expert review in Label Studio. label_studio_url: how the service reaches it (None: reviews
    # disabled); label_studio_public_url: the address reviewers open (links), default the same.
    # public_url: how Label Studio and reviewers' browsers reach this API (images, webhook).
    label_studio_url: str | None = None
    label_studio_token: str | None = None  # a legacy API token of a Label Studio admin
    label_studio_public_url: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    # Where Label Studio's server posts webhooks, if it reaches the API by another address
    # than browsers do (compose: http://api:8000). Default: public_url.
    review_callback_url: str | None = None
    review_webhook_secret: str | None = None  # sent by Label Studio in X-Protomed-Secret
    review_pull_s: float = Field(default=300.0, gt=0)  # reconciliation pull period
    review_sync_retry_s: float = Field(default=10.0, gt=0)  # wait after Label Studio was down
    review_sync_attempts: int = Field(default=60, ge=1)

    # The CLIP encoder for prototypes: an open_clip name and a weights tag or local file. The
    # service never downloads; "untrained" builds the architecture with random weights (tests).
    encoder: str = "ViT-L-14"
    encoder_weights: str = "openai"
    # What the training job learns its prototypes with: "clip" (the encoder above), or
    # "learned": a small CNN trained from scratch on the dataset's training images jointly with
    # the prototypes (ml/prototypes/learned_encoder.py), saved beside the codebook; it needs no
    # weights.
    # `protomed serve` picks "learned" when no CLIP weights were configured and none are here.
    # Metrics (evaluation, audit) always use the CLIP encoder above, never the space the
    # prototypes were fitted in.
    prototype_encoder: Literal["clip", "learned"] = "clip"
    # What plausibility scorers embed images with: "clip" (the encoder above) or "learned": the
    # encoder learned with the codebook of the domain's newest ready model that has one, copied
    # beside the scorer (the sampling filter loads it from there). None: as prototype_encoder,
    # so a service without CLIP weights scores in a space that separates its classes instead of
    # an untrained network's. A scorer maps features to reviewers' verdicts; it measures no
    # class-to-prototype distance, so the prototypes' space does not favour a mode by itself.
    scorer_encoder: Literal["clip", "learned"] | None = None
    # The API refuses training/evaluation requests (422) whose encoder weights it cannot find
    # (a file, or the tag's file in the hub cache, HF_HOME). Set false only where the API runs
    # on a machine without the workers' weights.
    check_encoder_weights: bool = True

    # Plausibility scorers (service/scorers.py): a domain's scorer is retrained once it has
    # this many more reviewed images than its newest scorer was trained on; none is trained on
    # fewer than scorer_min_images. A filtered batch draws n * oversample images (default
    # scorer_oversample, at most scorer_max_oversample, and at most max_images_per_request).
    scorer_retrain_after: int = Field(default=50, ge=1)
    scorer_min_images: int = Field(default=20, ge=6)
    scorer_oversample: int = Field(default=3, ge=1)
    scorer_max_oversample: int = Field(default=10, ge=1)

    def scorer_encoder_kind(self) -> Literal["clip", "learned"]:
        """The scorers' encoder: ``scorer_encoder``, or the prototypes' when that is unset."""
        return self.scorer_encoder or self.prototype_encoder

    def uploads_dir(self) -> Path:
        """Where uploaded dataset zips are unpacked (absolute, so a stored dataset root does
        not depend on the folder the process was started in)."""
        return self.work_dir.expanduser().resolve() / "datasets"

    def dataset_roots(self) -> list[Path]:
        """Where a dataset's files may resolve, symbolic links included: the data roots
        folders are registered from, and the unpacked uploads. Registration and every job
        that reads a dataset check this same list (absolute, resolved)."""
        roots = [r.expanduser().resolve() for r in self.data_roots] + [self.uploads_dir()]
        return list(dict.fromkeys(roots))

    @field_validator("database_url")
    @classmethod
    def _driver(cls, url: str) -> str:
        return normalize_database_url(url)

    @model_validator(mode="after")
    def _s3_complete(self) -> Settings:
        """Fail at start-up, not at the first upload."""
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("storage_backend 's3' needs PROTOMED_S3_BUCKET")
        return self


def normalize_database_url(url: str) -> str:
    """Plain ``postgresql://`` (or ``postgres://``) URLs get the installed driver, psycopg 3;
    SQLAlchemy would otherwise look for psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; cached so the environment and ``.env`` are read once.

    Tests that change the environment call ``get_settings.cache_clear()``.
    """
    return Settings()
