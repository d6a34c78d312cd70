"""The memorisation audit's figures: planted copies of training images (exact, flipped, with
Gaussian pixel noise of sd 1%, 2%, 4% of the range) are audited with the held-out split, on the
toy domain and the shared real data; prints and writes flag rates per kind and the false-flag
rate on the held-out check images (real images the thresholds never saw).

    python -m bench.audit_planted --out bench/results/audit_planted.json

Uses the untrained tiny encoder (no weights offline), so CLIP space is random features here and
the pixel space does the work. Runs in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from bench.provenance import run_info
from ml.audit import audit_images
from ml.data.images import DatasetSplit, load_split
from ml.data.toy import write_toy_dataset
from ml.prototypes.encoder import ClipEncoder, EncoderSpec
from ml.prototypes.weights import TINY_MODEL

KINDS = {"exact": None, "flipped": None, "noise 1%": 0.01, "noise 2%": 0.02, "noise 4%": 0.04}
PER_KIND = 10  # per kind and class


def planted(split: DatasetSplit, gen: torch.Generator) -> tuple[torch.Tensor, list[str], list[str]]:
    images, classes, kinds = [], [], []
    for c, name in enumerate(split.classes):
        idx = torch.nonzero(split.train.labels == c).flatten()
        for k, (kind, sd) in enumerate(KINDS.items()):
            src = split.train.images[idx[k * PER_KIND : (k + 1) * PER_KIND]]
            if kind == "flipped":
                src = src.flip(-1)
            elif sd is not None:
                noisy = src.float() + torch.randn(src.shape, generator=gen) * sd * 255
                src = noisy.round().clamp(0, 255).to(torch.uint8)
            images.append(src)
            classes += [name] * len(src)
            kinds += [kind] * len(src)
    return torch.cat(images), classes, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(
            os.environ.get(
                "PROTOMED_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"
            )
        ),
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--toy-only", action="store_true")
    args = ap.parse_args()
    encoder = ClipEncoder(EncoderSpec(TINY_MODEL, None), device="cpu", allow_untrained=True)
    toy = write_toy_dataset(Path(tempfile.mkdtemp()), n_per_class=160, size=32, seed=0)
    sets = {"toy 32 px": (toy, ["lymphocyte", "neutrophil", "monocyte"], 32, 60, 100)}
    if not args.toy_only:
        sets["derm64"] = (args.data / "derm64", ["mel", "nv", "bkl"], 64, 50, 60)
        sets["cells64"] = (
            args.data / "cells64",
            ["lymphocyte", "neutrophil", "monocyte"],
            64,
            50,
            70,
        )
    results = {}
    for name, (root, classes, size, n_train, n_held) in sets.items():
        split = load_split(
            root, n_per_class=n_train, n_heldout=n_held, image_size=size, classes=classes
        )
        images, image_classes, kinds = planted(split, torch.Generator().manual_seed(1))
        rep = audit_images(images, image_classes, split, encoder, flips=True)
        row: dict[str, object] = {}
        for kind in KINDS:
            flags = [a.flagged for a, k in zip(rep.images, kinds, strict=True) if k == kind]
            row[kind] = [sum(flags), len(flags)]
        t = rep.totals
        cal = rep.per_class[0].calibration
        row.update(
            heldout_per_class=n_held,
            calibration_per_class=cal.n_calibration,
            check=[t.check_flagged, t.n_check],
            check_upper95=t.check_upper95,
            expected=cal.expected_false_flag_rate,
            seconds=rep.seconds,
        )
        results[name] = row
        print(name, json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"run": run_info(args), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
