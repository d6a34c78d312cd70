"""Whether a training split fits a dataset, decided at request time from the counts stored at
registration, so a request the worker would certainly fail on is a 422 and creates nothing.

The rule is the worker's own (``ml.data.images.load_split`` and ``ml.prototypes.cpl.fit_codebook``):
per class it draws ``n_heldout`` held-out images first, then ``n_per_class`` training images
(``None``: all the rest, at least one), and the codebook needs ``k`` training images per
class (every run learns one, baseline runs too). Images that turn out unreadable or duplicate
when decoded can still make a job fail later: only their decoding reveals them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ml.errors import Invalid


class SplitTooLarge(Invalid):
    """The request asks for more images than the dataset holds; the message names each short
    class, its count and what was asked."""


def _asked(n_per_class: int | None, n_heldout: int, k: int) -> tuple[int, str]:
    """Images one class needs, and how that number came about."""
    if n_per_class is None:
        train = max(1, k)
        why = f"n_heldout={n_heldout} + n_per_class=all the rest, at least k={k}"
    else:
        train = n_per_class
        why = f"n_heldout={n_heldout} + n_per_class={n_per_class}"
    return n_heldout + train, why


def check_split(
    counts: Mapping[str, int] | None,
    classes: Sequence[str],
    n_per_class: int | None,
    n_heldout: int,
    k: int,
) -> None:
    """Raise :class:`SplitTooLarge` unless every class in ``classes`` holds the images asked
    for. ``counts`` as stored at registration; a class without a stored count is not judged."""
    if n_per_class is not None and n_per_class < k:
        raise SplitTooLarge(
            f"k={k} prototypes per class need at least {k} training images per class, but "
            f"n_per_class={n_per_class}; raise n_per_class to at least {k} or lower k"
        )
    needed, why = _asked(n_per_class, n_heldout, k)
    short = [
        f"class {c!r} has {counts[c]} images but {needed} were asked ({why})"
        for c in classes
        if counts and c in counts and counts[c] < needed
    ]
    if short:
        raise SplitTooLarge(
            "the dataset holds too few images for this split: "
            + "; ".join(short)
            + "; lower n_per_class or n_heldout, or leave out those classes"
        )
