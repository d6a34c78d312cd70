"""Convolutional prototype learning (Yang et al., CVPR 2018) on CLIP embeddings.

K prototypes m_cj per class live in the feature space f(x) (f = identity, or a learnable linear
head initialised to the identity). Training minimises distance-based cross-entropy (DCE) plus
lambda times the prototype loss (PL, squared distance to the nearest own-class prototype). The
result is a Codebook: the prototypes become a frozen class-embedding table for the diffusion model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ml.console import progress_bar
from ml.errors import Invalid, NotFound

FORMAT_VERSION = 1
JSON_NAME, TENSORS_NAME = "codebook.json", "codebook.safetensors"


class CPLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(1, ge=1, description="prototypes per class")
    gamma: float = Field(10.0, gt=0, description="DCE temperature on squared distances")
    lam: float = Field(0.01, ge=0, description="weight of the prototype loss")
    head: Literal["linear"] | None = None
    epochs: int = Field(200, ge=0)
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(256, ge=1)
    seed: int = 0


def write_artifact(
    directory: Path,
    json_name: str,
    tensors_name: str,
    tensors: dict[str, torch.Tensor],
    meta: Callable[[str], dict[str, Any]],
) -> str:
    """Write a safetensors file and its JSON (``meta(sha256 of the tensors file)`` plus that
    checksum), each through a temp file and os.replace, so a reader never sees half a pair
    that checks out. Returns the checksum. Shared by codebooks and learned encoders."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp_t, tmp_j = directory / f".{tensors_name}.tmp", directory / f".{json_name}.tmp"
    save_file(tensors, str(tmp_t), metadata={"format": "pt"})
    sha = hashlib.sha256(tmp_t.read_bytes()).hexdigest()
    tmp_j.write_text(json.dumps({**meta(sha), "tensors_sha256": sha}, indent=1))
    os.replace(tmp_t, directory / tensors_name)
    os.replace(tmp_j, directory / json_name)
    return sha


def artifact_files(
    directory: Path, json_name: str, tensors_name: str, what: str, missing: str
) -> tuple[Path, Path]:
    """The (JSON, tensors) paths of a saved pair; FileNotFoundError naming the missing one."""
    jpath, tpath = directory / json_name, directory / tensors_name
    for p in (jpath, tpath):
        if not p.is_file():
            raise NotFound(f"no {what} at {directory}: {p.name} missing ({missing})")
    return jpath, tpath


