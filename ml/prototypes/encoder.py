"""CLIP image encoder (open_clip) and an on-disk embedding cache.

Images arrive as uint8 tensors (N, 3, S, S) with sha256 content hashes; embeddings are
L2-normalised float32 vectors keyed in the cache by (encoder identity, content hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
import open_clip
import torch
import torch.nn.functional as F

from ml.config import bf16_supported
from ml.errors import Invalid
from ml.prototypes.weights import TINY_MODEL, UNTRAINED, find_weights

log = logging.getLogger(__name__)

# TINY_MODEL: untrained, tests-only architecture: a 2-layer ViT on 64x64 inputs (a few seconds on
# a CPU). open_clip needs a text tower to build a CLIP model; this one is minimal and never used.
_TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 16,
        "width": 64,
        "layers": 2,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _register_tiny_config() -> None:
    """Register TINY_MODEL through open_clip's public add_model_config (it takes a .json file
    named after the model). The registry keeps the parsed config in memory, so the temporary
    file can go at once (later rescans skip missing paths and only add entries)."""
    if TINY_MODEL in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory(prefix="protomed-cfg-") as tmp:
        path = Path(tmp) / f"{TINY_MODEL}.json"
        path.write_text(json.dumps(_TINY_CONFIG))
        open_clip.add_model_config(path)


_register_tiny_config()


@dataclass(frozen=True)
class EncoderSpec:
    """model_name: an open_clip architecture; pretrained: an open_clip tag ("openai",
    "laion2b_s32b_b82k", resolved from the hub cache), a local checkpoint path, or None
    (untrained). quick_gelu: None = infer (tags say so; local files named/placed under
    "openai" or TorchScript archives, the format OpenAI released, are OpenAI weights)."""

    model_name: str = "ViT-L-14"
    pretrained: str | None = "openai"
    quick_gelu: bool | None = None


def _file_fingerprint(path: Path) -> str:
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"file:{path.name}:{path.stat().st_size}:{head}"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


@dataclass(frozen=True)
class _Resolved:
    kind: str  # tag | file | untrained
    identity: str  # the weights' part of the encoder identity (embedding cache key)
    quick_gelu: bool
    path: Path | None  # the local file open_clip loads (never a download)
    tag_cfg: dict[str, Any]


def _resolve_weights(spec: EncoderSpec) -> _Resolved:
    """Find the weights on this machine (:func:`ml.prototypes.weights.find_weights`: a file, or a
    tag's
    file already in the hub cache); raises a one-line ValueError naming --untrained and
    --pretrained PATH when they are not here, instead of letting open_clip try the network."""
    found = find_weights(spec.model_name, spec.pretrained)
    if found.kind == "untrained":
        return _Resolved("untrained", UNTRAINED, bool(spec.quick_gelu), None, {})
    assert found.path is not None
    if found.kind == "tag":
        # OpenAI (and some other) weights were trained with QuickGELU, but the plain configs
        # ("ViT-L-14") build nn.GELU and open_clip 3.3 only *warns* about the mismatch, giving
        # subtly wrong embeddings. The tag's own cfg says which activation it was trained with.
        qg = found.tag_cfg.get("quick_gelu", False) if spec.quick_gelu is None else spec.quick_gelu
        return _Resolved("tag", str(spec.pretrained), bool(qg), found.path, found.tag_cfg)
    # A checkpoint file carries no activation info: OpenAI's releases are TorchScript archives,
    # and hub copies of them live under a "...openai" folder.
    qg = spec.quick_gelu
    if qg is None:
        qg = "openai" in str(found.path.resolve()).lower() or _is_torchscript(found.path)
    return _Resolved("file", _file_fingerprint(found.path), bool(qg), found.path, {})


def _build_model(spec: EncoderSpec, weights: _Resolved) -> torch.nn.Module:
    name, quick_gelu = spec.model_name, weights.quick_gelu
    if weights.kind == "untrained":
        # Seeded init inside a forked RNG: a stable identity without touching the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            untrained: torch.nn.Module = open_clip.create_model(
                name, pretrained=None, force_quick_gelu=quick_gelu
            )
            return untrained
    path = weights.path
    assert path is not None
    try:
        if not _is_torchscript(path):
            loaded: torch.nn.Module = open_clip.create_model(
                name, pretrained=str(path), force_quick_gelu=quick_gelu
            )
            return loaded
        # weights_only torch.load refuses TorchScript archives: take their state dict instead.
        state = torch.jit.load(str(path), map_location="cpu").state_dict()  # type: ignore[no-untyped-call]
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        model: torch.nn.Module = open_clip.create_model(
            name, pretrained=None, force_quick_gelu=quick_gelu
        )
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model
    except (RuntimeError, KeyError) as e:
        raise Invalid(f"checkpoint {path} does not load into {name}: {e}") from e


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 weights (``model.to(bfloat16)``, not autocast, which was 2.6x slower) on
    CUDA with bf16 and on CPUs with native bf16 (AVX512-BF16/AMX + oneDNN), else fp32. Without
    native bf16 it is emulated: on an AVX2 EPYC ViT-L-14 ran 5.5x SLOWER in bf16 than fp32."""
    if dtype in ("fp32", "float32"):
        return torch.float32
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    if dtype != "auto":
        raise Invalid(f"dtype must be 'auto', 'fp32' or 'bf16', not {dtype!r}")
    return torch.bfloat16 if bf16_supported(device) else torch.float32


