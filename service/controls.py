"""Real images as controls in the blinded review.

A review request may add real images of the reviewed classes, drawn from a named dataset's
held-out part, so the report can set each model's plausible rate beside the rate experts give
real images under the same conditions. The images must be indistinguishable by construction:
each is resampled to the size of the synthetic images it is reviewed with by the one resampling
training data get (:func:`ml.data.draw.square_resize`: centre crop, LANCZOS), encoded by the
encoder generated images go through (:func:`ml.diffusion.provenance.png_with_provenance`, here
without a record), stored like a generated batch (``batches/<id>/<class>_<index>.png``, with its
SHA-256), and from then on follows the synthetic path unchanged: a :class:`ReviewTask` with the
same data, shuffled in, served re-encoded by :func:`service.blinding.blind_png`.

Held out means outside the training set of every reviewed model: each model's recorded split
(``metrics["selection"]``) is redrawn torch-free (:func:`ml.data.draw.training_files`), and a
candidate is excluded both by file identity (resolved path) and by the SHA-256 of its pixels at
the model's image size, so a copy of a training image under another name never serves as a
control. A model without a recorded split has no known held-out part: the request is refused.

What is left to measure, :func:`png_size_auc`: how well the byte size of the review copies alone
separates real from synthetic images (0.5: not at all).
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from pydantic import Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from ml.data.catalog import DataError, nfc, scan
from ml.data.draw import TrainingFiles, image_hash, load_rgb, training_files
from ml.diffusion.provenance import png_with_provenance
from ml.errors import Invalid
from service.archive import ensure_local
from service.blinding import blind_png
from service.config import Settings
from service.db.models import MAX_ID, Batch, BatchSource, Dataset, Image, Model, ReviewTask
from service.inputs import RequestModel
from service.storage import Storage
from service.study_statistics import auc

MAX_PER_CLASS = 1000  # control images per class one request may add


class ControlError(Invalid):
    """Controls that cannot be drawn as asked (the message says why and what is allowed)."""


@dataclass(frozen=True)
class Controls:
    """What a review request asks for: from ``dataset_id``'s held-out part, ``per_class``
    images of each reviewed class, or ``share`` times the number of synthetic images of that
    class sent in the request (rounded, at least one); ``seed`` makes the draw reproducible
    (drawn and recorded when not given)."""

    dataset_id: int
    per_class: int | None = None
    share: float | None = None
    seed: int | None = None

    def count(self, synthetic: int) -> int:
        if self.per_class is not None:
            return self.per_class
        assert self.share is not None
        return max(1, round(self.share * synthetic))

    def check(self) -> None:
        if (self.per_class is None) == (self.share is None):
            raise ControlError("give controls.per_class or controls.share, not both or neither")
        if self.per_class is not None and not 1 <= self.per_class <= MAX_PER_CLASS:
            raise ControlError(f"controls.per_class must be 1 to {MAX_PER_CLASS}")
        if self.share is not None and not (0 < self.share <= 1 and math.isfinite(self.share)):
            raise ControlError("controls.share must be above 0 and at most 1")
        if self.seed is not None and not 0 <= self.seed <= MAX_ID:
            raise ControlError(f"controls.seed must be 0 to {MAX_ID}")


def _local_root(dataset: Dataset, settings: Settings, storage: Storage) -> Path:
    try:
        return ensure_local(
            dataset.root,
            dataset.archive_key,
            storage,
            settings.work_dir,
            max_bytes=settings.max_unpacked_bytes,
            max_files=settings.max_upload_files,
        )
    except (OSError, ValueError) as exc:
        raise ControlError(f"dataset {dataset.id} cannot be read here: {exc}") from exc


def _trained_on(model: Model, settings: Settings, storage: Storage) -> TrainingFiles:
    """The files ``model`` trained on, from its recorded split; :class:`ControlError` when it
    records none (then every image of its dataset may have been trained on)."""
    selection = dict((model.metrics or {}).get("selection") or {})
    if "n_heldout" not in selection or "seed" not in selection:
        raise ControlError(
            f"model {model.id} records no data split (trained without a codebook), so which "
            "images it trained on is not known; controls need models with a recorded split"
        )
    selection["root"] = str(_local_root(model.dataset, settings, storage))
    try:
        return training_files(selection, settings.dataset_roots())
    except (DataError, OSError) as exc:
        raise ControlError(f"model {model.id}'s training split cannot be redrawn: {exc}") from exc


def image_size(storage: Storage, images: list[Image]) -> int:
    """The one side length of square synthetic images; :class:`ControlError` otherwise."""
    sizes = set()
    for img in images:
        with PILImage.open(io.BytesIO(storage.get_bytes(img.storage_key))) as opened:
            sizes.add(opened.size)
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise ControlError(
            f"controls need square synthetic images of one size per class, found {sorted(sizes)}"
        )
    return int(next(iter(sizes))[0])


def control_png(path: Path, size: int) -> bytes:
    """A real image as a review copy's source: RGB, resampled as training data are, encoded by
    the generated images' encoder (without a provenance record)."""
    pixels = np.asarray(load_rgb(path, size), dtype=np.uint8)
    return png_with_provenance(pixels, None)


