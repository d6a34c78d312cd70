"""Does prototype guidance help here? The comparison on the real datasets with the generative
side replicated, the budget chosen on a validation split and the result reported on a test split.

Per dataset:

1. Three disjoint parts per class (``bench.replication.split_three``): a test folder of real
   images the models never see, and a train+validation folder whose codebook selection draws
   ``n_train`` training and ``n_val`` validation (held-out) images per class.
2. One codebook (prototypes) from the training part, shared by every run.
3. Per generative seed ``s`` and mode: one diffusion training run (``TrainConfig.seed = s``) to
   the largest budget, keeping a checkpoint at each candidate budget; at each budget a synthetic
   set sampled with seed ``s``.
4. Per synthetic set (and the real training part) one classifier per classifier seed, tested on
   the validation and the test part. The classifier seeds are averaged within a generative run
   first; the generative seeds are the unit of every interval.
5. The budget (one for both modes) is chosen on validation F1 only; test scores are reported
   for that budget alone, with the paired prototype-minus-baseline difference over seeds.

    # the README's run (2 shared cores, about an hour):
    .venv/bin/python -m bench.compare_real --datasets derm64 --sizes 40,20,25 --budgets 200,400 \
        --epochs 20 --sample-steps 10
    .venv/bin/python -m bench.compare_real --budgets 5000,10000,20000 --backbone resnext50 \\
        --preset paper --n-synthetic 100 --clf-image-size 64 --device cuda  # the seed's protocol

Writes ``bench/results/compare_real_replicated.json`` after each dataset and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.provenance import add_threads_option, run_info, use_threads
from bench.replication import (
    SCORES,
    choose_budget,
    run_means,
    split_three,
    summarise,
)
from ml.evaluation.chance import chance_levels  # numpy only

REPO = Path(__file__).resolve().parents[1]

# Images per class: (train, validation, test). The seed tests on 50 real images per class;
# cells64 has 120 per class, so 50 test leave 50 train and 20 validation. derm64's smallest
# class (df) has 95, so its test part is 25.
DATASETS = {"cells64": (50, 20, 50), "derm64": (50, 20, 25)}
MODES = ("baseline", "prototype")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def train_runs(
    codebook_dir: Path, out: Path, mode: str, gseed: int, budgets: list[int], args: Any
) -> dict[int, Path]:
    """One training run to max(budgets); the checkpoint at each budget copied to step_B.pt.

    The trainer writes ``last.pt`` every ``checkpoint_every`` steps before it reports the step,
    so the progress callback copies it while it holds exactly that step (checked on loading)."""
    from ml.config import make_config
    from ml.diffusion.train import Progress
    from ml.pipeline import train_model
    from ml.prototypes.cpl import Codebook

    top = max(budgets)
    every = math.gcd(*budgets)
    overrides = {"mode": mode, "seed": gseed, "max_steps": top, "checkpoint_every": every}
    cfg = make_config(args.preset, {**overrides, **args.set})
    paths = {b: out / f"step_{b}.pt" for b in budgets}

    def keep(info: Progress) -> None:
        if info.step in paths and info.step < top:
            shutil.copy2(out / "last.pt", paths[info.step])

    last = train_model(
        cfg,
        out,
        codebook=Codebook.load(codebook_dir),
        progress=keep,
        device=args.device,
        show_progress=False,
    )
    shutil.copy2(last, paths[top])
    return paths


def classifier_scores(
    train_set: Any, parts: dict[str, Any], classes: list[str], args: Any, **tags: Any
) -> list[dict[str, Any]]:
    """One classifier per classifier seed on ``train_set``, scored on every part."""
    from ml.evaluation.downstream import DownstreamConfig, evaluate_classifier, train_classifier

    rows = []
    for c in args.clf_seeds:
        cfg = DownstreamConfig(
            backbone=args.backbone,
            epochs=args.epochs,
            seed=c,
            image_size=args.clf_image_size,
            device=args.device,
        )
        model = train_classifier(train_set, cfg, len(classes))
        for split, data in parts.items():
            s = evaluate_classifier(model, data.images, data.labels, classes)
            rows.append({**tags, "clf_seed": c, "split": split, **{k: s[k] for k in SCORES}})
    return rows


def run_dataset(name: str, args: Any) -> dict[str, Any]:
    from ml.data.images import load_selection
    from ml.evaluation.evaluate import synthetic_set
    from ml.models.checkpoint import load_model
    from ml.pipeline import learn_prototypes
    from ml.prototypes.cpl import CPLConfig
    from ml.prototypes.encoder import EmbeddingCache, EncoderSpec
    from ml.schemas.evaluation import EvalConfig

    n_train, n_val, n_test = args.sizes or DATASETS[name]
    out = args.out / name
    t0, times = time.perf_counter(), {}
    counts = split_three(args.data / name, out, n_test, seed=args.split_seed)
    # the models' image size (the preset's): real images are loaded at it everywhere
    from ml.config import make_config

    size = make_config(args.preset, args.set).image_size
    spec = EncoderSpec(args.encoder, args.pretrained)
    selection = {
        "root": out / "trainval",
        "n_per_class": n_train,
        "n_heldout": n_val,
        "image_size": size,
        "seed": args.split_seed,
    }
    learn_prototypes(
        selection,
        out / "codebook",
        encoder_spec=spec,
        cpl=CPLConfig(seed=0),
        allow_untrained=args.pretrained is None,
        cache=EmbeddingCache(),
        device=args.device,
    )
    times["codebook_s"] = time.perf_counter() - t0
    from ml.prototypes.cpl import Codebook

    split = load_selection({**Codebook.load(out / "codebook").selection, "image_size": size})
    classes = list(split.classes)
    # the test part as an external test set, read as `protomed evaluate --test-data` reads one
    # (every model class required, classes matched by name)
    from ml.evaluation.evaluate import external_test_set

    test, _info = external_test_set(out / "test", classes, size)
    parts = {"validation": split.heldout, "test": test}
    sizes = {
        "train": split.train.per_class_counts(),
        "validation": split.heldout.per_class_counts(),
        "test": test.per_class_counts(),
    }
    print(f"== {name}: {sizes}", flush=True)

    records = classifier_scores(
        split.train, parts, classes, args, mode="real", gseed=None, budget=None
    )
    t1 = time.perf_counter()
    for g in args.gen_seeds:
        for mode in MODES:
            run = out / f"{mode}_seed{g}"
            ckpts = train_runs(out / "codebook", run, mode, g, args.budgets, args)
            times[f"train_{mode}_{g}_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            for b, path in ckpts.items():
                model = load_model(path, device=args.device or "cpu")
                if model.step != b:
                    raise RuntimeError(f"{path} holds step {model.step}, not {b}")
                ecfg = EvalConfig(
                    n_per_class=args.n_synthetic,
                    steps=args.sample_steps,
                    scheduler=args.scheduler,
                    seed=g,
                )
                synth = synthetic_set(model, split.train.per_class_counts(), ecfg, lambda: None)
                records += classifier_scores(
                    synth, parts, classes, args, mode=mode, gseed=g, budget=b
                )
                if args.partial is not None:  # a run cut short still leaves its records
                    args.partial.write_text(json.dumps(records))
                print(
                    f"  {mode} seed {g} step {b}: validation F1 "
                    f"{_mean_f1(records, mode, g, b, 'validation'):.3f}",
                    flush=True,
                )
            times[f"evaluate_{mode}_{g}_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()

    gen = [r for r in records if r["mode"] != "real"]
    means = run_means(gen)
    budget, val_f1 = choose_budget(means, MODES)
    real = run_means([r for r in records if r["mode"] == "real"])
    return {
        "sizes_per_class": sizes,
        "split_counts": counts,
        "candidate_budgets": args.budgets,
        "validation_f1_by_budget": val_f1,
        "chosen_budget": budget,
        "budget_rule": "one budget for both modes: the highest validation macro F1 averaged over "
        "both modes and all generative seeds (smaller budget on a tie); test never consulted",
        # what a classifier that learnt nothing scores on each part: every F1 is read against it
        "chance": {
            part: chance_levels(list(sizes[part].values())).model_dump()
            for part in ("validation", "test")
        },
        "validation": {str(b): summarise(means, "validation", b, MODES) for b in args.budgets},
        "test": summarise(means, "test", budget, MODES),
        "real": {r["split"]: r for r in real},
        "real_runs": [r for r in records if r["mode"] == "real"],
        # classifier-level records: every validation run, and test only at the chosen budget
        "runs": [r for r in gen if r["split"] == "validation" or r["budget"] == budget],
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _mean_f1(records: list[dict[str, Any]], mode: str, g: int, b: int, split: str) -> float:
    xs = [
        float(r["f1"])
        for r in records
        if (r["mode"], r["gseed"], r["budget"], r["split"]) == (mode, g, b, split)
    ]
    return sum(xs) / len(xs)


def _ci(s: dict[str, Any]) -> str:
    if s["ci"] is None:
        return f"{100 * s['mean']:.1f}"
    return (
        f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f} "
        f"[{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"
    )


def chance_cells(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The test part's chance rows of the README table (none in results without them)."""
    test = (r.get("chance") or {}).get("test")
    if not test:
        return []
    u, m = test["uniform"], test["majority"]
    uniform = f"{100 * u['f1']:.1f} (95% range {100 * u['f1_low']:.1f}-{100 * u['f1_high']:.1f})"
    return [("chance: uniform guess", uniform), ("chance: majority class", f"{100 * m['f1']:.1f}")]


