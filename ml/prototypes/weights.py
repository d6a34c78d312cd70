"""Where CLIP encoder weights are on this machine, found without the network and without torch.

protomed never downloads: open_clip only ever gets a local file, either one the user names or
the file its pretrained tag maps to in the Hugging Face hub cache (or open_clip's own URL cache).
This module answers "are the weights here?" cheaply, so the CLI can fail at once with one line
and the API (which must not import torch, and open_clip imports torch) can refuse a training
request with 422 instead of queueing a job that would fail a minute later.

It also switches the hub libraries to offline mode (:func:`force_offline`); ``ml/__init__``
calls it, so it holds before any of them is imported by the core, the CLI, the API or a worker.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ml.errors import Invalid

#: Untrained, tests-only architecture registered by :mod:`ml.prototypes.encoder` (not an open_clip
# config).
TINY_MODEL = "protomed-tiny-vit"
UNTRAINED_WORDS = ("untrained", "none", "random")
# The weights' part of an untrained open_clip encoder's identity (``ml.prototypes.encoder``):
# torch-free
# here so that results read by the API can say their feature space is random.
UNTRAINED = "untrained-seed0"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# open_clip's hub file names (open_clip.constants): safetensors preferred, as open_clip does
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
HOW_TO = (
    "protomed never downloads: give a local checkpoint file (CLI --pretrained PATH, service "
    "PROTOMED_ENCODER_WEIGHTS=PATH), or put the tag's weights into the Hugging Face hub cache "
    "(HF_HOME) beforehand, or use random weights for trials (CLI --untrained, service "
    "PROTOMED_ENCODER_WEIGHTS=untrained)"
)


class WeightsNotFound(Invalid):
    """No local weights for the requested encoder; the message says what to give instead. An
    :class:`Invalid` (422), not a NotFound: the setting names weights this machine cannot use,
    and callers that try another encoder catch it as the ValueError it always was."""


def force_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets, in this process and the
    processes it starts. Set (not defaulted): the product never downloads, whatever the shell
    says. If huggingface_hub was imported already, its cached flag is switched too."""
    for name in OFFLINE_ENV:
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]  # a module from sys.modules


@dataclass(frozen=True)
class Weights:
    """kind: ``untrained``, ``file`` (a path given) or ``tag`` (an open_clip tag found in a
    local cache); path: the local file for file and tag; tag_cfg: open_clip's config of the tag."""

    kind: str
    path: Path | None = None
    tag_cfg: dict[str, Any] = field(default_factory=dict)


def is_untrained(weights: str | None) -> bool:
    return weights is None or weights.strip().lower() in UNTRAINED_WORDS


