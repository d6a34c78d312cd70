"""Held-out nearest-prototype accuracy on the real datasets, next to a majority-class baseline and
a logistic-regression probe on the same CLIP embeddings.

    python -m bench.prototype_probe --encoder ViT-L-14 --pretrained openai      # with real weights
    python -m bench.prototype_probe --encoder ViT-B-32 --untrained              # offline
    # toy size (tests/test_bench.py), on a folder written by `protomed toy DATA/toy`:
    python -m bench.prototype_probe --data DATA --datasets toy --encoder protomed-tiny-vit \\
        --untrained --n-per-class 8 --heldout 4 --k 1 --out /tmp/probe.json

Data from --data (default PROTOMED_DATA_DIR, else ../shared/data). Writes a JSON file: ``run``
(``bench.provenance.run_info``) and one row per dataset and K.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.provenance import run_info
from ml.data.catalog import data_dir
from ml.pipeline import learn_prototypes
from ml.prototypes.cpl import CPLConfig
from ml.prototypes.encoder import EmbeddingCache, EncoderSpec

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="default: PROTOMED_DATA_DIR")
    ap.add_argument("--datasets", nargs="+", default=["derm64", "cells64"])
    ap.add_argument("--encoder", default="ViT-L-14")
    ap.add_argument("--pretrained", default="openai")
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--n-per-class", type=int, default=70)
    ap.add_argument("--heldout", type=int, default=25)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--work", type=Path, default=None, help="codebooks (default: a temporary dir)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prototype_probe.json")
    args = ap.parse_args()
    info = run_info(args)
    data = args.data or data_dir()
    spec = EncoderSpec(args.encoder, None if args.untrained else args.pretrained)
    cache = EmbeddingCache()
    rows = []
    with tempfile.TemporaryDirectory(prefix="protomed-probe-") as tmp:
        work = args.work or Path(tmp)
        for name in args.datasets:
            for k in args.k:
                t0 = time.perf_counter()
                selection = {
                    "root": data / name,
                    "n_per_class": args.n_per_class,
                    "n_heldout": args.heldout,
                }
                run = learn_prototypes(
                    selection,
                    work / f"{name}-k{k}",
                    encoder_spec=spec,
                    cpl=CPLConfig(k=k),
                    allow_untrained=args.untrained,
                    cache=cache,
                )
                rep = run.report.to_dict()
                rows.append(
                    {
                        "dataset": name,
                        "k": k,
                        "encoder": run.codebook.encoder,
                        "classes": list(run.codebook.classes),
                        **rep,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                print(
                    f"{name:<8} K={k}  nearest-prototype {rep['nearest_prototype_acc']:.3f}  "
                    f"majority {rep['majority_acc']:.3f}  logreg {rep['logreg_acc']:.3f}  "
                    f"intra/inter {rep['intra_inter_ratio']:.3f}  ({rows[-1]['seconds']} s)",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": info, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
