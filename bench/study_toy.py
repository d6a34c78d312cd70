"""An expert study on the toy domain: the rule-based checker as two readers, with real controls
and the "real or synthetic?" question, through the real service and Label Studio.

Trains both modes through the API (``bench.toy_loop``: the service as real processes, as
``bench.review_toy`` runs it), generates a batch per class and mode, and creates a study
(``POST /studies``) over them with real controls (the toy dataset's held-out images, ``share``
0.5 by default), ``ask_origin`` on, two readers and overlap 2. The readers are two Label Studio
users made through the organisation's invite link, each posting with their own token, so their
reads count as the named readers'. Each reader judges every task:

- plausibility: the toy checker's verdict per criterion (:func:`ml.data.toy.check_image`);
  reader 2 gives the other verdict on a seeded ``--noise`` share of the tasks (exactly 10% of
  them, :func:`flipped_refs`), so the readers' agreement is not 1 by construction;
- "real or synthetic?": from the pixels alone (:class:`OriginRule`): the image's high-frequency
  energy (:func:`roughness`) against the central ``--coverage`` range of the same statistic on
  freshly drawn real toy images of the expected class (another seed than the dataset's, resized
  to the study's image size as controls are), so the threshold is never fit on the study's
  images or their labels; outside the range "synthetic", inside "real"; the confidence is the
  distance to the nearer bound in units of that class's interquartile range. Both readers answer
  it alike (the rule has no noise).

Then it syncs, reads ``GET /studies/{id}/report`` and writes it with the run's provenance and
the machine's load (``--out``/study.json) and prints a compact table.

    .venv/bin/python -m bench.study_toy --ls-url http://127.0.0.1:8080 --ls-token TOKEN
    # toy size (tests/test_bench.py): a tiny model, 2 images per class and mode
    .venv/bin/python -m bench.study_toy --steps 2 --n-per-class 6 --n 2 --sample-steps 2 \
        --calibration 8 --out /tmp/study-toy
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

from bench.provenance import run_info
from bench.testkit import tests_module
from bench.toy_loop import (
    checker_criteria,
    export_tasks,
    generate_all,
    task_image,
    toy_service,
    train_both,
    wait,
)

REPO = Path(__file__).resolve().parents[1]
# Confidence cut points: distance to the nearer bound, in interquartile ranges of the class's
# real calibration images: below the first "guessing", below the second "fairly sure", else
# "sure" (1, 2, 3 as the study stores them).
CONFIDENCE_CUTS = (0.25, 0.75)


def roughness(image: Image.Image | npt.NDArray[Any]) -> float:
    """High-frequency energy: the mean absolute difference between the grey image (0-255) and
    its 3x3 mean. Drawn cells are smooth shapes with a little sensor noise (the drawer's 2
    levels); a small or briefly trained diffusion model leaves its own noise or blur, so this
    is what a pixel-only reader might first look at."""
    grey = np.asarray(image, dtype=np.float64).mean(axis=-1)
    return float(np.abs(grey - ndimage.uniform_filter(grey, size=3, mode="nearest")).mean())


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    iqr: float


@dataclass(frozen=True)
class OriginRule:
    """Per class, the central range of :func:`roughness` over real calibration images."""

    ranges: dict[str, Range]
    coverage: float
    calibration_per_class: int
    image_size: int

    def answer(self, image: Image.Image, expected_class: str) -> tuple[bool, int]:
        """(answered synthetic, confidence 1-3) for one image shown as ``expected_class``."""
        r = self.ranges[expected_class]
        s = roughness(image)
        outside = not r.low <= s <= r.high
        distance = min(abs(s - r.low), abs(s - r.high)) / max(r.iqr, 1e-9)
        confidence = 1 + sum(distance >= cut for cut in CONFIDENCE_CUTS)
        return outside, confidence

    def describe(self) -> dict[str, Any]:
        return {
            "statistic": "roughness: mean |grey - 3x3 mean of grey| (0-255), at the shown size",
            "answer": "synthetic if outside the class's central range of real calibration "
            "images, else real",
            "coverage": self.coverage,
            "calibration_per_class": self.calibration_per_class,
            "calibration_seed": CALIBRATION_SEED,
            "image_size": self.image_size,
            "confidence": f"distance to the nearer bound in class IQRs: < {CONFIDENCE_CUTS[0]} "
            f"guessing, < {CONFIDENCE_CUTS[1]} fairly sure, else sure",
            "ranges": {c: vars(r) for c, r in self.ranges.items()},
        }


CALIBRATION_SEED = 101  # the dataset is drawn with seed 0


def calibrate(
    folder: Path, classes: Iterable[str], per_class: int, size: int, coverage: float
) -> OriginRule:
    """The rule from ``per_class`` fresh real toy images per class (drawn at 32 px like the
    dataset, then resized to ``size`` by the resampling controls get: ``load_rgb``)."""
    from ml.data.draw import load_rgb
    from ml.data.toy import write_toy_dataset

    root = write_toy_dataset(folder, n_per_class=per_class, size=32, seed=CALIBRATION_SEED)
    tail = (1 - coverage) / 2
    ranges = {}
    for cls in classes:
        values = [roughness(load_rgb(p, size)) for p in sorted((root / cls).glob("*.png"))]
        lo, q1, q3, hi = np.quantile(values, [tail, 0.25, 0.75, 1 - tail])
        ranges[cls] = Range(float(lo), float(hi), float(q3 - q1))
    return OriginRule(ranges, coverage, per_class, size)


def flipped_refs(refs: Iterable[str], share: float, seed: int) -> set[str]:
    """The tasks whose verdict the noisy reader flips: exactly ``round(share x tasks)`` of them,
    drawn by ``seed`` from the tasks' blinded refs in sorted order."""
    ordered = sorted(refs)
    return set(random.Random(seed).sample(ordered, round(share * len(ordered))))


