"""``protomed``: the command line for the core (prototypes, train, sample, demo, toy, check).

Errors a user can fix (bad paths, unknown classes, wrong fields: ml.errors.UserError) end with a
one-line message and exit code 2, never a traceback; set PROTOMED_DEBUG=1 to see the traceback
anyway. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from ml.config import (
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    PRESETS,
    Backbone,
    Mode,
    Precision,
    PresetName,
    SampleConfig,
    SchedulerName,
    TrainConfig,
)

# Torch-free (pydantic only): the choices and defaults below come from the one place they live.
from ml.data.catalog import Layout
from ml.errors import Invalid, UserError

app = typer.Typer(
    help="Prototype-guided class-conditional diffusion for plausible synthetic medical images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


@app.callback()
def _startup() -> None:
    """Prototype-guided class-conditional diffusion for plausible synthetic medical images."""
    from ml.runtime import tune_allocator

    tune_allocator()


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _guard(fn: Callable[[], T], *, torch_work: bool = False) -> T:
    """Run a command body; a mistake the user can fix (a :class:`~ml.errors.UserError`, or a
    configuration pydantic refused) ends in one ``error:`` line and exit 2. Everything else is a
    bug and keeps its traceback, so it is never mistaken for a bad argument. ``torch_work``: the
    body runs torch, so it first gets the thread count :mod:`ml.runtime` chooses."""
    from pydantic import ValidationError

    from ml.config import describe_validation_error

    try:
        if torch_work:
            _threads()
        return fn()
    except ValidationError as exc:
        if os.environ.get("PROTOMED_DEBUG"):
            raise
        _fail(describe_validation_error(exc))
    except UserError as exc:
        if os.environ.get("PROTOMED_DEBUG"):
            raise
        _fail(str(exc))
    raise AssertionError("unreachable")


def _threads() -> None:
    """Choose and apply torch's thread count, saying so on stderr. Called from the command body
    rather than from :func:`_startup`, which Click runs before it reads ``--help``: help would
    import torch and print the line for nothing. A bad ``PROTOMED_THREADS`` is an
    :class:`~ml.errors.Invalid` like any other bad input."""
    from ml.runtime import configure_threads

    configure_threads(say=lambda line: typer.echo(line, err=True))


def _setup_logging(verbose: bool) -> None:
    # Third-party libraries (open_clip) log chatty INFO lines on the root logger: keep them quiet.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("ml").setLevel(logging.DEBUG if verbose else logging.INFO)


def _classes(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
Device = Annotated[
    str | None, typer.Option(help="torch device (default: cuda if present, else cpu).")
]
Cache = Annotated[
    bool,
    typer.Option(
        "--cache/--no-cache", help="Reuse image embeddings from the embedding cache (on disk)."
    ),
]
PRESET_HELP = (
    "paper: the seed's Table 2 (64x64, base 64 channels, 1500 epochs; a GPU's work) with its "
    "reference ProtoDiffusion's self-attention, AdamW weight decay 1e-4 and warm-up-then-cosine "
    "rate where the seed is silent; paper-legacy: paper without those (no attention, constant "
    "rate, clipping, flips, EMA); cpu-small: 32x32, 2.7M parameters, trains visibly on 2 CPU "
    "cores in minutes; tiny: a few thousand parameters, for tests only."
)
assert all(f"{name}:" in PRESET_HELP for name in PRESETS), "PRESET_HELP must describe each preset"
SET_HELP = (
    "Override a training config field: field=value (repeatable; JSON values, e.g. "
    "channel_mults=[1,2]). Fields: " + ", ".join(TrainConfig.model_fields) + "."
)
SCHEDULERS = {
    "dpm++sde": "SDE-DPM-Solver++",
    "ddim": "DDIM, the seed's",
    "dpm++": "DPM-Solver++, deterministic",
}
STEPS_HELP = "Default: " + ", ".join(f"{DEFAULT_STEPS[s]} for {s}" for s in SCHEDULERS) + "."
SAMPLE_DEFAULTS = SampleConfig()
METRIC_ENCODER_HELP = (
    "open_clip model the images are measured with, or 'learned' with --pretrained DIR (a learned "
    "encoder's folder). Never the learned encoder the prototypes were fitted with: that space "
    "favours prototype mode by construction, so it is refused."
)

AllowRoot = Annotated[
    list[Path] | None,
    typer.Option(
        "--allow-root",
        help="Folder the dataset's files may resolve into through symbolic links (repeatable; "
        "default: the dataset folder itself).",
    ),
]


@app.command()
def prototypes(
    data: Annotated[
        Path, typer.Argument(help="Dataset folder (class folders, HAM10000 or Matek).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the codebook.")],
    layout: Annotated[
        Layout, typer.Option(help="auto: recognise the layout from the files.")
    ] = "auto",
    n_per_class: Annotated[int | None, typer.Option(help="Training images per class.")] = 100,
    heldout: Annotated[int, typer.Option(help="Held-out images per class (for the report).")] = 20,
    image_size: Annotated[int, typer.Option(help="Size images are loaded at.")] = 64,
    classes: Annotated[str | None, typer.Option(help="Comma-separated subset of classes.")] = None,
    seed: int = 0,
    encoder: Annotated[
        str,
        typer.Option(
            help="open_clip model name, or 'learned': a small CNN trained from scratch on the "
            "training images jointly with the prototypes (no weights needed; saved beside the "
            "codebook as encoder.safetensors + encoder.json)."
        ),
    ] = "ViT-L-14",
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="A local checkpoint file, or an open_clip tag (e.g. openai) whose weights are "
            "already in the Hugging Face hub cache (never downloaded)."
        ),
    ] = "openai",
    encoder_epochs: Annotated[
        int | None,
        typer.Option(help="--encoder learned: training epochs (default 40, cosine learning rate)."),
    ] = None,
    encoder_size: Annotated[
        int | None,
        typer.Option(help="--encoder learned: input size of its network (default 32)."),
    ] = None,
    encoder_patience: Annotated[
        int | None,
        typer.Option(
            help="--encoder learned: early stopping, keeping the epoch best on the held-out part "
            "(then also the part its reported accuracy comes from). Default: the whole budget."
        ),
    ] = None,
    untrained: Annotated[
        bool,
        typer.Option(help="Random encoder weights, for trials (no weights are ever downloaded)."),
    ] = False,
    k: Annotated[int, typer.Option(help="Prototypes per class.")] = 1,
    gamma: Annotated[float, typer.Option(help="DCE hardness.")] = 10.0,
    lam: Annotated[float, typer.Option("--lambda", help="Prototype-loss weight.")] = 0.01,
    head: Annotated[
        Literal["none", "linear"], typer.Option(help="Learnable head f on the embeddings.")
    ] = "none",
    epochs: int = 200,
    cache: Cache = True,
    allow_root: AllowRoot = None,
    device: Device = None,
    verbose: Verbose = False,
) -> None:
    """Embed a labelled image set with CLIP (or learn a domain encoder from it, --encoder
    learned) and learn K class prototypes (convolutional prototype learning); writes
    codebook.safetensors + codebook.json and prints the held-out report."""
    _setup_logging(verbose)

    def run() -> None:
        from ml.pipeline import learn_prototypes
        from ml.prototypes.cpl import CPLConfig
        from ml.prototypes.encoder import EmbeddingCache, EncoderSpec
        from ml.prototypes.learned_encoder import LEARNED, DomainEncoderConfig

        cpl = CPLConfig(
            k=k,
            gamma=gamma,
            lam=lam,
            head=None if head == "none" else head,
            epochs=epochs,
            seed=seed,
        )
        learned = encoder == LEARNED
        given = {"epochs": encoder_epochs, "input_size": encoder_size, "patience": encoder_patience}
        if not learned and any(v is not None for v in given.values()):
            raise Invalid(f"--encoder-epochs/-size/-patience need --encoder {LEARNED}")
        domain = DomainEncoderConfig(seed=seed, **{n: v for n, v in given.items() if v is not None})
        spec = EncoderSpec(encoder, None if untrained or learned else pretrained)
        selection = {
            "root": data,
            "layout": layout,
            "n_per_class": n_per_class,
            "n_heldout": heldout,
            "image_size": image_size,
            "seed": seed,
            "classes": _classes(classes),
        }
        result = learn_prototypes(
            selection,
            out,
            encoder_spec=spec,
            cpl=cpl,
            allow_untrained=untrained,
            cache=EmbeddingCache() if cache else None,
            device=device,
            progress=True,
            roots=allow_root or None,
            domain=domain if learned else None,
        )
        typer.echo(json.dumps(result.report.to_dict(), indent=2))
        typer.echo(f"codebook written to {result.out_dir}")

    _guard(run, torch_work=True)


@app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoint, metrics).")],
    mode: Annotated[
        Mode, typer.Option(help="prototype: conditioned on frozen prototypes; baseline: on labels.")
    ],
    codebook: Annotated[
        Path | None, typer.Option(help="Codebook folder; also fixes the training split.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Dataset folder (baseline without a codebook).")
    ] = None,
    preset: Annotated[PresetName, typer.Option(help=PRESET_HELP)] = "paper",
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint to resume from.")] = None,
    allow_root: AllowRoot = None,
    device: Device = None,
    verbose: Verbose = False,
) -> None:
    """Train the diffusion UNet in prototype or baseline mode (DDP under torchrun)."""
    _setup_logging(verbose)

    def run() -> None:
        from ml.config import make_config, parse_overrides
        from ml.pipeline import train_model
        from ml.prototypes.cpl import Codebook

        cfg = make_config(preset, {**parse_overrides(set_ or []), "mode": mode})
        book = Codebook.load(codebook) if codebook is not None else None
        if book is None and data is None:
            raise Invalid("give --codebook (recommended, same split for both modes) or --data")
        path = train_model(
            cfg,
            out,
            codebook=book,
            root=data,
            resume=resume,
            device=device,
            roots=allow_root or None,
        )
        typer.echo(f"checkpoint: {path}")

    _guard(run, torch_work=True)


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for PNGs and manifest.")],
    class_: Annotated[
        list[str] | None, typer.Option("--class", "-c", help="Class to sample (repeatable).")
    ] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Images per class.")] = 16,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    guidance: Annotated[
        float, typer.Option(help="CFG scale (1 = none).")
    ] = SAMPLE_DEFAULTS.guidance,
    scheduler: Annotated[
        SchedulerName,
        typer.Option(help="; ".join(f"{k}: {v}" for k, v in SCHEDULERS.items()) + "."),
    ] = DEFAULT_SCHEDULER,
    seed: int = SAMPLE_DEFAULTS.seed,
    batch_size: int = SAMPLE_DEFAULTS.batch_size,
    precision: Annotated[
        Precision, typer.Option(help="auto: bf16 where the hardware has it natively, else fp32.")
    ] = SAMPLE_DEFAULTS.precision,
    grid: Annotated[Path | None, typer.Option(help="Also write a grid PNG here.")] = None,
    ema: Annotated[
        bool, typer.Option("--ema/--no-ema", help="EMA weights (--no-ema: the raw weights).")
    ] = SAMPLE_DEFAULTS.use_ema,
    device: Device = None,
    verbose: Verbose = False,
) -> None:
    """Generate n images per class with classifier-free guidance; by default SDE-DPM-Solver++ in
    20 steps (--scheduler ddim: the seed's DDIM, 50 steps)."""
    _setup_logging(verbose)

    def run() -> None:
        from ml.config import resolve_device
        from ml.diffusion.sample import sample_to_folder, save_grid
        from ml.models.checkpoint import load_model

        scfg = SampleConfig(
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            seed=seed,
            batch_size=batch_size,
            use_ema=ema,
            precision=precision,
        )
        loaded = load_model(checkpoint, use_ema=ema, device=resolve_device(device))
        result = sample_to_folder(loaded, out, n, scfg, class_ or None)
        if grid is not None:
            save_grid(result.images, grid)
        typer.echo(f"{len(result.files)} images, manifest: {result.manifest}")

    _guard(run, torch_work=True)


@app.command()
def toy(
    out: Annotated[Path, typer.Argument(help="Folder to write the toy dataset to.")],
    n_per_class: int = 120,
    size: int = 64,
    seed: int = 0,
) -> None:
    """Write the procedurally drawn toy cytology dataset (class folders + manifest.csv)."""

    def run() -> None:
        from ml.data.toy import write_toy_dataset

        write_toy_dataset(out, n_per_class=n_per_class, size=size, seed=seed)
        typer.echo(f"toy dataset written to {out}")

    _guard(run)


@app.command()
def check(
    folder: Annotated[Path, typer.Argument(help="A class-folder set of toy-domain images.")],
) -> None:
    """Rule-based plausibility of toy-domain images, per class and criterion."""

    def run() -> None:
        from ml.demo import check_folder

        typer.echo(json.dumps(check_folder(folder), indent=2))

    _guard(run, torch_work=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo_out"),
    steps: Annotated[int, typer.Option(help="Training steps per mode.")] = 600,
    n_per_class: Annotated[int, typer.Option(help="Training images per class.")] = 100,
    n_sample: Annotated[int, typer.Option(help="Images sampled per class and mode.")] = 32,
    encoder: Annotated[
        str | None,
        typer.Option(
            help="Encoder for the prototypes: 'learned' (a small CNN trained on the toy images "
            "with the prototypes), or an open_clip model. Default: learned, or ViT-B-32 when "
            "--pretrained is given."
        ),
    ] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="CLIP weights tag or file (for an open_clip --encoder).")
    ] = None,
    device: Device = None,
    verbose: Verbose = False,
) -> None:
    """The embedded main job: toy cytology data, prototypes, both modes trained briefly
    (cpu-small at 24px, min-SNR weighting), every class sampled, a labelled grid per mode and
    a summary with the prototype-vs-baseline checker-rate difference and its 95% interval.
    About 10 min on a quiet 2-core machine."""
    _setup_logging(verbose)

    def run() -> dict[str, Any]:
        from ml.demo import run_demo
        from ml.prototypes.learned_encoder import LEARNED

        name = encoder or ("ViT-B-32" if pretrained else LEARNED)
        if name == LEARNED and pretrained:
            raise Invalid(f"--pretrained is for an open_clip --encoder, not {LEARNED}")
        return run_demo(
            out,
            steps=steps,
            n_per_class=n_per_class,
            n_sample=n_sample,
            encoder=name,
            pretrained=pretrained,
            device=device,
            say=typer.echo,
        )

    _guard(run, torch_work=True)


