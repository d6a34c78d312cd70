"""The ``protomed`` command: the ML core's CLI (``ml.cli``) plus the service commands
(serve, worker, migrate, keys). The top of the import graph: it may import every layer."""