class ClipEncoder:
    """The image tower of an open_clip model, eval mode, frozen."""

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        device: str | torch.device | None = None,
        allow_untrained: bool = False,
        dtype: str = "auto",
    ) -> None:
        weights = _resolve_weights(spec)
        kind, quick_gelu = weights.kind, weights.quick_gelu
        if kind == "untrained" and not allow_untrained:
            raise Invalid(
                f"EncoderSpec({spec.model_name!r}, pretrained=None) has no weights: pass an "
                "open_clip tag (e.g. pretrained='openai') or a local checkpoint path, or "
                "allow_untrained=True for tests/demos"
            )
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        self.quick_gelu = quick_gelu
        model = _build_model(spec, weights)
        if kind == "untrained":
            log.warning("embeddings come from an UNTRAINED encoder (%s, seed 0)", spec.model_name)
        # Loaded from a file, the model has its architecture's preprocessing; a tag's own (mean,
        # std, interpolation) is what open_clip would have applied when loading by tag.
        cfg = {
            **open_clip.get_model_preprocess_cfg(model),
            **{k: v for k, v in weights.tag_cfg.items() if k in ("mean", "std", "interpolation")},
        }
        self._dim = int(open_clip.get_model_config(spec.model_name)["embed_dim"])
        visual = cast(torch.nn.Module, model.visual)  # open_clip's image tower
        self.visual = visual.eval().requires_grad_(False).to(self.device, self.dtype)
        del model  # drop the text tower
        size = cfg["size"]
        self._size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self._mode = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        act = "quickgelu" if quick_gelu else "gelu"
        dtype_name = str(self.dtype).split(".")[-1]
        self._identity = f"{spec.model_name}|{weights.identity}|{act}|{dtype_name}"

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def image_size(self) -> int:
        return self._size[0]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) -> normalised float32 at the model's input size. Mirrors open_clip's
        PIL pipeline on tensors: shortest side resized (antialiased), centre crop, clamp (PIL
        clamps to uint8), mean/std."""
        x = images.to(self.device).float() / 255.0
        h, w = x.shape[-2:]
        th, tw = self._size
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = F.interpolate(
                x, size=(nh, nw), mode=self._mode, antialias=True, align_corners=False
            )
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[..., top : top + th, left : left + tw].clamp(0.0, 1.0)
        return (x - self._mean) / self._std

    def encode(
        self,
        images: torch.Tensor,
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """uint8 (N,3,S,S) -> L2-normalised float32 (N, dim) on the CPU. ``on_batch(done)`` is
        called after each batch with the number of images encoded so far (job progress)."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.visual(self.preprocess(x).to(self.dtype)).float(), dim=-1)

        return encode_in_batches(images, forward, self.dim, batch_size, on_batch)


