"""Frozen prototypes against learnable class embeddings, head to head, against training steps.

ProtoDiffusion's only claim is faster convergence ("best performance in shorter times"); no
published study compares frozen prototypes with learnable class embeddings on small medical sets.
Four arms, the same UNet and the same class-table width (the learned codebook's), per dataset:

- ``baseline``: a randomly initialised, learnable class table (the seed's baseline);
- ``frozen-learned``: frozen prototypes of the domain encoder learned from the training part
  (``protomed prototypes --encoder learned``; the method as protomed runs it without weights);
- ``frozen-untrained``: frozen prototypes fitted on the same network left untrained (what the
  product did before it had a learned encoder: prototypes of random features);
- ``unfrozen-learned``: the learned prototypes as the initial table, trained with the model
  (ProtoDiffusion's ``proto_unfrozen``).

Protocol (``bench/compare_real.py``'s, with steps as the budget): three disjoint parts per class
(train, validation, test); both codebooks from the train part; per arm and generative seed one
training run with a checkpoint at each step in ``--steps``; at each checkpoint a synthetic set as
large as the real train part (sampled with the run's seed) trains one classifier per classifier
seed, scored on the validation and the test part. Classifier seeds are averaged within a run; the
generative seeds are the unit of every interval, and every arm is paired with the baseline by
seed. The headline step (one for all arms) is the best mean validation F1 over arms and seeds;
the curves show every step's test F1, beside the chance level of the test part.

Runs go to ``--jobs`` worker processes (one torch thread each on a CPU); each finished run is
kept under ``--out`` and reused when the command is run again with the same arguments, so an
interrupted ablation resumes where it stopped.

    # 2 CPU cores (README, "Does prototype guidance matter here?"):
    .venv/bin/python -m bench.ablation --datasets cells64,derm64 --seeds 0,1,2
    # the seed's sizes on a GPU (64 px, Table 2's UNet, ResNeXt-50 classifiers, 100 per class):
    .venv/bin/python -m bench.ablation --preset paper --set '{}' --steps 5000,10000,20000 \\
        --sample-steps 50 --scheduler ddim --backbone resnext50 --clf-image-size 64 \\
        --epochs 30 --jobs 1 --device cuda

Writes ``bench/results/ablation.json`` (its ``run``: the commit, the arguments and the machine,
``bench.provenance.run_info``) and ``docs/ablation.png`` (test F1 against steps, one line per
arm, a band over seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.compare_real import (
    DATASETS,
    _ints,
    add_shared_args,
    classifier_scores,
    train_runs,
)
from bench.provenance import add_threads_option, run_info, use_threads
from bench.replication import (
    choose_budget,
    run_means,
    seed_interval,
    split_three,
    summarise,
)
from ml.evaluation.chance import chance_levels  # numpy only

REPO = Path(__file__).resolve().parents[1]

# arm -> (codebook, TrainConfig overrides); every arm trains with a codebook, so the baseline's
# learnable table takes the same width (ml.diffusion.train.class_width) and the same training
# images.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("learned", {"mode": "baseline"}),
    "frozen-learned": ("learned", {"mode": "prototype"}),
    "frozen-untrained": ("untrained", {"mode": "prototype"}),
    "unfrozen-learned": ("learned", {"mode": "prototype", "freeze_prototypes": False}),
}
# A recipe sized for 2 CPU cores whose baseline beats chance on cells64's validation part
# (bench/results/recipe_probe_cells64.json): 24 px, min-SNR weighting, the cpu-small UNet.
CPU_RECIPE = {"image_size": 24, "loss_weighting": "min_snr"}


# ---------------------------------------------------------------- the parts and the codebooks


def prepare(name: str, args: Any) -> dict[str, Any]:
    """The three parts and both codebooks of one dataset (written once, reused on a rerun)."""
    from ml.config import make_config
    from ml.data.images import load_selection
    from ml.pipeline import image_keys, learn_prototypes
    from ml.prototypes.cpl import Codebook, CPLConfig, fit_prototypes
    from ml.prototypes.encoder import EmbeddingCache, EncoderSpec
    from ml.prototypes.learned_encoder import DomainEncoderConfig, untrained_encoder

    n_train, n_val, n_test = args.sizes or DATASETS[name]
    out = args.out / name
    counts = split_three(args.data / name, out, n_test, seed=args.split_seed)
    size = make_config(args.preset, args.set).image_size
    selection = {
        "root": out / "trainval",
        "n_per_class": n_train,
        "n_heldout": n_val,
        "image_size": size,
        "seed": args.split_seed,
    }
    cpl = CPLConfig(seed=0)
    domain = DomainEncoderConfig(seed=0, epochs=args.encoder_epochs)
    learned, untrained = out / "codebook-learned", out / "codebook-untrained"
    if not (learned / "codebook.json").exists():
        learn_prototypes(
            selection,
            learned,
            encoder_spec=EncoderSpec("learned"),
            cpl=cpl,
            cache=EmbeddingCache(),
            domain=domain,
        )
    split = load_selection({**Codebook.load(learned).selection, "image_size": size})
    if not (untrained / "codebook.json").exists():
        enc = untrained_encoder(split.train.images, list(split.classes), cpl, domain)
        enc.save(untrained)
        book, _ = fit_prototypes(
            enc.encode(split.train.images),
            split.train.labels,
            split.classes,
            cpl,
            heldout_emb=enc.encode(split.heldout.images),
            heldout_labels=split.heldout.labels,
            encoder_identity=enc.identity,
            hashes=image_keys(split.train),
        )
        book.selection = dict(split.selection)
        book.save(untrained)
    books = {k: Codebook.load(out / f"codebook-{k}") for k in ("learned", "untrained")}
    return {
        "split_counts": counts,
        "real": real_scores(name, args),
        "codebooks": {
            k: {
                "nearest_prototype_acc_heldout": b.report.get("nearest_prototype_acc"),
                "logreg_acc_heldout": b.report.get("logreg_acc"),
                **table_spread(b.table().float()),
            }
            for k, b in books.items()
        },
    }


def table_spread(table: Any) -> dict[str, float]:
    """How far apart a class table's rows are (Euclidean): the size of the class signal the
    UNet's condition MLP receives, beside the rows' norm."""
    import torch

    gaps = torch.pdist(table)
    return {
        "row_norm_mean": float(table.norm(dim=1).mean()),
        "row_gap_min": float(gaps.min()),
        "row_gap_mean": float(gaps.mean()),
    }


def checkpoint_spreads(runs: Path, arms: list[str], steps: list[int]) -> dict[str, Any]:
    """:func:`table_spread` of each arm's class table (EMA weights) at each step of seed 0:
    frozen tables stay where they began, learnt ones show how far training spread them."""
    from ml.models.checkpoint import read_checkpoint

    out: dict[str, Any] = {}
    for arm in arms:
        for step in steps:
            path = runs / f"{arm}_seed0" / f"step_{step}.pt"
            if path.is_file():
                ckpt = read_checkpoint(path)
                state = ckpt.get("ema") or ckpt["model"]
                table = state["class_embed.weight"].float()
                out.setdefault(arm, {})[str(step)] = table_spread(table)
    return out


def load_parts(name: str, args: Any) -> tuple[Any, Any]:
    """The codebooks' split (train, validation) and the test part, at the models' image size."""
    from ml.config import make_config
    from ml.data.images import load_selection
    from ml.evaluation.evaluate import external_test_set
    from ml.prototypes.cpl import Codebook

    out = args.out / name
    size = make_config(args.preset, args.set).image_size
    split = load_selection(
        {**Codebook.load(out / "codebook-learned").selection, "image_size": size}
    )
    test, _info = external_test_set(out / "test", list(split.classes), size)
    return split, test


def real_scores(name: str, args: Any) -> dict[str, dict[str, Any]]:
    """The ceiling: classifiers trained on the real train part, scored on both parts (kept)."""
    done = args.out / name / "real.json"
    key = _unit_key(args, name, "real", -1)
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return dict(json.loads(done.read_text())["scores"])
    split, test = load_parts(name, args)
    classes = list(split.classes)
    parts = {"validation": split.heldout, "test": test}
    rows = classifier_scores(
        split.train, parts, classes, args, mode="real", gseed=None, budget=None
    )
    scores = {r["split"]: r for r in run_means(rows)}
    done.write_text(json.dumps({"key": key, "scores": scores}))
    return scores


# ---------------------------------------------------------------- one run (a worker process)


def steps_of(args: Any, name: str) -> list[int]:
    """The checkpoints scored on one dataset: ``--steps``, or its ``--steps-for`` list."""
    return list(args.steps_for.get(name, args.steps))


def _unit_key(args: Any, name: str, arm: str, seed: int) -> str:
    """What a finished run's records depend on: reused only when all of it is unchanged."""
    keys = (
        "data",
        "sizes",
        "split_seed",
        "steps",
        "preset",
        "set",
        "sample_steps",
        "scheduler",
        "n_synthetic",
        "backbone",
        "epochs",
        "clf_image_size",
        "clf_seeds",
        "encoder_epochs",
    )
    what = {k: str(getattr(args, k)) for k in keys} | {"dataset": name, "arm": arm, "seed": seed}
    what["steps"] = str(steps_of(args, name))
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_arm(name: str, arm: str, seed: int, args: Any) -> list[dict[str, Any]]:
    """Train one arm with one seed, and score every checkpoint's synthetic set."""

    from ml.evaluation.evaluate import synthetic_set
    from ml.models.checkpoint import load_model
    from ml.schemas.evaluation import EvalConfig

    out = args.out / name
    done = out / "runs" / f"{arm}_seed{seed}.json"
    key = _unit_key(args, name, arm, seed)
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return list(json.loads(done.read_text())["records"])
    t0 = time.perf_counter()
    book_name, overrides = ARMS[arm]
    codebook = out / f"codebook-{book_name}"
    split, test = load_parts(name, args)
    classes = list(split.classes)
    parts = {"validation": split.heldout, "test": test}
    steps = steps_of(args, name)
    run_args = SimpleNamespace(**{**vars(args), "set": {**args.set, **overrides}})
    mode = overrides["mode"]
    ckpts = train_runs(codebook, out / "runs" / f"{arm}_seed{seed}", mode, seed, steps, run_args)
    train_s = time.perf_counter() - t0
    records: list[dict[str, Any]] = []
    for step, path in ckpts.items():
        model = load_model(path, device=args.device or "cpu")
        if model.step != step:
            raise RuntimeError(f"{path} holds step {model.step}, not {step}")
        ecfg = EvalConfig(
            n_per_class=args.n_synthetic,
            steps=args.sample_steps,
            scheduler=args.scheduler,
            seed=seed,
        )
        synth = synthetic_set(model, split.train.per_class_counts(), ecfg, lambda: None)
        records += classifier_scores(synth, parts, classes, args, mode=arm, gseed=seed, budget=step)
    times = {"train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps({"key": key, "records": records, "times": times}))
    return records


# ---------------------------------------------------------------- aggregation


def aggregate(records: list[dict[str, Any]], arms: list[str], steps: list[int]) -> dict[str, Any]:
    """Per arm and step the interval over generative seeds of each score on each part, every
    arm paired with the baseline by seed at each step, and the headline step chosen on
    validation only (one for every arm)."""
    means = run_means(records)
    step, val_f1 = choose_budget(means, arms)
    others = [a for a in arms if a != "baseline"]
    curves: dict[str, Any] = {}
    for split in ("validation", "test"):
        curves[split] = {
            arm: {
                str(s): seed_interval(
                    [
                        r["f1"]
                        for r in means
                        if (r["mode"], int(r["budget"]), r["split"]) == (arm, s, split)
                    ]
                )
                for s in steps
            }
            for arm in arms
        }
    paired = {
        split: {
            arm: {
                str(s): summarise(means, split, s, ("baseline", arm))["paired"]["f1"] for s in steps
            }
            for arm in others
        }
        for split in ("validation", "test")
    }
    headline = {arm: summarise(means, "test", step, ("baseline", arm)) for arm in others}
    return {
        "chosen_step": step,
        "validation_f1_by_step": val_f1,
        "step_rule": "one step for every arm: the highest validation macro F1 averaged over all "
        "arms and generative seeds (the smaller step on a tie); test never consulted",
        "f1_curves": curves,
        "paired_f1_vs_baseline": paired,
        "test_at_chosen_step": headline,
    }


# ---------------------------------------------------------------- the table and the plot


def _pct(s: dict[str, Any]) -> str:
    if s["ci"] is None:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"


def _p(p: float | None) -> str:
    """The paired t-test's p as the table prints it (none for a single seed)."""
    if p is None:
        return ""
    return ", p < 0.01" if p < 0.01 else f", p {p:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """Test macro F1 per arm at every step (mean [95% t-interval] over generative seeds), the
    paired difference from the baseline at the step chosen on validation, and chance."""
    lines = []
    for name, r in results["datasets"].items():
        if "summary" not in r:
            continue
        s, steps = r["summary"], [str(x) for x in r["steps"]]
        lines += [
            f"**{name}** (test macro F1 %, mean [95% CI] over generative seeds; step "
            f"chosen on validation: {s['chosen_step']})",
            "",
            "| arm | "
            + " | ".join(f"step {x}" for x in steps)
            + " | minus baseline at chosen step (paired) |",
            "|---|" + "---|" * (len(steps) + 1),
        ]
        for arm, curve in s["f1_curves"]["test"].items():
            diff = s["test_at_chosen_step"].get(arm, {}).get("paired", {}).get("f1")
            d = (
                "-"
                if diff is None
                else (
                    f"{100 * diff['mean']:+.1f}"
                    + (
                        ""
                        if diff["ci"] is None
                        else f" [{100 * diff['ci'][0]:+.1f}, {100 * diff['ci'][1]:+.1f}]"
                    )
                    + _p(diff["p_paired_t"])
                )
            )
            lines.append(f"| {arm} | " + " | ".join(_pct(curve[x]) for x in steps) + f" | {d} |")
        u, m = r["chance"]["test"]["uniform"], r["chance"]["test"]["majority"]
        lines.append(
            f"| chance: uniform guess | {100 * u['f1']:.1f} (95% range "
            f"{100 * u['f1_low']:.1f}-{100 * u['f1_high']:.1f}); majority class "
            f"{100 * m['f1']:.1f} |" + " |" * len(steps)
        )
        real = r.get("real", {}).get("test")
        if real:
            lines.append(f"| real train part | {100 * real['f1']:.1f} |" + " |" * len(steps))
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Test macro F1 against training steps: one line per arm (mean over seeds) with its 95%
    interval as a band, the uniform-guess chance range shaded, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results["datasets"].items() if "summary" in r]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = results["datasets"][name]
        steps = r["steps"]
        for arm, curve in r["summary"]["f1_curves"]["test"].items():
            ys = [100 * curve[str(s)]["mean"] for s in steps]
            lo = [100 * (curve[str(s)]["ci"] or [curve[str(s)]["mean"]] * 2)[0] for s in steps]
            hi = [100 * (curve[str(s)]["ci"] or [curve[str(s)]["mean"]] * 2)[1] for s in steps]
            (line,) = ax.plot(steps, ys, marker="o", label=arm)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        u = r["chance"]["test"]["uniform"]
        ax.axhspan(
            100 * u["f1_low"],
            100 * u["f1_high"],
            color="grey",
            alpha=0.2,
            label="chance (uniform guess, 95% range)",
        )
        n = r["summary"]["f1_curves"]["test"]["baseline"][str(steps[-1])]["n"]
        ax.set(
            title=f"{name}: test macro F1, {n} seeds (band: 95% CI)",
            xlabel="training steps",
            ylabel="macro F1 (%)",
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the command


def _init_worker(threads: int) -> None:
    """Each run process gets its share of the threads (the parent's choice, ``use_threads``)."""
    import torch

    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shared_args(
        ap, clf_seeds=[0], set_default=CPU_RECIPE, sample_steps=10, scheduler="dpm++sde", epochs=20
    )
    ap.add_argument("--datasets", default="cells64,derm64")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"any of {', '.join(ARMS)}")
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="generative seeds, per arm")
    ap.add_argument(
        "--steps",
        type=_ints,
        default=[500, 1000, 1500],
        help="checkpoints (training steps) scored in every run",
    )
    ap.add_argument(
        "--steps-for",
        action="append",
        default=[],
        metavar="DATASET=STEPS",
        help="a dataset's own checkpoints, e.g. derm64=250,500 (repeatable)",
    )
    ap.add_argument("--encoder-epochs", type=int, default=40, help="learned encoder's budget")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    add_threads_option(ap, per=" per process (auto: the free cores shared by --jobs)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "ablation")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "ablation.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "ablation.png")
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    if unknown := sorted(set(arms) - set(ARMS)):
        ap.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if "baseline" not in arms:
        ap.error("--arms must include baseline: every arm is paired with it")
    try:
        args.steps_for = {k: _ints(v) for k, v in (x.split("=", 1) for x in args.steps_for)}
    except ValueError:
        ap.error("--steps-for takes DATASET=STEPS, e.g. derm64=250,500")
    for steps in [args.steps, *args.steps_for.values()]:
        if not steps or sorted(set(steps)) != steps:
            ap.error("steps must be increasing and distinct")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = use_threads(args, processes=args.jobs)
    names = args.datasets.split(",")
    results: dict[str, Any] = {
        "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "arms": {a: {"codebook": ARMS[a][0], "overrides": ARMS[a][1]} for a in arms},
        "run": run_info(args),
        "load_avg_start": os.getloadavg(),
        "datasets": {},
    }
    t0 = time.perf_counter()
    for name in names:
        print(f"== {name}: parts and codebooks", flush=True)
        results["datasets"][name] = prepare(name, args)
    # seed-major order, datasets in the order given: a cut-short run leaves whole seeds
    units = [(n, a, s) for n in names for s in args.seeds for a in arms]
    records: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    ctx = get_context("spawn")  # fresh interpreters: no torch thread pool shared by fork
    with ProcessPoolExecutor(
        args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(run_arm, n, a, s, args): (n, a, s) for n, a, s in units}
        for i, fut in enumerate(as_completed(futures), 1):
            n, a, s = futures[fut]
            records[n] += fut.result()
            print(
                f"  [{i}/{len(units)}] {n} {a} seed {s} done ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    for name in names:
        part_sizes = _part_sizes(args, name)
        r = results["datasets"][name]
        r["sizes_per_class"] = part_sizes
        r["chance"] = {
            p: chance_levels(list(part_sizes[p].values())).model_dump()
            for p in ("validation", "test")
        }
        r["steps"] = steps_of(args, name)
        r["summary"] = aggregate(records[name], arms, r["steps"])
        r["runs"] = records[name]
        r["table_spread_seed0"] = checkpoint_spreads(args.out / name / "runs", arms, r["steps"])
        r["run_times"] = {
            f.stem: json.loads(f.read_text()).get("times")
            for f in sorted((args.out / name / "runs").glob("*.json"))
        }
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["load_avg_end"] = os.getloadavg()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2))
    print(markdown(results), flush=True)
    if args.plot:
        plot(results, args.plot)
    print(f"wrote {args.results} ({results['wall_s']:.0f} s)")


def _part_sizes(args: Any, name: str) -> dict[str, dict[str, int]]:
    split, test = load_parts(name, args)
    return {
        "train": split.train.per_class_counts(),
        "validation": split.heldout.per_class_counts(),
        "test": test.per_class_counts(),
    }


if __name__ == "__main__":
    main()