@app.command()
def evaluate(
    baseline: Annotated[Path, typer.Option(help="Baseline checkpoint or run folder.")],
    prototype: Annotated[Path, typer.Option(help="Prototype checkpoint or run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file for the results.")],
    codebook: Annotated[
        Path | None, typer.Option(help="Codebook folder (adds prototype consistency).")
    ] = None,
    test_data: Annotated[
        Path | None,
        typer.Option(
            help="External test set: a folder of real images the models never saw (class "
            "folders, manifest.csv, MATEK or HAM10000), classes matched by name; it must have "
            "every model class, extra classes are ignored. Default: the held-out part of the "
            "models' split."
        ),
    ] = None,
    test_name: Annotated[
        str | None,
        typer.Option(help="What to call the external test set in the tables (default: its path)."),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Classifier seeds, comma-separated.")] = "0,1,2",
    backbone: Annotated[
        Backbone, typer.Option(help="resnext50: the seed's; small: a fast CNN for trials.")
    ] = "small",
    weights: Annotated[
        Path | None, typer.Option(help="Local ImageNet weights for the ResNet backbones.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Classifier training epochs.")] = 30,
    n_per_class: Annotated[
        int | None, typer.Option(help="Synthetic images per class (default: as real).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps (DDIM, the seed's protocol).")] = 50,
    guidance: float = 2.0,
    encoder: Annotated[str, typer.Option(help=METRIC_ENCODER_HELP)] = "ViT-L-14",
    pretrained: Annotated[
        str | None, typer.Option(help="Weights tag or local file (learned: its folder).")
    ] = "openai",
    untrained: Annotated[bool, typer.Option(help="Untrained encoder (tests/demo only).")] = False,
    cache: Cache = True,
    device: Device = None,
    verbose: Verbose = False,
) -> None:
    """Without experts: a classifier trained on real / baseline / prototype images and tested on
    held-out real ones or an external test set (the seed's Tables 5-6), plus CLIP-space
    Frechet distance, k-NN precision/recall and prototype consistency."""
    _setup_logging(verbose)

    def run() -> None:
        from ml.config import resolve_device
        from ml.console import StagePrinter
        from ml.evaluation.downstream import DownstreamConfig
        from ml.evaluation.evaluate import evaluate as run_evaluation
        from ml.evaluation.evaluate import evaluation_table
        from ml.models.checkpoint import load_model
        from ml.prototypes.cpl import Codebook
        from ml.prototypes.encoder import EmbeddingCache, build_encoder, check_encoder
        from ml.schemas.evaluation import EvalConfig

        check_encoder(encoder, None if untrained else pretrained)  # before anything heavy loads
        try:
            seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        except ValueError as exc:
            raise Invalid(f"--seeds must be comma-separated integers (got {seeds!r})") from exc
        dev = resolve_device(device)
        cfg = EvalConfig(
            n_per_class=n_per_class,
            steps=steps,
            guidance=guidance,
            seeds=seed_list,
            downstream=DownstreamConfig(
                backbone=backbone, epochs=epochs, weights=weights, device=str(dev), progress=True
            ),
        )
        models = {
            "baseline": load_model(baseline, device=dev),
            "prototype": load_model(prototype, device=dev),
        }
        enc = build_encoder(
            encoder, None if untrained else pretrained, device=str(dev), allow_untrained=untrained
        )
        book = Codebook.load(codebook) if codebook is not None else None
        with StagePrinter("evaluate") as progress:
            result = run_evaluation(
                models,
                enc,
                cfg,
                codebook=book,
                cache=EmbeddingCache() if cache else None,
                test_data=test_data,
                test_name=test_name or (str(test_data) if test_data else None),
                progress=progress,
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.model_dump_json(indent=2))
        typer.echo(evaluation_table(result))
        test = result.test_set
        if test is not None and test.ignored_classes:
            typer.echo(
                f"note: the test set's classes {test.ignored_classes} are not the models' "
                "and were ignored"
            )
        typer.echo(f"results: {out} ({result.seconds:.0f} s)")

    _guard(run, torch_work=True)


@app.command()
def audit(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or run folder.")],
    batch: Annotated[
        Path, typer.Argument(help="Folder of generated images with manifest.csv (sample --out).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write the full report (JSON) here.")
    ] = None,
    quantile: Annotated[
        float, typer.Option(help="Calibrated false-flag rate per space (threshold quantile).")
    ] = 0.05,
    space: Annotated[
        list[str] | None, typer.Option(help="pixel and/or clip (repeatable; default: both).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="The dataset folder, if not where it was at training.")
    ] = None,
    encoder: Annotated[str, typer.Option(help=METRIC_ENCODER_HELP)] = "ViT-L-14",
    pretrained: Annotated[
        str | None, typer.Option(help="Weights tag or local file (learned: its folder).")
    ] = "openai",
    untrained: Annotated[bool, typer.Option(help="Untrained encoder (tests/demo only).")] = False,
    cache: Cache = True,
    allow_root: AllowRoot = None,
    device: Device = None,
    verbose: Verbose = False,
) -> None:
    """Memorisation audit: each generated image's nearest training image (pixel and CLIP
    space, over the flips the model trained with), near-copies flagged per class by a threshold
    calibrated on held-out real images, checked on other held-out images. Not a formal privacy
    guarantee."""
    _setup_logging(verbose)

    def run() -> None:
        from ml.audit import audit_images, audit_table, model_split, read_batch_folder
        from ml.models.checkpoint import load_model
        from ml.prototypes.encoder import EmbeddingCache, build_encoder, check_encoder
        from ml.prototypes.learned_encoder import refuse_same_space
        from ml.schemas.audit import AuditConfig

        cfg = AuditConfig(quantile=quantile, spaces=tuple(space or ("pixel", "clip")))
        weights = None if untrained else pretrained
        if "clip" in cfg.spaces:
            check_encoder(encoder, weights)  # before anything heavy loads
        loaded = load_model(checkpoint)
        images, classes, files = read_batch_folder(batch)
        enc = None
        if "clip" in cfg.spaces:
            enc = build_encoder(encoder, weights, device=device, allow_untrained=untrained)
        if enc is not None:
            refuse_same_space(enc.identity, loaded.cond.encoder, "the audit's feature space")
        split = model_split(loaded, str(data) if data else None, allow_root or None)
        report = audit_images(
            images,
            classes,
            split,
            enc,
            cfg,
            flips=loaded.cfg.flip,
            names=files,
            cache=EmbeddingCache() if cache and enc is not None else None,
        )
        typer.echo(audit_table(report))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(report.model_dump_json(indent=2))
            typer.echo(f"report: {out}")

    _guard(run, torch_work=True)


if __name__ == "__main__":  # pragma: no cover
    app()