def encode_in_batches(
    images: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
) -> torch.Tensor:
    """An encoder's ``encode``: uint8 (N,3,S,S) checked, ``forward`` (uint8 batch -> (n, dim)
    embeddings) run batch by batch without autograd, float32 (N, dim) on the CPU; ``on_batch``
    gets the count done after each batch."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 (N,3,S,S) images, got {images.dtype} {tuple(images.shape)}"
        )
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(forward(images[i : i + batch_size]).float().cpu())
            if on_batch is not None:
                on_batch(min(len(images), i + batch_size))
    return torch.cat(out) if out else torch.empty(0, dim)


class ImageEncoder(Protocol):
    """What every step that embeds images needs: :class:`ClipEncoder`, or the learned domain
    encoder (:class:`ml.prototypes.learned_encoder.LearnedEncoder`). ``identity`` keys cached
    embeddings."""

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    def encode(
        self,
        images: torch.Tensor,
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor: ...


def build_encoder(
    model_name: str,
    pretrained: str | None,
    *,
    device: str | torch.device | None = None,
    allow_untrained: bool = False,
) -> ImageEncoder:
    """The encoder a step measures images with: ``model_name="learned"`` loads a learned domain
    encoder from the folder ``pretrained`` (one saved beside a codebook, e.g. learned on a split
    disjoint from the models'), anything else is an open_clip :class:`ClipEncoder`."""
    from ml.prototypes.learned_encoder import LEARNED, LearnedEncoder

    if model_name != LEARNED:
        spec = EncoderSpec(model_name, pretrained)
        return ClipEncoder(spec, device=device, allow_untrained=allow_untrained)
    if not pretrained or not Path(pretrained).is_dir():
        raise Invalid(
            f"--encoder {LEARNED} needs --pretrained DIR: the folder with its encoder.safetensors "
            f"(a codebook folder from `protomed prototypes --encoder learned`), not {pretrained!r}"
        )
    return LearnedEncoder.load(pretrained, device)


def check_encoder(model_name: str, pretrained: str | None) -> None:
    """Fail at once, before anything heavy loads, when :func:`build_encoder` cannot build it."""
    from ml.prototypes.learned_encoder import LEARNED

    if model_name == LEARNED:
        build_encoder(model_name, pretrained)  # a small file: loading it is the check
    else:
        find_weights(model_name, pretrained)


def default_cache_path() -> Path:
    root = os.environ.get("PROTOMED_CACHE_DIR") or Path.home() / ".cache" / "protomed"
    return Path(root) / "embeddings.sqlite"


class EmbeddingCache:
    """SQLite (WAL) store: (encoder identity, image content hash) -> float32 vector."""

    _CHUNK = 500  # stay under SQLite's bound-variable limit

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (identity TEXT NOT NULL, hash TEXT NOT NULL,"
                " vector BLOB NOT NULL, PRIMARY KEY (identity, hash)) WITHOUT ROWID"
            )

    def get_many(self, identity: str, hashes: Sequence[str]) -> dict[str, npt.NDArray[np.float32]]:
        found: dict[str, npt.NDArray[np.float32]] = {}
        unique = list(dict.fromkeys(hashes))
        with self._lock:
            for i in range(0, len(unique), self._CHUNK):
                chunk = unique[i : i + self._CHUNK]
                rows = self._conn.execute(
                    "SELECT hash, vector FROM embeddings WHERE identity = ? AND hash IN "
                    f"({','.join('?' * len(chunk))})",
                    [identity, *chunk],
                ).fetchall()
                found.update((h, np.frombuffer(b, dtype=np.float32).copy()) for h, b in rows)
        return found

    def put_many(
        self, identity: str, hashes: Sequence[str], vectors: npt.NDArray[Any] | torch.Tensor
    ) -> None:
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().cpu().numpy()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(hashes):
            raise ValueError(f"need one vector per hash: {len(hashes)} hashes, {vectors.shape}")
        rows = [(identity, h, v.tobytes()) for h, v in zip(hashes, vectors, strict=True)]
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embed(
    encoder: ImageEncoder,
    images: torch.Tensor,
    hashes: list[str],
    cache: EmbeddingCache | None = None,
    batch_size: int = 32,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Embeddings (N, dim) float32 in input order; only cache misses are encoded (once per
    distinct hash), and stored back. ``on_batch(done, total)`` reports distinct images embedded
    (cached ones count as done at once), so a long embedding shows progress."""
    if len(hashes) != len(images):
        raise ValueError(f"{len(images)} images but {len(hashes)} hashes")
    found = cache.get_many(encoder.identity, hashes) if cache is not None else {}
    found = {h: v for h, v in found.items() if v.shape == (encoder.dim,)}
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first.setdefault(h, i)
    missing = [h for h in first if h not in found]
    cached = len(first) - len(missing)
    if on_batch is not None:
        on_batch(cached, len(first))
    if missing:
        # on_batch only when asked for: encoder stand-ins with the plain signature keep working
        extra = {} if on_batch is None else {"on_batch": lambda d: on_batch(cached + d, len(first))}
        vecs = encoder.encode(images[[first[h] for h in missing]], batch_size=batch_size, **extra)
        found.update(zip(missing, vecs.numpy(), strict=True))
        if cache is not None:
            cache.put_many(encoder.identity, missing, vecs)
    if not hashes:
        return torch.empty(0, encoder.dim)
    return torch.from_numpy(np.stack([found[h] for h in hashes]).astype(np.float32, copy=False))
