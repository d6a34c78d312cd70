"""The memorisation audit's settings and result as pydantic models, torch-free, so the API and
the dashboard read a stored audit (``ml.audit`` computes it) without loading torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Space = Literal["pixel", "clip"]
PIXEL_METRIC = (
    "root-mean-square difference of [0, 1] RGB pixels at the model's image size (0 = identical, "
    "1 = black vs white), minimised over the flips the model was trained with"
)
CLIP_METRIC = (
    "cosine distance 1 - cos(e_a, e_b) between the project's CLIP image embeddings, minimised "
    "over the same flips"
)
DCR_RATIO = (
    "median distance to closest training record (DCR) of the generated images / median DCR of "
    "the held-out calibration images (Platzer & Reutterer 2021); below 1: generated images sit "
    "closer to the training images than fresh real ones do"
)


class AuditConfig(BaseModel):
    """How near-copies are flagged. ``quantile`` q: per class and space, the threshold is the
    k-th smallest held-out-to-training distance of the calibration half, k = floor(q (n + 1))
    (at least 1): a fresh real image falls below it with probability k / (n + 1) <= q when
    k >= 1 by that formula (split-conformal rank, exchangeability of real images)."""

    model_config = ConfigDict(extra="forbid")

    quantile: float = Field(0.05, gt=0.0, lt=0.5, description="calibrated false-flag rate")
    calibration_share: float = Field(
        0.5, gt=0.0, lt=1.0, description="share of held-out images used for the thresholds"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the calibration/check split")
    spaces: tuple[Space, ...] = Field(("pixel", "clip"), min_length=1)
    flips: bool | None = Field(
        None, description="compare flipped images too (None: as the model was trained)"
    )


class Neighbour(BaseModel):
    """An image's nearest training image in one space."""

    distance: float
    train_index: int  # position in the training split
    train_path: str  # the training file (relative to the dataset where known)
    flip: str  # none | h | v | hv: the flip of the audited image that matched
    nndr: float  # d1 / d2: nearest over second-nearest training distance (1 = no single match)
    ratio: float | None  # distance / median held-out calibration distance (None if that is 0)


class ImageAudit(BaseModel):
    index: int  # position in the audited batch (or manifest order on the CLI)
    class_name: str
    name: str = ""  # file name or storage key
    pixel: Neighbour | None = None  # None: the space was not audited
    clip: Neighbour | None = None
    flagged: bool
    flagged_by: list[Space] = Field(default_factory=list)


class Calibration(BaseModel):
    """One class's thresholds and how honest they are on real images they never saw."""

    n_calibration: int
    n_check: int
    rank: int  # k: the threshold is the k-th smallest calibration distance
    thresholds: dict[str, float]  # space -> distance at or below which an image is flagged
    heldout_median: dict[str, float]  # space -> median calibration distance (DCR reference)
    expected_false_flag_rate: float  # sum over spaces of k / (n_calibration + 1), at most 1
    check_flagged: int  # held-out check images flagged (fresh real images)
    check_rate: float | None
    check_upper95: float | None  # Clopper-Pearson upper bound of the check rate


class ClassAudit(BaseModel):
    class_name: str
    n_images: int
    n_flagged: int
    flag_rate: float | None
    flagged_by: dict[str, int]  # space -> images flagged in it
    median_dcr: dict[str, float | None]  # space -> median distance to the nearest training image
    dcr_ratio: dict[str, float | None]  # space -> median DCR / held-out median DCR
    calibration: Calibration


class AuditTotals(BaseModel):
    n_images: int
    n_flagged: int
    flag_rate: float | None
    n_check: int
    check_flagged: int
    check_rate: float | None
    check_upper95: float | None


class AuditReport(BaseModel):
    """A batch's memorisation audit: per image its nearest training image in pixel and CLIP
    space, per class the calibrated thresholds and flag rates, and the held-out check."""

    config: AuditConfig
    classes: list[str]
    image_size: int
    flips: list[str]
    encoder: str
    metrics: dict[str, str] = Field(
        default_factory=lambda: {"pixel": PIXEL_METRIC, "clip": CLIP_METRIC, "dcr": DCR_RATIO}
    )
    n_train: dict[str, int]
    n_heldout: dict[str, int]
    per_class: list[ClassAudit]
    totals: AuditTotals
    images: list[ImageAudit]
    seconds: float = 0.0

    def flagged(self) -> list[ImageAudit]:
        return [i for i in self.images if i.flagged]


def nearest(image: ImageAudit) -> Neighbour:
    """The neighbour to show beside an image: where it was flagged, pixel space first."""
    for space in (*image.flagged_by, "pixel", "clip"):
        found: Neighbour | None = getattr(image, space)
        if found is not None:
            return found
    raise ValueError(f"image {image.index} was audited in no space")
