"""The scorer with a real Celery worker process (SQLite, embedded broker, local storage): a tiny
toy model generates a batch, a stand-in reviewer judges it (plausible: brighter than the
batch's median, so both verdicts occur), ``POST /scorers`` trains a scorer in the worker on the
untrained tiny CLIP encoder, and ``filter=plausible`` then keeps the top-scored of the images
drawn: the same images as the best of an unfiltered draw of the same seed, each of whose
provenance regenerates it pixel for pixel."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import Service
from factories import add_review, add_review_task
from PIL import Image as PILImage
from service_procs import Worker, train_tiny, wait_job

from service.criteria import latest
from service.db.models import Image
from service.db.session import get_sessionmaker
from service.reviews import project_for
from workers.scoring import ENCODER_FILES


def pixels(service: Service, url: str) -> np.ndarray:
    r = service.client.get(url, headers=service.admin)
    assert r.status_code == 200
    return np.asarray(PILImage.open(io.BytesIO(r.content)).convert("RGB"))


def generate(service: Service, worker: Worker, **params: object) -> dict:
    r = service.client.post("/generate", params=params, headers=service.admin)
    assert r.status_code == 202, r.text
    job = wait_job(service.client, r.json()["job"]["id"], worker=worker)
    assert job["status"] == "succeeded", (job, worker.tail())
    batch = service.client.get(f"/batches/{r.json()['batch']['id']}", headers=service.admin)
    return {"job": job, "batch": batch.json()}


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["clip", "learned"])
def test_a_worker_trains_a_scorer_and_filters_a_batch(service: Service, encoder: str) -> None:
    """``learned``: the service's prototypes come from the learned domain encoder, so the scorer
    embeds with the model's learned encoder, kept beside the scorer: the filter still works
    once the model's own codebook files are gone."""
    from ml.data.toy import write_toy_dataset
    from ml.diffusion.provenance import read_provenance
    from ml.diffusion.sample import regenerate
    from ml.prototypes.learned_encoder import JSON_NAME, TENSORS_NAME
    from service.storage import get_storage

    write_toy_dataset(service.data_root / "toy", n_per_class=12, size=32, seed=0)
    admin = service.admin
    r = service.client.post(
        "/datasets", json={"name": "toy", "path": "toy", "domain": "toy"}, headers=admin
    )
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    extra = {"PROTOMED_PROTOTYPE_ENCODER": "learned"} if encoder == "learned" else {}
    worker = Worker({**service.env, **extra}, service.tmp / "worker.log")
    try:
        worker.wait_ready()
        model_id = train_tiny(
            service.client, admin, dataset_id, worker, mode="baseline", n_heldout=4
        )["model_id"]
        common = {"class": "lymphocyte", "steps": 2, "model_id": model_id}
        pool = generate(service, worker, n=24, seed=1, **common)["batch"]
        assert pool["scorer_id"] is None and all(i["score"] is None for i in pool["images"])

        # the stand-in reviewer: brighter than the median image is plausible
        brightness = [float(pixels(service, i["url"]).mean()) for i in pool["images"]]
        median = float(np.median(brightness))
        with get_sessionmaker()() as s:
            criteria = latest(s, "toy")
            assert criteria is not None
            project = project_for(s, criteria)
            for n, (img, light) in enumerate(zip(pool["images"], brightness, strict=True)):
                row = s.get(Image, img["id"])
                assert row is not None
                add_review(
                    s,
                    add_review_task(s, project, row),
                    ls_annotation_id=n + 1,
                    reviewer="stand-in",
                    plausible=light > median,
                )
            s.commit()

        r = service.client.post("/scorers", json={"domain": "toy"}, headers=admin)
        assert r.status_code == 202, r.text
        job = wait_job(service.client, r.json()["id"], worker=worker)
        assert job["status"] == "succeeded", (job, worker.tail())
        result = job["result"]
        assert (result["images"], result["verdicts"], result["plausible"]) == (24, 24, 12)
        scorer = service.client.get(f"/scorers/{result['scorer_id']}", headers=admin).json()
        assert scorer["version"] == 1 and scorer["latest"] and scorer["n_images"] == 24
        storage = get_storage()
        if encoder == "clip":
            assert "untrained" in scorer["encoder"]
        else:
            with get_sessionmaker()() as s:
                from service.db.models import Model

                book = s.get(Model, model_id).codebook_path  # type: ignore[union-attr]
            own = json.loads(storage.get_bytes(f"{book}/codebook.json"))["encoder"]
            assert own.startswith("learned:") and scorer["encoder"] == own
            assert ENCODER_FILES == (JSON_NAME, TENSORS_NAME)
            storage.delete_prefix(f"{book}/encoder.")  # the scorer keeps its own copy
            assert not storage.list_keys(f"{book}/encoder.")
        cv = scorer["metrics"]["cv"]
        assert cv["n"] == 24 and cv["auc"] is not None and len(cv["auc_ci"]) == 2
        assert sum(b["count"] for b in cv["calibration"]) == 24

        filtered = generate(
            service, worker, n=3, seed=5, filter="plausible", oversample=3, **common
        )
        full = generate(service, worker, n=9, seed=5, **common)
        # a threshold that only the two best of the same draw reach: two images, and it says so
        second = sorted((i["score"] for i in full["batch"]["images"]), reverse=True)[1]
        few = generate(
            service,
            worker,
            n=3,
            seed=5,
            filter="plausible",
            oversample=3,
            threshold=second - 1e-6,
            **common,
        )
    finally:
        worker.stop()

    batch, every = filtered["batch"], full["batch"]
    assert batch["drawn"] == 9 and batch["scorer_id"] == scorer["id"]
    assert batch["filter"] == {"kind": "plausible", "oversample": 3, "threshold": None}
    assert filtered["job"]["result"]["drawn"] == 9 and filtered["job"]["result"]["images"] == 3
    assert [i["index"] for i in batch["images"]] == [0, 1, 2]
    # the unfiltered draw of the same seed holds the same 9 images, scored by the same scorer
    assert every["drawn"] == 9 and every["scorer_id"] == scorer["id"]
    scores = [i["score"] for i in every["images"]]
    best = sorted(sorted(range(9), key=lambda i: (-scores[i], i))[:3])
    assert [i["score"] for i in batch["images"]] == pytest.approx([scores[i] for i in best])
    with get_sessionmaker()() as s:
        from service.db.models import Model

        model = s.get(Model, model_id)
        assert model is not None and model.checkpoint_path
        ckpt = service.tmp / "regen" / "checkpoint.pt"
        storage.download(model.checkpoint_path, ckpt)
    for kept, draw in zip(batch["images"], best, strict=True):
        shown = pixels(service, kept["url"])
        assert (shown == pixels(service, every["images"][draw]["url"])).all()
        png = service.client.get(kept["url"], headers=admin).content
        record = read_provenance(png)
        assert record is not None and (record.index, record.n) == (draw, 9)
        again = regenerate(ckpt, record).permute(1, 2, 0).numpy()
        assert (again == shown).all()  # the kept image's record draws it again exactly
    assert len(few["batch"]["images"]) == 2 and few["batch"]["drawn"] == 9
    assert "2 of the 3 images asked for" in few["job"]["result"]["short"]
    page = service.client.get(f"/ui/batches/{batch['id']}", headers=admin).text
    assert "most plausible of 9 drawn" in page and f"/ui/scorers/{scorer['id']}" in page
