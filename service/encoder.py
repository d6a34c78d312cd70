"""Whether the workers' CLIP encoder can be built, checked by the API before it queues a job.

A training job with ``prototype_encoder="learned"`` needs no CLIP weights: it learns its encoder
from the dataset (:mod:`ml.prototypes.learned_encoder`), so :func:`require_prototype_encoder` lets
it through.

A training (or evaluation) job starts by embedding images with the encoder; if its weights are
not on the machine the job can only fail, so the request is refused at once
(:class:`EncoderUnavailable`, which the API answers with 422), saying what to set.
Torch-free: :mod:`ml.prototypes.weights` locates the file (a path given, or the tag's file in the
Hugging
Face hub cache) from open_clip's source without importing open_clip or torch.
"""

from __future__ import annotations

from ml.errors import Invalid
from service.config import Settings


class EncoderUnavailable(Invalid):
    """The workers' CLIP encoder cannot be built on this machine (the message says what to
    set); nothing was queued."""


def require_encoder_weights(settings: Settings) -> None:
    """:class:`EncoderUnavailable` unless ``settings.encoder_weights`` for ``settings.encoder``
    are on this machine (skipped with ``PROTOMED_CHECK_ENCODER_WEIGHTS=false``, for an API on
    another machine than its workers' weights)."""
    if not settings.check_encoder_weights:
        return
    from ml.prototypes.weights import find_weights

    try:
        find_weights(settings.encoder, settings.encoder_weights)
    except ValueError as exc:
        raise EncoderUnavailable(
            f"cannot train: the CLIP encoder (PROTOMED_ENCODER={settings.encoder}, "
            f"PROTOMED_ENCODER_WEIGHTS={settings.encoder_weights}) is not usable on this "
            f"machine: {exc}. Nothing was queued.",
        ) from exc


def require_prototype_encoder(settings: Settings) -> None:
    """What a training request needs: nothing with the learned domain encoder (trained from the
    dataset itself), else the CLIP encoder's weights (:func:`require_encoder_weights`)."""
    if settings.prototype_encoder != "learned":
        require_encoder_weights(settings)