def read_task(
    image: Image.Image, task: dict[str, Any], rule: OriginRule, flip: bool
) -> list[dict[str, Any]]:
    """One reader's Label Studio result for a task: the checker's criteria and overall verdict
    (the other verdict where ``flip``) and the rule's origin answer."""
    from service.criteria import annotation_result

    cls = task["data"]["expected_class"]
    crits = checker_criteria(image, cls)
    plausible = "fail" not in crits.values()
    if flip and plausible:
        overall = "implausible"  # every criterion passed; the reader still says no
    elif flip:
        crits, overall = dict.fromkeys(crits, "pass"), "plausible"
    else:
        overall = "plausible" if plausible else "implausible"
    synthetic, confidence = rule.answer(image, cls)
    result = annotation_result(
        crits, overall, answered_synthetic=synthetic, origin_confidence=confidence
    )
    return result


def pct(entry: dict[str, Any] | None) -> str:
    if not entry or not entry["images"]:
        return "-"
    k, n = entry["plausible"], entry["images"]
    return f"{100 * k / n:.0f}% ({k}/{n})"


def points(diff: dict[str, Any] | None) -> str:
    if not diff:
        return "-"
    lo, hi = diff["ci"]
    return f"{100 * diff['value']:+.0f} [{100 * lo:+.0f}; {100 * hi:+.0f}]"