def read_artifact(
    jpath: Path, tpath: Path, version: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON and tensors of a pair, ValueError unless its format version is known and the
    tensors file matches the checksum recorded in the JSON."""
    meta = json.loads(jpath.read_text())
    if meta["format_version"] > version:
        raise Invalid(f"format version {meta['format_version']} is newer than this code's")
    if hashlib.sha256(tpath.read_bytes()).hexdigest() != meta["tensors_sha256"]:
        raise Invalid(f"{tpath.name} does not match {jpath.name} (checksum)")
    return meta, load_file(str(tpath))


def sq_dists(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(N, D), (C, K, D) -> (N, C, K) squared Euclidean distances (exact, no expansion)."""
    return (features[:, None, None, :] - prototypes[None]).pow(2).sum(-1)


def dce_loss(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, gamma: float
) -> torch.Tensor:
    """-log sum_j softmax_{all c,j}(-gamma ||f - m_cj||^2)[y, j], averaged over the batch."""
    logits = -gamma * sq_dists(features, prototypes)  # (N, C, K)
    own = logits[torch.arange(len(labels)), labels]  # (N, K)
    return (logits.flatten(1).logsumexp(1) - own.logsumexp(1)).mean()


def pl_loss(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared distance to the nearest prototype of the true class, averaged over the batch."""
    d = sq_dists(features, prototypes)[torch.arange(len(labels)), labels]  # (N, K)
    return d.min(1).values.mean()


@dataclass
class PrototypeReport:
    n_train: int
    n_heldout: int
    train_acc: float
    final_loss: float
    nearest_prototype_acc: float | None = None
    majority_acc: float | None = None
    logreg_acc: float | None = None
    intra_inter_ratio: float | None = None
    # The learned domain encoder (ml.prototypes.learned_encoder) only: the same network at its
    # seeded
    # initialisation (prototypes fitted on its fixed features), the training it got, and which
    # images chose its stopping epoch (so a reader knows the held-out numbers' footing).
    encoder_kind: str = "clip"
    untrained_nearest_prototype_acc: float | None = None
    untrained_logreg_acc: float | None = None
    encoder_training: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Codebook:
    classes: list[str]
    prototypes: torch.Tensor  # (C, K, D) float32, in head space
    weights: torch.Tensor  # (C, K): share of the class's training images nearest each prototype
    encoder: str  # encoder identity the embeddings came from
    gamma: float = 10.0
    lam: float = 0.01
    head: str | None = None
    head_state: dict[str, torch.Tensor] | None = None  # {"weight", "bias"} of the linear head
    assignments: dict[str, int] = field(default_factory=dict)  # image key -> own-class proto j
    selection: dict[str, Any] = field(default_factory=dict)  # caller's data selection
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def dim(self) -> int:
        return int(self.prototypes.shape[2])

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        emb = emb.float()
        if self.head_state is None:
            return emb
        return F.linear(emb, self.head_state["weight"], self.head_state["bias"])

    def nearest(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class index and within-class prototype index of each embedding's nearest prototype."""
        flat = sq_dists(self.features(emb), self.prototypes).flatten(1).argmin(1)
        return flat // self.k, flat % self.k

    def table(self) -> torch.Tensor:
        """(C*K, D) rows for an embedding table; row c*K + j is prototype j of class c."""
        return self.prototypes.reshape(-1, self.dim)

    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {"prototypes": self.prototypes, "weights": self.weights}
        for name, v in (self.head_state or {}).items():
            t[f"head.{name}"] = v
        return {n: v.detach().float().contiguous().cpu() for n, v in t.items()}

    def save(self, directory: str | Path) -> Path:
        """Write codebook.safetensors + codebook.json (each via a temp file and os.replace)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "k": self.k,
            "dim": self.dim,
            "encoder": self.encoder,
            "gamma": self.gamma,
            "lam": self.lam,
            "head": self.head,
            "selection": self.selection,
            "report": self.report,
            "assignments": self.assignments,
        }
        directory = Path(directory)
        write_artifact(directory, JSON_NAME, TENSORS_NAME, self._tensors(), lambda _sha: meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Codebook:
        directory = Path(directory)
        if directory.name == JSON_NAME:
            directory = directory.parent
        missing = f"expected {JSON_NAME} + {TENSORS_NAME}, written by `protomed prototypes`"
        jpath, tpath = artifact_files(directory, JSON_NAME, TENSORS_NAME, "codebook", missing)
        try:
            meta, t = read_artifact(jpath, tpath, FORMAT_VERSION)
            protos, weights = t["prototypes"], t["weights"]
            c, k, d = len(meta["classes"]), meta["k"], meta["dim"]
            if tuple(protos.shape) != (c, k, d) or tuple(weights.shape) != (c, k):
                raise ValueError(f"tensor shapes {tuple(protos.shape)} disagree with C={c} K={k}")
            head = {n[5:]: v for n, v in t.items() if n.startswith("head.")} or None
            return cls(
                classes=list(meta["classes"]),
                prototypes=protos,
                weights=weights,
                encoder=meta["encoder"],
                gamma=meta["gamma"],
                lam=meta["lam"],
                head=meta["head"],
                head_state=head,
                assignments=meta["assignments"],
                selection=meta["selection"],
                report=meta["report"],
            )
        except (ValueError, KeyError, TypeError, SafetensorError) as e:
            raise Invalid(f"corrupt codebook at {directory}: {e}") from e


def _kmeans(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Initial prototypes of one class, (n, D) -> (k, D): the mean for K=1, else scikit-learn's
    k-means (k-means++ seeding, Lloyd iterations, best inertia of 10 starts). Its random state is
    drawn from ``gen``, so one seed gives one codebook, and K=1 leaves ``gen`` untouched."""
    if k == 1:
        return x.mean(0, keepdim=True)
    from sklearn.cluster import KMeans  # imported here: slow to import, and only K > 1 needs it

    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x.double().numpy())
    return torch.from_numpy(km.cluster_centers_).to(x.dtype)


def init_prototypes(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, k: int, gen: torch.Generator
) -> torch.Tensor:
    """(C, K, D) starting prototypes: each class's mean (K=1) or k-means centres."""
    return torch.stack([_kmeans(x[y == c], k, gen) for c in range(n_classes)])


def _own_nearest(feats: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return sq_dists(feats, protos)[torch.arange(len(labels)), labels].argmin(1)


def _report(
    book: Codebook,
    x: torch.Tensor,
    y: torch.Tensor,
    hx: torch.Tensor | None,
    hy: torch.Tensor | None,
    final_loss: float,
) -> PrototypeReport:
    pred = book.nearest(x)[0]
    rep = PrototypeReport(
        n_train=len(y),
        n_heldout=0 if hy is None else len(hy),
        train_acc=(pred == y).float().mean().item(),
        final_loss=final_loss,
    )
    if hx is None or hy is None or len(hy) == 0:
        return rep
    rep.nearest_prototype_acc = (book.nearest(hx)[0] == hy).float().mean().item()
    rep.majority_acc = (hy == torch.bincount(y).argmax()).float().mean().item()
    if len(torch.unique(y)) > 1:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(x.double().numpy(), y.numpy())
        rep.logreg_acc = float(np.mean(probe.predict(hx.double().numpy()) == hy.numpy()))
    c, k = book.prototypes.shape[:2]
    if c > 1:
        d_own = sq_dists(book.features(hx), book.prototypes)[torch.arange(len(hy)), hy]
        intra = d_own.min(1).values.sqrt().mean()
        cls_of = torch.arange(c).repeat_interleave(k)
        pair = torch.cdist(book.table(), book.table())[cls_of[:, None] != cls_of[None, :]]
        rep.intra_inter_ratio = (intra / pair.mean()).item()
    return rep


def check_labels(y: torch.Tensor, n: int, classes: Sequence[str], k: int) -> None:
    """ValueError unless the n samples' labels index ``classes`` with >= k images each."""
    n_cls = len(classes)
    if len(y) != n:
        raise ValueError(f"{n} samples but {len(y)} labels")
    if n == 0 or y.min() < 0 or y.max() >= n_cls:
        raise ValueError(f"labels must index the {n_cls} classes (got {n} samples)")
    counts = torch.bincount(y, minlength=n_cls)
    if (counts < k).any():
        few = [f"{classes[c]}={int(counts[c])}" for c in range(n_cls) if counts[c] < k]
        raise Invalid(f"every class needs >= k={k} training images; short: {', '.join(few)}")


def fit_prototypes(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int],
    classes: Sequence[str],
    cfg: CPLConfig,
    *,
    heldout_emb: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | Sequence[int] | None = None,
    encoder_identity: str,
    hashes: list[str] | None = None,
    progress: bool = False,
    on_epoch: Callable[[int, int], None] | None = None,
) -> tuple[Codebook, PrototypeReport]:
    """Learn cfg.k prototypes per class (k-means init, Adam on DCE + lam * PL), seeded.
    ``on_epoch(done, epochs)`` is called before the first epoch and after each one (job
    progress; it may raise to stop the fit)."""
    x = train_emb.detach().float().cpu()
    y = torch.as_tensor(train_labels, dtype=torch.long).cpu()
    n, dim = x.shape
    n_cls, k = len(classes), cfg.k
    if hashes is not None and len(hashes) != n:
        raise ValueError(f"{n} embeddings, {len(y)} labels, {len(hashes)} hashes")
    check_labels(y, n, classes, k)

    gen = torch.Generator().manual_seed(cfg.seed)
    init = init_prototypes(x, y, n_cls, k, gen)
    protos = torch.nn.Parameter(init.clone())
    params = [protos]
    head = None
    if cfg.head == "linear":
        head = {
            "weight": torch.nn.Parameter(torch.eye(dim)),
            "bias": torch.nn.Parameter(torch.zeros(dim)),
        }
        params += list(head.values())

    def feats(inp: torch.Tensor) -> torch.Tensor:
        return inp if head is None else F.linear(inp, head["weight"], head["bias"])

    def loss_fn(inp: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        f = feats(inp)
        return dce_loss(f, lab, protos, cfg.gamma) + cfg.lam * pl_loss(f, lab, protos)

    opt = torch.optim.Adam(params, lr=cfg.lr)
    bar = progress_bar(range(cfg.epochs), desc="prototypes", unit="epoch", disable=not progress)
    if on_epoch is not None:
        on_epoch(0, cfg.epochs)
    for epoch in bar:
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            loss = loss_fn(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, cfg.epochs)
    with torch.no_grad():
        final_loss = loss_fn(x, y).item()

    head_state = None if head is None else {n_: p.detach().clone() for n_, p in head.items()}
    return finish_codebook(
        protos.detach().clone(),
        x,
        y,
        classes,
        cfg,
        encoder_identity=encoder_identity,
        final_loss=final_loss,
        heldout_emb=heldout_emb,
        heldout_labels=heldout_labels,
        hashes=hashes,
        head_state=head_state,
    )


def finish_codebook(
    prototypes: torch.Tensor,
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    classes: Sequence[str],
    cfg: CPLConfig,
    *,
    encoder_identity: str,
    final_loss: float,
    heldout_emb: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | Sequence[int] | None = None,
    hashes: list[str] | None = None,
    head_state: dict[str, torch.Tensor] | None = None,
) -> tuple[Codebook, PrototypeReport]:
    """A codebook from learned prototypes (C, K, D): each prototype's share of its class's
    training images, the images' assignments and the held-out report. Shared by the fit on fixed
    embeddings above and the learned domain encoder, whose prototypes were trained jointly with
    its network (:mod:`ml.prototypes.learned_encoder`)."""
    x = train_emb.detach().float().cpu()
    y = torch.as_tensor(train_labels, dtype=torch.long).cpu()
    n_cls, k = prototypes.shape[:2]
    counts = torch.bincount(y, minlength=n_cls)
    book = Codebook(
        classes=list(classes),
        prototypes=prototypes,
        weights=torch.zeros(n_cls, k),
        encoder=encoder_identity,
        gamma=cfg.gamma,
        lam=cfg.lam,
        head=cfg.head,
        head_state=head_state,
    )
    with torch.no_grad():
        own = _own_nearest(book.features(x), y, book.prototypes)
        for c in range(n_cls):
            book.weights[c] = torch.bincount(own[y == c], minlength=k).float() / counts[c]
        if hashes is not None:
            book.assignments = {h: int(j) for h, j in zip(hashes, own, strict=True)}
        hx = None if heldout_emb is None else heldout_emb.detach().float().cpu()
        hy = None if heldout_labels is None else torch.as_tensor(heldout_labels, dtype=torch.long)
        report = _report(book, x, y, hx, hy, final_loss)
    book.report = report.to_dict()
    return book, report