def add_control_batches(
    session: Session,
    settings: Settings,
    storage: Storage,
    controls: Controls,
    models: list[Model],
    synthetic: list[Image],
) -> list[Batch]:
    """One stored control batch per class of ``synthetic`` (the images a request sends), each
    holding ``controls.count`` real held-out images at that class's synthetic size. Checks
    everything before storing anything."""
    controls.check()
    dataset = session.get(Dataset, controls.dataset_id)
    if dataset is None:
        known = ", ".join(
            f"{i} ({n})" for i, n in session.execute(select(Dataset.id, Dataset.name))
        )
        raise ControlError(f"no dataset with id {controls.dataset_id}; known: {known or 'none'}")
    per_class = Counter(img.class_name for img in synthetic)
    root = _local_root(dataset, settings, storage)
    try:
        catalog = scan(root, dataset.layout, settings.dataset_roots())
    except (DataError, OSError) as exc:
        raise ControlError(f"dataset {dataset.id} cannot be read: {exc}") from exc
    missing = sorted(c for c in per_class if not catalog.items.get(nfc(c)))
    if missing:
        raise ControlError(
            f"dataset {dataset.id} has no images of class {', '.join(missing)}; "
            f"its classes: {', '.join(catalog.classes)}"
        )
    trained = [_trained_on(m, settings, storage) for m in {m.id: m for m in models}.values()]
    paths = {p for t in trained for p in t.paths}
    seed = controls.seed if controls.seed is not None else secrets.randbelow(MAX_ID)
    rng = random.Random(seed)
    chosen: dict[str, list[Path]] = {}
    sizes: dict[str, int] = {}
    for cls in sorted(per_class):
        want = controls.count(per_class[cls])
        sizes[cls] = image_size(storage, [i for i in synthetic if i.class_name == cls])
        candidates = [p for p in catalog.items[nfc(cls)] if str(p.resolve()) not in paths]
        rng.shuffle(candidates)
        picked: list[Path] = []
        seen: set[str] = set()
        for path in candidates:
            if len(picked) == want:
                break
            try:
                hashes = {t.image_size: image_hash(path, t.image_size) for t in trained}
                own = image_hash(path, sizes[cls])
            except (OSError, ValueError, SyntaxError):
                continue  # unreadable: not a control
            if any(hashes[t.image_size] in t.hashes for t in trained) or own in seen:
                continue
            seen.add(own)
            picked.append(path)
        if len(picked) < want:
            raise ControlError(
                f"dataset {dataset.id} has {len(picked)} usable held-out images of class "
                f"{cls!r} (outside the training split of models "
                f"{', '.join(str(m.id) for m in models)}), {want} were asked; ask for at most "
                f"{len(picked)} per class"
            )
        chosen[cls] = picked
    asked: dict[str, Any] = (
        {"per_class": controls.per_class}
        if controls.per_class is not None
        else {"share": controls.share}
    )
    batches = []
    for cls, files in chosen.items():
        batch = Batch(
            model_id=None,
            source=BatchSource.control,
            dataset_id=dataset.id,
            class_name=cls,
            n=len(files),
            guidance=0.0,
            steps=1,
            seed=seed,
            scheduler="none",
            control={
                **asked,
                "seed": seed,
                "image_size": sizes[cls],
                "files": [str(p.relative_to(catalog.root)) for p in files],
                "excluded_models": sorted(m.id for m in models),
            },
        )
        session.add(batch)
        session.flush()
        for pos, path in enumerate(files):
            data = control_png(path, sizes[cls])
            key = f"batches/{batch.id}/{cls}_{pos:04d}.png"
            storage.put_bytes(key, data, content_type="image/png")
            batch.images.append(
                Image(
                    class_name=cls,
                    index=pos,
                    storage_key=key,
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        batches.append(batch)
    session.flush()
    return batches


def png_size_auc(session: Session, storage: Storage, project_id: int) -> dict[str, Any]:
    """How well the byte size of the review copies (what reviewers download) separates real
    from synthetic images in a project: the AUC of size, real as the positive side, with the
    counts. 0.5 means size tells nothing; far from 0.5 in either direction means it does."""
    rows = session.execute(
        select(ReviewTask.token, Image.storage_key, Batch.source)
        .join(Image, ReviewTask.image_id == Image.id)
        .join(Batch, Image.batch_id == Batch.id)
        .where(ReviewTask.project_id == project_id)
    ).all()
    sizes: dict[bool, list[float]] = {True: [], False: []}
    for token, key, source in rows:
        copy = blind_png(storage.get_bytes(key), token)
        sizes[source == BatchSource.control].append(float(len(copy)))
    return {
        "project_id": project_id,
        "png_size_auc": auc(sizes[True], sizes[False]) if sizes[True] and sizes[False] else None,
        "real": len(sizes[True]),
        "synthetic": len(sizes[False]),
    }


class ControlsIn(RequestModel):
    """Real images reviewed blinded beside the synthetic ones, as a reference rate: drawn at
    random (seeded) from ``dataset_id``'s images that no reviewed model trained on, for each
    class the request sends, ``per_class`` of them or ``share`` times that class's synthetic
    images (rounded, at least 1). They are resized, encoded and served exactly like the
    synthetic images; the report shows their plausible rate and each model's difference."""

    dataset_id: int = Field(ge=1, le=MAX_ID)
    per_class: int | None = Field(default=None, ge=1, le=MAX_PER_CLASS)
    share: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_ID)

    @model_validator(mode="after")
    def _one_count(self) -> ControlsIn:
        if (self.per_class is None) == (self.share is None):
            raise ValueError("controls need per_class or share (one of them)")
        return self

    def controls(self) -> Controls:
        return Controls(self.dataset_id, self.per_class, self.share, self.seed)
