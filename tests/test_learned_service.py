"""The service with the learned domain encoder: a training request needs no CLIP weights, and
the training job learns its prototypes with an encoder trained on the dataset."""

from __future__ import annotations

import json

from conftest import Service

from ml.data.toy import write_toy_dataset


def test_training_with_the_learned_encoder_needs_no_clip_weights(service: Service, monkeypatch):
    """CLIP weights configured but absent: a training request is refused (422), unless the
    prototypes' encoder is the learned one; its job then writes a codebook whose encoder is
    ``learned:<sha256>``, saved beside it, and trains the model on it."""
    from service.config import get_settings
    from workers.tasks import run_job

    write_toy_dataset(service.data_root / "toy", n_per_class=8, size=32, seed=0)
    r = service.client.post("/datasets", json={"name": "t", "path": "toy"}, headers=service.admin)
    assert r.status_code == 201, r.text
    monkeypatch.setenv("HF_HUB_CACHE", str(service.tmp / "empty-hub"))
    monkeypatch.setenv("PROTOMED_ENCODER", "ViT-L-14")
    monkeypatch.setenv("PROTOMED_ENCODER_WEIGHTS", "openai")
    get_settings.cache_clear()
    body = {
        "dataset_id": r.json()["id"],
        "mode": "prototype",
        "preset": "cpu-small",
        "n_per_class": 6,
        "n_heldout": 2,
        "overrides": {"max_steps": 2, "batch_size": 4},
    }
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 422 and "PROTOMED_ENCODER_WEIGHTS" in r.json()["detail"], r.text

    monkeypatch.setenv("PROTOMED_PROTOTYPE_ENCODER", "learned")
    get_settings.cache_clear()
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 202, r.text
    job = r.json()["jobs"][0]
    assert run_job(job["id"], "train", "test@host:1") == "succeeded", service.client.get(
        f"/jobs/{job['id']}", headers=service.admin
    ).json()
    book_dir = get_settings().work_dir / "models" / str(job["model_id"]) / "codebook"
    book = json.loads((book_dir / "codebook.json").read_text())
    assert book["encoder"].startswith("learned:"), book["encoder"]
    assert book["report"]["encoder_kind"] == "learned"
    meta = json.loads((book_dir / "encoder.json").read_text())
    assert meta["identity"] == book["encoder"]
    model = service.client.get(f"/models/{job['model_id']}", headers=service.admin).json()
    assert book["encoder"] in json.dumps(model), "the model names the learned encoder"
    card = service.client.get(f"/models/{job['model_id']}/card", headers=service.admin)
    assert card.status_code == 200, card.text
    assert book["encoder"] in card.text and "learned from the training images" in card.text
