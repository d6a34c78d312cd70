"""The plausibility scorer on the toy domain, with the rule-based checker standing in for experts.

1. Train a small baseline model on toy cells (``cpu-small`` + the demo's recipe).
2. Draw a pool of images per class; the checker's verdict on each is the "expert" label.
3. Split the pool (stratified by class and verdict) into scorer-training and held-out halves;
   fit the scorer (``ml.scorer``: the project's CLIP encoder, untrained here, plus the class)
   on the first: its nested-CV AUC; score the second: the AUC on held-out verdicts.
4. Draw fresh images with new seeds: an unfiltered batch of ``n`` per class, and a filtered one
   that draws ``n * oversample`` per class and keeps the ``n`` the scorer rates highest (the
   service's ``filter=plausible``, ``ml.scorer.keep``). Checker plausibility of both with Wilson
   intervals and the filtered-minus-unfiltered difference (Newcombe), per class and pooled.

Nothing is tuned: the scorer's only knob (its L2 strength) is chosen by inner CV on its training
half; the held-out half and the fresh draws are looked at once.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.scorer_toy --out /tmp/scorer_toy \\
        --json bench/results/scorer_toy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.provenance import run_info
from ml.evaluation.intervals import newcombe_difference, wilson
from ml.scorer import ScorerError, assess, fit_scorer, keep

REPO = Path(__file__).resolve().parents[1]


def rate(k: int, n: int) -> dict[str, Any]:
    return {"plausible": k, "n": n, "rate": k / n if n else None, "ci": wilson(k, n)}


def compare(k_f: int, n_f: int, k_u: int, n_u: int) -> dict[str, Any]:
    """Filtered minus unfiltered checker rate with Newcombe's interval."""
    return {
        "filtered": rate(k_f, n_f),
        "unfiltered": rate(k_u, n_u),
        "difference": k_f / n_f - k_u / n_u,
        "difference_ci": newcombe_difference(k_u, n_u, k_f, n_f),
    }


