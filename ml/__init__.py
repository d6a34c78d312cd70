"""protomed's core. Importing any part of it first switches the Hugging Face hub libraries to
offline mode (:func:`ml.prototypes.weights.force_offline`): protomed never downloads, and open_clip
would otherwise try the hub (retrying for minutes) whenever weights are missing. It also asks
OpenMP to wait passively on a busy machine (:func:`ml.runtime.prefer_passive_wait`), which only
works before torch is loaded."""

from ml.prototypes.weights import force_offline
from ml.runtime import prefer_passive_wait

force_offline()
prefer_passive_wait()
