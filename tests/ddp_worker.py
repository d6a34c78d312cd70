"""Run under torchrun by test_train.py: trains 3 tiny steps with DDP and reports weight digests."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ml.config import make_config
from ml.data.images import ImageSet
from ml.diffusion.train import train


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    data = ImageSet(
        images,
        torch.arange(16) % 2,
        ["a", "b"],
        [f"{i}" for i in range(16)],
        [f"{i}" for i in range(16)],
    )
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 3, "batch_size": 2, "dropout": 0.0})
    torch.manual_seed(cfg.seed)
    from ml.diffusion.train import conditioning_for
    from ml.models.checkpoint import build_model

    initial = digest(build_model(cfg, conditioning_for("baseline", ["a", "b"], None)[0]))
    result = train(cfg, data, out / "run", show_progress=False)
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, digest(result.model))
    if rank == 0:
        report = {"world": result.world, "digests": digests, "initial": initial}
        (out / "ddp.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