def table(report: dict[str, Any], noise: float, names: dict[str, str]) -> str:
    """The compact table: per class the real, baseline and prototype plausible rates, each model
    minus real, agreement; then discrimination (``names``: a short name per reader e-mail) and
    the PNG-size AUC."""
    ids = {m["mode"]: str(m["id"]) for m in report["models"]}
    b, p = ids.get("baseline", ""), ids.get("prototype", "")
    head = ["class", "real", "baseline", "prototype", "baseline - real (pp)"]
    head += ["prototype - real (pp)", "kappa"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: Sequence[tuple[str, dict[str, Any]]] = [
        *((c["class"], c) for c in report["classes"]),
        ("pooled", report["pooled"]),
    ]
    for name, row in rows:
        vr = row.get("versus_real", {})
        kappa = row["agreement"]["kappa"]
        cells = [
            name,
            pct(row["real"]),
            pct(row["models"].get(b)),
            pct(row["models"].get(p)),
            points(vr.get(b)),
            points(vr.get(p)),
            "-" if kappa is None else f"{kappa:.2f} (n={row['agreement']['kappa_units']})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    d = report["plausibility"].get("discrimination")
    if d:
        lines.append("")
        lines.append(
            "real or synthetic? (both readers answer by the same pixel rule; reads as units):"
        )
        per_reader = [(names.get(k, k), v) for k, v in d["readers"].items()]
        for who, s in [("pooled", d["pooled"]), *per_reader]:
            acc = s["accuracy"]
            auc = "-" if s["auc"] is None else f"{s['auc']:.2f}"
            lines.append(
                f"  {who}: accuracy {100 * acc['rate']:.0f}% [{100 * acc['ci'][0]:.0f}; "
                f"{100 * acc['ci'][1]:.0f}] (n={s['n']}), TOST vs 50% +- {100 * d['margin']:.0f}: "
                f"{s['claim']}; rating AUC {auc}"
            )
    leaks = report["plausibility"].get("control_leaks") or []
    for leak in leaks:
        lines.append(f"PNG-size AUC (real vs synthetic review copies): {leak['png_size_auc']:.2f}")
    lines.append(f"reader 2 flips the overall verdict of a seeded {100 * noise:.0f}% of tasks")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ls-url", default=os.environ.get("PROTOMED_TEST_LABEL_STUDIO_URL"))
    ap.add_argument("--ls-token", default=os.environ.get("PROTOMED_TEST_LABEL_STUDIO_TOKEN"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200, help="training steps per mode")
    ap.add_argument("--n-per-class", type=int, default=30, help="toy training images per class")
    ap.add_argument("--n", type=int, default=8, help="images per class and mode")
    ap.add_argument("--sample-steps", type=int, default=None, help="default: the sampler's")
    ap.add_argument("--share", type=float, default=0.5, help="controls: share of synthetic")
    ap.add_argument("--noise", type=float, default=0.1, help="reader 2's flipped share")
    ap.add_argument("--seed", type=int, default=0, help="controls' draw and reader 2's flips")
    ap.add_argument("--calibration", type=int, default=40, help="real images per class")
    ap.add_argument("--coverage", type=float, default=0.95, help="central range of real")
    ap.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "study-toy")
    args = ap.parse_args()
    info = run_info(args)
    if not args.ls_url or not args.ls_token:
        ap.error("give --ls-url and --ls-token (a running Label Studio with a legacy token)")
    from ml.data.toy import write_toy_dataset

    readers_kit = tests_module("ls_readers")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    # the controls' pool: images of each class no model trains on (n_heldout of them)
    held = max(1, round(args.share * 2 * args.n))
    write_toy_dataset(out / "data" / "toy", n_per_class=args.n_per_class + held, size=32, seed=0)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    extra = {"PROTOMED_REVIEW_PULL_S": "3600"}  # the bench pulls when the readers are done
    with toy_service(out, args.ls_url, args.ls_token, args.threads, **extra) as service:
        api = service.api
        body = {"name": "toy", "path": "toy", "domain": "toy"}
        ds = api.post("/datasets", json=body).json()
        models = train_both(api, ds["id"], args.preset, args.n_per_class, args.steps, held)
        timings["train_s"] = time.perf_counter() - t0
        batches = generate_all(api, models, ds["classes"], args.n, args.sample_steps)
        timings["generate_s"] = time.perf_counter() - t0 - timings["train_s"]
        invite = readers_kit.invite_token(args.ls_url, args.ls_token)
        readers = [readers_kit.sign_up(args.ls_url, invite, f"toy-reader{i}") for i in (1, 2)]
        study_body = {
            "name": "toy study",
            "batch_ids": batches,
            "readers": [r.email for r in readers],
            "overlap": 2,
            "controls": {"dataset_id": ds["id"], "share": args.share, "seed": args.seed},
            "ask_origin": True,
        }
        r = api.post("/studies", json=study_body)
        if r.status_code != 202:
            raise RuntimeError(f"POST /studies: {r.status_code} {r.text}")
        created = r.json()
        wait(api, created["job_id"])
        study = api.get(f"/studies/{created['study']['id']}").json()
        tasks = export_tasks(args.ls_url, args.ls_token, study["ls_project_id"])
        rule: OriginRule | None = None
        flips = flipped_refs((str(t["data"]["ref"]) for t in tasks), args.noise, args.seed)
        for task in tasks:
            image = task_image(api, task)
            if rule is None:  # the study's one image size, known from its first image
                rule = calibrate(
                    out / "calibration",
                    ds["classes"],
                    args.calibration,
                    image.size[0],
                    args.coverage,
                )
            for i, reader in enumerate(readers):
                flip = i == 1 and str(task["data"]["ref"]) in flips
                result = read_task(image, task, rule, flip)
                ann = reader.api.post(
                    f"/api/tasks/{task['id']}/annotations/", json={"result": result}
                )
                ann.raise_for_status()
        for reader in readers:
            reader.api.close()
        for job in api.post("/reviews/sync").json():
            wait(api, job["id"])
        report: dict[str, Any] = {}
        for _ in range(240):
            report = api.get(f"/studies/{study['id']}/report").json()
            if report["progress"]["complete"]:
                break
            time.sleep(0.5)
        timings["whole_s"] = time.perf_counter() - t0
    assert rule is not None, "the study has no tasks"
    result_doc = {
        "run": info,
        "machine_load": {"start": load_start, "end": list(os.getloadavg())},
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "readers": {
            "plausibility": "the toy checker's verdict (ml.data.toy.check_image) per criterion",
            "noise": {"reader": 2, "share": args.noise, "seed": args.seed, "flipped": len(flips)},
            "origin": rule.describe(),
        },
        "tasks": len(tasks),
        "png_size_auc": created["png_size_auc"],
        "report": report,
    }
    (out / "study.json").write_text(json.dumps(result_doc, indent=2))
    names = {r.email: f"reader {i}" for i, r in enumerate(readers, 1)}
    print(table(report, args.noise, names))
    print(
        f"{len(tasks)} images x 2 readers; whole run {timings['whole_s']:.0f} s "
        f"(training {timings['train_s']:.0f} s); in {out / 'study.json'}"
    )


if __name__ == "__main__":
    main()
