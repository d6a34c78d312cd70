"""The service's Alembic migrations, shipped inside the package (``env.py``, ``versions/``) so
``protomed migrate`` works from an installed wheel, without a checkout or ``alembic.ini``.

In a checkout, ``alembic upgrade head`` reads ``alembic.ini`` at the repository root, which
points at this same folder.
"""

from __future__ import annotations

import logging
from importlib.resources import files

from alembic.config import Config


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration for these migrations, built in code (no ``alembic.ini``), found
    wherever the package is installed. ``url``: the database; None leaves it to ``env.py``
    (``PROTOMED_DATABASE_URL``)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(files(__name__)))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser escaping
    return cfg


def log_progress() -> None:
    """Print Alembic's INFO lines (each revision applied) on stderr, as ``alembic.ini`` does."""
    logger = logging.getLogger("alembic")
    if all(isinstance(h, logging.NullHandler) for h in logger.handlers):  # Alembic adds one
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-5.5s [%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
