"""``python -m protomed_cli``."""

from protomed_cli.main import app

app()