def main() -> None:
    import torch

    from ml.config import SampleConfig, make_config
    from ml.data.toy import TOY_CLASSES, check_image, write_toy_dataset
    from ml.demo import DEMO_RECIPE, DEMO_SAMPLE_STEPS
    from ml.diffusion.sample import generate
    from ml.models.checkpoint import load_model
    from ml.pipeline import train_model
    from ml.prototypes.encoder import ClipEncoder, EncoderSpec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/scorer_toy"))
    ap.add_argument("--json", type=Path, default=REPO / "bench/results/scorer_toy.json")
    ap.add_argument("--steps", type=int, default=600, help="training steps")
    ap.add_argument("--pool", type=int, default=100, help="reviewed images per class")
    ap.add_argument("--n", type=int, default=40, help="images kept per class and batch")
    ap.add_argument("--oversample", type=int, default=3)
    ap.add_argument("--encoder", default="ViT-B-32", help="open_clip name (untrained weights)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    data = write_toy_dataset(args.out / "data", n_per_class=100, size=64, seed=args.seed)
    ckpt = args.out / "run" / "last.pt"
    cfg = make_config(
        "cpu-small", {**DEMO_RECIPE, "mode": "baseline", "max_steps": args.steps, "seed": args.seed}
    )
    if not ckpt.is_file():
        ckpt = train_model(cfg, args.out / "run", root=data, device="cpu", show_progress=False)
    times["train_s"] = time.perf_counter() - t0
    loaded = load_model(ckpt, use_ema=True, device="cpu")
    encoder = ClipEncoder(EncoderSpec(args.encoder, None), allow_untrained=True, device="cpu")

    def draw(
        cls: str, n: int, seed: int
    ) -> tuple[torch.Tensor, npt.NDArray[np.int_], npt.NDArray[np.float32]]:
        scfg = SampleConfig(seed=seed, steps=DEMO_SAMPLE_STEPS, batch_size=min(n, 64))
        imgs = generate(loaded, cls, n, scfg)
        verdicts = np.array(
            [check_image(im.permute(1, 2, 0).numpy(), cls).plausible for im in imgs], dtype=int
        )
        return imgs, verdicts, encoder.encode(imgs).numpy()

    # 2-3. the reviewed pool, split in halves stratified by (class, verdict)
    t1 = time.perf_counter()
    xs, ys, cs = [], [], []
    for cls in TOY_CLASSES:
        _imgs, y, x = draw(cls, args.pool, seed=1000 + args.seed)
        xs.append(x)
        ys.append(y)
        cs += [cls] * len(y)
    x, y, cs_arr = np.concatenate(xs), np.concatenate(ys), np.array(cs)
    times["pool_s"] = time.perf_counter() - t1
    rng = np.random.default_rng(args.seed)
    train_idx, held_idx = [], []
    for key in sorted({f"{c}|{v}" for c, v in zip(cs_arr, y, strict=True)}):
        members = np.flatnonzero(
            np.array([f"{c}|{v}" for c, v in zip(cs_arr, y, strict=True)]) == key
        )
        rng.shuffle(members)
        half = len(members) // 2
        train_idx += list(members[:half])
        held_idx += list(members[half:])
    train, held = np.array(sorted(train_idx)), np.array(sorted(held_idx))
    try:
        scorer, metrics = fit_scorer(
            x[train], y[train], list(cs_arr[train]), encoder.identity, seed=args.seed
        )
    except ScorerError as exc:  # a model trained too briefly draws no plausible image
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "run": run_info(args),
                    "refused": str(exc),
                    "pool_plausible": int(y.sum()),
                    "pool": len(y),
                }
            )
            + "\n"
        )
        print(f"no scorer: {exc}")
        return
    held_p = scorer.score(x[held], list(cs_arr[held]))
    held_report = assess(y[held], held_p)
    per_class_held = {}
    for cls in TOY_CLASSES:
        m = cs_arr[held] == cls
        a = assess(y[held][m], held_p[m])
        per_class_held[cls] = {
            "n": a.n,
            "plausible": a.n_plausible,
            "auc": a.auc,
            "auc_ci": a.auc_ci,
        }

    # 4. fresh draws: unfiltered n vs filtered top-n of n * oversample
    t2 = time.perf_counter()
    per_class, tot = {}, [0, 0, 0, 0]
    for cls in TOY_CLASSES:
        _imgs, y_u, _x = draw(cls, args.n, seed=2000 + args.seed)
        _imgs, y_d, x_d = draw(cls, args.n * args.oversample, seed=3000 + args.seed)
        kept = keep(scorer.score(x_d, [cls] * len(x_d)), args.n)
        k_f, k_u = int(y_d[kept].sum()), int(y_u.sum())
        per_class[cls] = {
            **compare(k_f, args.n, k_u, args.n),
            "drawn_plausible": rate(int(y_d.sum()), len(y_d)),
        }
        tot = [tot[0] + k_f, tot[1] + args.n, tot[2] + k_u, tot[3] + args.n]
    times["draws_s"] = time.perf_counter() - t2
    result = {
        "setup": {
            "model": "baseline, cpu-small + DEMO_RECIPE (24x24, min-SNR)",
            "train_steps": args.steps,
            "sampler": f"dpm++sde, {DEMO_SAMPLE_STEPS} steps",
            "encoder": encoder.identity,
            "encoder_note": "UNTRAINED weights (random features); the class is also an input",
            "pool_per_class": args.pool,
            "n_per_class": args.n,
            "oversample": args.oversample,
            "verdicts": "ml.data.toy.check_image (rule-based checker) as the expert",
            "seed": args.seed,
        },
        "scorer": {
            "n_train": len(train),
            "cv": metrics.cv.model_dump(),
            "c": metrics.c,
            "folds": metrics.folds,
            "heldout": held_report.model_dump(),
            "heldout_per_class": per_class_held,
        },
        "filter": {"pooled": compare(*tot), "per_class": per_class},
        "seconds": {
            **{k: round(v, 1) for k, v in times.items()},
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"run": run_info(args), **result}, indent=2) + "\n")
    pooled = result["filter"]["pooled"]
    cv, ho = metrics.cv, held_report
    print(
        f"scorer: CV AUC {cv.auc:.3f} {cv.auc_ci} on {cv.n}; held-out AUC {ho.auc:.3f} "
        f"{ho.auc_ci} on {ho.n} (base rate {ho.base_rate:.2f})"
    )
    print(
        f"filtered {pooled['filtered']['rate']:.3f} vs unfiltered "
        f"{pooled['unfiltered']['rate']:.3f}: difference {pooled['difference']:+.3f} "
        f"{pooled['difference_ci']}"
    )
    print(json.dumps(result["seconds"]))


if __name__ == "__main__":
    main()
