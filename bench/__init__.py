"""Benchmarks, run as ``python -m bench.<name>``. Importing the package first asks OpenMP to wait
passively on a busy machine, as ``protomed`` does (:func:`ml.runtime.prefer_passive_wait`): the
benches import torch before anything else of ``ml``, and the wait policy only counts if set
before that."""

from ml.runtime import prefer_passive_wait

prefer_passive_wait()