def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFound(
            "open_clip is not installed: pip install open_clip_torch (an API installed with "
            "'.[service]' only reads its model tables: add it with --no-deps, as the API image "
            "does, or set PROTOMED_CHECK_ENCODER_WEIGHTS=false)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def known_models() -> list[str]:
    """open_clip's architecture names (its model_configs/*.json) plus the tests' tiny model,
    which :mod:`ml.prototypes.encoder` registers with open_clip when it is imported (so it may be
    missing
    from an open_clip imported without it)."""
    if "open_clip" in sys.modules:
        names = set(sys.modules["open_clip"].list_models())
    else:
        names = {p.stem for p in (_open_clip_dir() / "model_configs").glob("*.json")}
    return sorted(names | {TINY_MODEL})


def _literal_kwargs(call: ast.Call) -> dict[str, Any]:
    out = {}
    for kw in call.keywords:
        if kw.arg is None:
            continue
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # names of constants (mean/std): not needed to find the file
            continue
    return out


@lru_cache(maxsize=1)
def _pretrained_table() -> dict[str, dict[str, dict[str, Any]]]:
    """open_clip's model -> tag -> {url, hf_hub, quick_gelu...} read from the source of
    ``open_clip/pretrained.py`` (importing it would import torch). Mirrors its ``-quickgelu``
    aliases; tests compare the table with ``open_clip.get_pretrained_cfg`` for every pair."""
    tree = ast.parse((_open_clip_dir() / "pretrained.py").read_text(encoding="utf-8"))
    per_name: dict[str, dict[str, dict[str, Any]]] = {}
    table: dict[str, dict[str, dict[str, Any]]] = {}

    def tags(value: ast.expr) -> dict[str, dict[str, Any]]:
        """``dict(tag=_pcfg(...), ...)`` or the name of one defined above."""
        if isinstance(value, ast.Name):
            return per_name.get(value.id, {})
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict":
            return {
                kw.arg: _literal_kwargs(kw.value)
                for kw in value.keywords
                if kw.arg and isinstance(kw.value, ast.Call)
            }
        return {}

    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if not isinstance(target, ast.Name):
            continue
        if target.id == "_PRETRAINED" and isinstance(value, ast.Dict):
            for key, val in zip(value.keys, value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    table[key.value] = tags(val)
        elif isinstance(value, ast.Call):
            per_name[target.id] = tags(value)
    for model, model_tags in list(table.items()):
        quick = {t: dict(c) for t, c in model_tags.items() if c.get("quick_gelu", False)}
        if quick:
            table[f"{model}-quickgelu"] = quick
    return table


def pretrained_cfg(model: str, tag: str) -> dict[str, Any]:
    """open_clip's config of ``tag`` for ``model`` ({} if there is none): from open_clip itself
    where it is loaded already (the workers), else from its source (the API)."""
    clean = tag.lower().replace("-", "_")
    if "open_clip" in sys.modules:
        return dict(sys.modules["open_clip"].get_pretrained_cfg(model, clean))
    return dict(_pretrained_table().get(model, {}).get(clean, {}))


def tags_of(model: str) -> list[str]:
    if "open_clip" in sys.modules:
        return list(sys.modules["open_clip"].list_pretrained_tags_by_model(model))
    return sorted(_pretrained_table().get(model, {}))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub computes it, read from the environment now
    (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _cached_file(tag_cfg: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The local copy of a tag's weights, and where it was looked for."""
    from huggingface_hub import try_to_load_from_cache  # torch-free, no network

    looked: list[str] = []
    hub = str(tag_cfg.get("hf_hub") or "")
    if hub:
        # open_clip's convention: "org/repo/" means the default file name, else "org/repo/file"
        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        cache = hub_cache_dir()
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found), looked
        looked.append(f"{repo} ({' or '.join(names)}) in the hub cache {cache}")
    url = str(tag_cfg.get("url") or "")
    if url:
        local = Path("~/.cache/clip").expanduser() / os.path.basename(url)  # open_clip's URL cache
        if local.is_file():
            return local, looked
        looked.append(str(local))
    return None, looked


def find_weights(model: str, weights: str | None) -> Weights:
    """Where ``weights`` for the open_clip architecture ``model`` are on this machine.

    ``weights``: ``untrained`` (or None), a local checkpoint file, or an open_clip pretrained tag
    (``openai``) whose file must already be in the hub cache. Never touches the network; raises
    :class:`ValueError` (:class:`WeightsNotFound` for missing weights) naming what to give.
    """
    models = known_models()
    if model not in models:
        import difflib

        near = difflib.get_close_matches(model, models, n=5, cutoff=0.5)
        raise Invalid(
            f"unknown open_clip model {model!r}; close matches: {near or 'none'}; "
            f"e.g. {['ViT-L-14', 'ViT-B-16', 'ViT-B-32', TINY_MODEL]} (open_clip.list_models())"
        )
    if is_untrained(weights):
        return Weights("untrained")
    assert weights is not None
    cfg = pretrained_cfg(model, weights)
    if cfg:
        path, looked = _cached_file(cfg)
        if path is None:
            raise WeightsNotFound(
                f"no local weights for {model} {weights!r}: not found at {'; '.join(looked)}. "
                + HOW_TO
            )
        return Weights("tag", path, cfg)
    path = Path(weights).expanduser()
    if path.is_file():
        return Weights("file", path)
    if os.sep in weights or path.suffix in CHECKPOINT_SUFFIXES:
        raise WeightsNotFound(f"checkpoint file not found: {path}. " + HOW_TO)
    raise WeightsNotFound(
        f"{weights!r} is neither a pretrained tag of {model} ({tags_of(model)}) nor an existing "
        "checkpoint file. " + HOW_TO
    )