def markdown(results: dict[str, Any]) -> str:
    """The README table: test-split scores at the budget chosen on validation."""
    lines = [
        "| dataset | budget (chosen on validation) | training set | n gen. seeds | F1 test | "
        "precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        b = r["chosen_budget"]
        real = r["real"]["test"]
        clf = [x["f1"] for x in r["real_runs"] if x["split"] == "test"]
        sd = (
            f" ± {100 * statistics.stdev(clf):.1f} (sd over classifier seeds)"
            if len(clf) > 1
            else ""
        )
        lines.append(
            f"| {name} | - | real | - | {100 * real['f1']:.1f}{sd} | "
            f"{100 * real['precision']:.1f} | {100 * real['recall']:.1f} |"
        )
        for mode in MODES:
            m = r["test"]["modes"][mode]
            lines.append(
                f"| {name} | {b} | {mode} | {m['f1']['n']} | {_ci(m['f1'])} | "
                f"{100 * m['precision']['mean']:.1f} | "
                f"{100 * m['recall']['mean']:.1f} |"
            )
        for label, level in chance_cells(r):
            lines.append(f"| {name} | - | {label} | - | {level} | | |")
        d = r["test"]["paired"]["f1"]
        per = ", ".join(f"{100 * x:+.1f}" for x in d["differences"])
        p = "-" if d["p_paired_t"] is None else f"{d['p_paired_t']:.2f}"
        lines.append(
            f"| {name} | {b} | prototype - baseline (paired) | {d['n']} | {_ci(d)} "
            f"(seeds: {per}; p {p}) | | |"
        )
    return "\n".join(lines)


def add_shared_args(
    ap: argparse.ArgumentParser,
    *,
    clf_seeds: list[int],
    set_default: dict[str, Any],
    sample_steps: int,
    scheduler: str,
    epochs: int,
) -> None:
    """The arguments of both real-data comparisons (this one and ``bench/ablation.py``): where
    the data is, how it is split, what is trained, and how each synthetic set is scored."""
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("PROTOMED_DATA_DIR", REPO.parent / "shared" / "data")),
    )
    ap.add_argument(
        "--sizes",
        type=_ints,
        default=None,
        help="train,validation,test images per class (default: by dataset)",
    )
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--clf-seeds", type=_ints, default=clf_seeds)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument(
        "--set",
        type=json.loads,
        default=set_default,
        help="TrainConfig overrides as JSON, e.g. '{\"batch_size\": 8}'",
    )
    ap.add_argument(
        "--n-synthetic",
        type=int,
        default=None,
        help="synthetic images per class (default: as many as real train)",
    )
    ap.add_argument("--sample-steps", type=int, default=sample_steps)
    ap.add_argument("--scheduler", default=scheduler)
    ap.add_argument("--backbone", default="small", help="small, resnet18 or resnext50 (seed's)")
    ap.add_argument("--epochs", type=int, default=epochs, help="classifier epochs")
    ap.add_argument("--clf-image-size", type=int, default=32)
    ap.add_argument("--device", default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shared_args(
        ap, clf_seeds=[0, 1, 2], set_default={}, sample_steps=20, scheduler="ddim", epochs=30
    )
    ap.add_argument("--datasets", default="derm64")
    ap.add_argument(
        "--gen-seeds",
        type=_ints,
        default=[0, 1, 2],
        help="diffusion training and sampling seeds, per mode",
    )
    ap.add_argument(
        "--budgets",
        type=_ints,
        default=[300, 600, 1200],
        help="candidate training steps (one run per seed to the largest)",
    )
    ap.add_argument("--encoder", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None, help="CLIP weights (default: untrained)")
    add_threads_option(ap)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "compare_replicated")
    ap.add_argument(
        "--results", type=Path, default=REPO / "bench" / "results" / "compare_real_replicated.json"
    )
    args = ap.parse_args()
    if sorted(set(args.budgets)) != args.budgets:
        ap.error("--budgets must be increasing and distinct")
    use_threads(args)
    args.partial = args.out / "records_partial.json"
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "run": run_info(args),
        "load_avg_start": os.getloadavg(),
        "datasets": {},
    }
    t0 = time.perf_counter()
    for name in args.datasets.split(","):
        results["datasets"][name] = run_dataset(name, args)
        results["wall_s"] = round(time.perf_counter() - t0, 1)
        results["load_avg_end"] = os.getloadavg()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2))
    print(markdown(results), flush=True)
    print(f"wrote {args.results} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
