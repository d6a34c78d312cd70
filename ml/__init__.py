"""protomed's core. Importing any part of it first switches the Hugging Face hub libraries to
offline mode (:func:`ml.prototypes.weights.force_offline`): protomed never downloads, and open_clip
would
otherwise try the hub (retrying for minutes) whenever weights are missing."""

from ml.prototypes.weights import force_offline

force_offline()
