"""Which images of a batch go before reviewers: the whole batch, or a budget of ``per_batch``
images made of a simple random sample and the images the domain's scorer is least sure about.

**Why the rates stay unbiased.** A batch's plausibility rate is estimated from the images of a
simple random sample of it (``ReviewSample.random``): every subset of the same size is equally
likely to be drawn, whatever the images look like, so the sample's rate estimates the batch's
without bias. The scorer's picks (``ReviewSample.uncertain``) are chosen *by a function of the
image* (its probability closest to 0.5), so they over-represent borderline images; their
verdicts train the scorer (that is what they are for) but the report keeps them out of every
rate (``service/reports.py``). The random draw uses :class:`secrets.SystemRandom`, so nobody
(reviewer or admin) can predict or steer which images it takes.

**Several requests for one batch.** The random draw is always taken from the batch's images not
yet in the project's random sample, earlier uncertain picks included: an earlier pick that is
drawn becomes part of the random sample (its task's ``sample`` turns to ``random``). Excluding
earlier picks from the draw would make the union of the draws depend on the scores and break
the argument above; including them keeps the union a simple random sample of the batch (a
simple random sample of what is left, added to one of the batch, is one of the batch). Sending
a batch whole (``all``) likewise makes every task of it ``random``: the whole batch is then the
sample.

**"First", without an order.** The least certain images are sent *first*, and here
that means *in preference to* the images the scorer is sure about: within the review budget,
they are sent and the confident ones wait. They are not put early in Label Studio's task order:
reviewers would learn that early tasks are the hard ones (and could judge them differently), and
the order would tell which verdicts are kept out of the rates. So all chosen images of a request
are shuffled together as always (``service/reviews.py``), and nothing in a task says why it was
chosen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ml.errors import Conflict, Invalid
from service.db.models import Batch, Image, ReviewSample, ReviewTask

SelectMode = Literal["all", "uncertain"]
DEFAULT_RANDOM_SHARE = 0.5


class SelectionError(Invalid):
    """A selection that cannot be made from the batch as it is (the message says why)."""


class NotScored(Conflict):
    """The batch's images have no scorer probability, so there is no "least sure" to choose: a
    conflict with the batch's state (scored later, it can be), not a malformed selection."""


@dataclass(frozen=True)
class Selection:
    """How to choose each batch's images: ``all`` of them, or ``per_batch`` images of which
    ``random_count`` form a simple random sample and the rest are the scorer's least certain."""

    mode: SelectMode = "all"
    per_batch: int | None = None
    random_share: float = DEFAULT_RANDOM_SHARE

    def __post_init__(self) -> None:
        if self.mode == "uncertain" and (self.per_batch is None or self.per_batch < 1):
            raise SelectionError("select 'uncertain' needs per_batch >= 1")
        if not 0 < self.random_share <= 1:
            raise SelectionError(f"random_share must be in (0, 1], got {self.random_share}")

    @property
    def random_count(self) -> int:
        """r = per_batch x random_share, rounded half up, at least 1 (every batch keeps a random
        sample, so its rate can be estimated) and at most per_batch."""
        if self.per_batch is None:
            raise SelectionError("random_count needs per_batch")
        # the small epsilon keeps 10 x 0.3 = 3.0000000000000004 (a float artefact) at 3
        r = math.floor(self.per_batch * self.random_share + 0.5 + 1e-9)
        return min(self.per_batch, max(1, r))


@dataclass
class BatchChoice:
    """One batch's chosen images: ``random`` (newly in its random sample: new tasks, or earlier
    uncertain picks whose task turns random) and ``uncertain`` (new tasks, the scorer's picks)."""

    batch_id: int
    random: list[Image] = field(default_factory=list)
    uncertain: list[Image] = field(default_factory=list)


def distance_from_half(image: Image) -> float:
    """|p - 0.5| of the scorer's probability: 0 for a coin toss (least sure), 0.5 for certain."""
    if image.score is None:
        raise NotScored(f"image {image.id} has no score")
    return abs(image.score - 0.5)


def choose(
    batch: Batch,
    tasks: Mapping[int, ReviewTask],
    selection: Selection,
    rng: random.Random | None = None,
) -> BatchChoice:
    """The images of ``batch`` to send under ``selection``, given ``tasks``, the project's
    existing tasks by image id. Pure apart from ``rng`` (default: the system's CSPRNG); raises
    :class:`SelectionError` (or :class:`NotScored` for unscored images) before choosing anything."""
    images = sorted(batch.images, key=lambda i: i.index)
    in_sample = {i for i, t in tasks.items() if t.sample == ReviewSample.random}
    drawable = [img for img in images if img.id not in in_sample]
    if selection.mode == "all":
        return BatchChoice(batch.id, random=drawable)
    m, r = selection.per_batch or 0, selection.random_count
    if m > len(images):
        raise SelectionError(
            f"per_batch {m} exceeds batch {batch.id}'s {len(images)} images; ask for at most "
            f"{len(images)} (or select 'all')"
        )
    if r > len(drawable):
        raise SelectionError(
            f"batch {batch.id}: only {len(drawable)} of its {len(images)} images are not yet in "
            f"the project's random sample, {r} asked for (per_batch {m} x random_share "
            f"{selection.random_share})"
        )
    k = m - r
    # every image must be scored (checked before the draw, so the answer does not depend on it)
    unscored = [img for img in images if img.score is None]
    if k and unscored:
        why = (
            "it was generated before its domain had a scorer"
            if batch.scorer_id is None
            else f"{len(unscored)} of its images have no scorer probability"
        )
        raise NotScored(
            f"batch {batch.id} is not scored ({why}), so there is no 'least sure' to choose: "
            "send it with select 'all', or with random_share 1 (a random subset only), or "
            "generate a new batch once the domain has a scorer"
        )
    # enough images for the picks whatever the draw takes (checked before it, for the same reason)
    new = sum(img.id not in tasks for img in images)
    if k > max(0, new - r):
        raise SelectionError(
            f"batch {batch.id}: {new} of its {len(images)} images are not in the project yet; "
            f"{r} random and {k} uncertain picks may need {r + k} of them; lower per_batch or "
            "raise random_share"
        )
    drawn = (rng or random.SystemRandom()).sample(drawable, r)
    if k == 0:
        return BatchChoice(batch.id, random=drawn)
    taken = {img.id for img in drawn}
    pool = [img for img in images if img.id not in tasks and img.id not in taken]
    # most uncertain first; equal uncertainty: the batch's order (any fixed rule would do)
    picks = sorted(pool, key=lambda img: (distance_from_half(img), img.index))[:k]
    return BatchChoice(batch.id, random=drawn, uncertain=picks)


def choose_all(
    batches: Sequence[Batch],
    tasks: Mapping[int, ReviewTask],
    selection: Selection,
    rng: random.Random | None = None,
) -> list[BatchChoice]:
    """:func:`choose` for every batch, all checked before any is applied."""
    return [choose(b, tasks, selection, rng) for b in batches]
