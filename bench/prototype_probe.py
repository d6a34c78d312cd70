"""Held-out nearest-prototype accuracy on the real datasets, next to a majority-class baseline and
a logistic-regression probe on the same CLIP embeddings.

    python bench/prototype_probe.py --encoder ViT-L-14 --pretrained openai      # with real weights
    python bench/prototype_probe.py --encoder ViT-B-32 --untrained              # offline

Data from PROTOMED_DATA_DIR (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ml.data.images import data_dir
from ml.pipeline import learn_prototypes
from ml.prototypes.cpl import CPLConfig
from ml.prototypes.encoder import EmbeddingCache, EncoderSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", nargs="+", default=["derm64", "cells64"])
    ap.add_argument("--encoder", default="ViT-L-14")
    ap.add_argument("--pretrained", default="openai")
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--n-per-class", type=int, default=70)
    ap.add_argument("--heldout", type=int, default=25)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--out", type=Path, default=Path("bench/results/prototype_probe.json"))
    args = ap.parse_args()
    spec = EncoderSpec(args.encoder, None if args.untrained else args.pretrained)
    cache = EmbeddingCache()
    rows = []
    for name in args.datasets:
        for k in args.k:
            t0 = time.perf_counter()
            selection = {"root": data_dir() / name, "n_per_class": args.n_per_class,
                         "n_heldout": args.heldout}  # fmt: skip
            run = learn_prototypes(
                selection, Path("/tmp/protomed-probe") / f"{name}-k{k}", encoder_spec=spec,
                cpl=CPLConfig(k=k), allow_untrained=args.untrained, cache=cache,
            )  # fmt: skip
            rep = run.report.to_dict()
            rows.append({"dataset": name, "k": k, "encoder": run.codebook.encoder, **rep,
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(
                f"{name:<8} K={k}  nearest-prototype {rep['nearest_prototype_acc']:.3f}  "
                f"majority {rep['majority_acc']:.3f}  logreg {rep['logreg_acc']:.3f}  "
                f"intra/inter {rep['intra_inter_ratio']:.3f}  ({rows[-1]['seconds']} s)",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
