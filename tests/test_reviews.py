"""The expert review loop against a real Label Studio server (started by .ci/run; locally set
PROTOMED_TEST_LABEL_STUDIO_URL and PROTOMED_TEST_LABEL_STUDIO_TOKEN), with the API as a real
HTTP server (Label Studio posts webhooks to it), a real Celery worker (Redis broker) and SQLite.

The automated reviewers are two Label Studio users whose annotations are posted through Label
Studio's API, as an expert's clicks in its UI would be; their verdicts come from the toy
domain's rule-based checker (the second reviewer is lenient on granules, so they disagree).
The batches hold real toy cells, some of another class than their batch says, so verdicts
differ between the models (training itself is covered by test_service_e2e).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from conftest import ADMIN_KEY, migrate, reset_service_caches, service_env
from PIL import Image as PILImage
from service_procs import ApiServer, TcpProxy, Worker, free_port, wait_job

pytestmark = pytest.mark.slow
SECRET = "webhook-secret-for-tests"
CLASSES = ("lymphocyte", "neutrophil")
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def ls_settings() -> tuple[str, str]:
    url = os.environ.get("PROTOMED_TEST_LABEL_STUDIO_URL")
    token = os.environ.get("PROTOMED_TEST_LABEL_STUDIO_TOKEN")
    reason = "PROTOMED_TEST_LABEL_STUDIO_URL/TOKEN not set (.ci/run starts Label Studio)"
    if url and token:
        try:
            httpx.get(url + "/health", timeout=5).raise_for_status()
            return url, token
        except httpx.HTTPError as exc:
            reason = f"Label Studio at {url} does not answer: {exc}"
    if os.environ.get("PROTOMED_REQUIRE_SERVICES"):
        pytest.fail(f"PROTOMED_REQUIRE_SERVICES is set but {reason}")
    pytest.skip(reason)


@dataclass
class Loop:
    api: httpx.Client
    ls: Any  # label_studio_sdk.LabelStudio, direct (not through the proxy)
    proxy: TcpProxy
    worker: Worker
    env: dict[str, str]
    batches: dict[tuple[str, str], int]  # (mode, class) -> batch id
    truth: dict[int, tuple[str, str, str]]  # image id -> (mode, class, drawn class)
    reviewers: list[int]  # Label Studio user ids
    emails: list[str]  # ...and their e-mails


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def seed_batches(env: dict[str, str]) -> tuple[dict, dict]:
    """Toy-domain dataset, a ready baseline and prototype model, one 6-image batch per model
    and class; the prototype batches hold 5 right cells, the baseline ones 3."""
    from ml.toy import draw_cell
    from service.db.models import Batch, Dataset, Image, Model, ModelMode, ModelStatus
    from service.db.session import get_sessionmaker
    from service.storage import get_storage

    rng = np.random.default_rng(0)
    storage, batches, truth = get_storage(), {}, {}
    with get_sessionmaker()() as s:
        ds = Dataset(name="toy", root="/nowhere", layout="folder", classes=list(CLASSES),
                     counts=dict.fromkeys(CLASSES, 6), domain="toy")  # fmt: skip
        for mode, right in (("baseline", 3), ("prototype", 5)):
            model = Model(dataset=ds, mode=ModelMode(mode), preset="tiny", config={},
                          classes=list(CLASSES), status=ModelStatus.ready)  # fmt: skip
            for cls in CLASSES:
                other = CLASSES[1 - CLASSES.index(cls)]
                batch = Batch(model=model, class_name=cls, n=6, guidance=2, steps=50, seed=0,
                              scheduler="ddim")  # fmt: skip
                s.add(batch)
                s.flush()
                for i in range(6):
                    drawn = cls if i < right else other
                    data = _png(draw_cell(drawn, rng, 64))
                    key = f"batches/{batch.id}/{cls}_{i:04d}.png"
                    storage.put_bytes(key, data, "image/png")
                    img = Image(batch=batch, class_name=cls, index=i, storage_key=key,
                                sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
                    s.add(img)
                    s.flush()
                    truth[img.id] = (mode, cls, drawn)
                batches[(mode, cls)] = batch.id
        s.commit()
    return batches, truth


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from label_studio_sdk import LabelStudio

    ls_url, ls_token = ls_settings()
    tmp = tmp_path_factory.mktemp("reviews")
    (tmp / "data").mkdir()
    host, port = ls_url.split("//")[1].split(":")
    proxy = TcpProxy(host, int(port.rstrip("/")))
    proxy.start()
    api_port = free_port()
    broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    redis.Redis.from_url(broker).flushdb()
    env = service_env(
        tmp,
        PROTOMED_BROKER_URL=broker,
        PROTOMED_LABEL_STUDIO_URL=f"http://127.0.0.1:{proxy.port}",
        PROTOMED_LABEL_STUDIO_TOKEN=ls_token,
        PROTOMED_LABEL_STUDIO_PUBLIC_URL=ls_url,
        PROTOMED_PUBLIC_URL=f"http://127.0.0.1:{api_port}",
        PROTOMED_REVIEW_WEBHOOK_SECRET=SECRET,
        PROTOMED_REVIEW_SYNC_RETRY_S="1",
        PROTOMED_REVIEW_PULL_S="3600",  # the periodic pull stays out of the way; tests pull
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        reset_service_caches()
        migrate(env["PROTOMED_DATABASE_URL"])
        batches, truth = seed_batches(env)
        reset_service_caches()
    api = ApiServer(env, tmp / "api.log", port=api_port)
    worker = Worker(env, tmp / "worker.log", queues="default")
    ls = LabelStudio(base_url=ls_url, api_key=ls_token, timeout=30)
    suffix = __import__("uuid").uuid4().hex[:8]  # Label Studio keeps users between runs
    try:
        emails = [f"{n}-{suffix}@protomed.local" for n in ("expert-a", "expert-b")]
        reviewers = [ls.users.create(email=e, username=e.split("@")[0]).id for e in emails]
        api.wait_ready()
        worker.wait_ready()
        # an admin's client: reads need a key once they are locked by default
        with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
            yield Loop(client, ls, proxy, worker, env, batches, truth, reviewers, emails)
    finally:
        worker.stop()
        api.stop()
        proxy.stop()
        redis.Redis.from_url(broker).flushdb()


def checker_result(img_png: bytes, expected: str, lenient: bool) -> tuple[list[dict], bool]:
    """A reviewer's Label Studio result from the toy checker's verdict on the image; the
    lenient reviewer marks granules n/a."""
    from ml.toy import check_image
    from service.criteria import annotation_result

    verdict = check_image(PILImage.open(io.BytesIO(img_png)).convert("RGB"), expected)
    crits = {c.name: "pass" if c.passed else "fail" for c in verdict.criteria}
    if lenient:
        crits["granules"] = "na"
    return annotation_result(crits), "fail" not in crits.values()


def ls_tasks(loop: Loop, ls_project_id: int) -> list[dict]:
    raw = loop.ls.projects.exports.download_sync(
        ls_project_id, export_type="JSON", download_all_tasks=True
    )
    return json.loads(b"".join(raw))


def report(loop: Loop, **filters: str) -> dict:
    r = loop.api.get("/reports/plausibility", params=filters, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def wait_reviews(loop: Loop, n: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rep = report(loop)
        total = sum(m["reviews"] for m in rep["average"]["pooled"].values())
        if total == n:
            return rep
        time.sleep(0.3)
    raise TimeoutError(f"{total} reviews, expected {n}")


STATE: dict[str, Any] = {}


def test_sync_imports_blinded_shuffled_tasks(loop: Loop) -> None:
    ids = [loop.batches[(m, c)] for m in ("baseline", "prototype") for c in CLASSES]
    r = loop.api.post("/reviews", json={"batch_ids": ids}, headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json()["added"] == 24 and r.json()["project"]["domain"] == "toy"
    job = wait_job(loop.api, r.json()["job"]["id"], worker=loop.worker, timeout=120)
    assert job["status"] == "succeeded", (job, loop.worker.tail())
    project = loop.api.get("/reviews/projects", headers=AUTH).json()[0]
    assert project["tasks"] == 24 and project["ls_project_id"]
    tasks = ls_tasks(loop, project["ls_project_id"])
    assert len(tasks) == 24
    for t in tasks:  # blinded: only the image, the class it should show, an opaque ref
        assert set(t["data"]) == {"image", "expected_class", "ref"}
        assert "batch" not in t["data"]["image"] and "model" not in t["data"]["image"]
    # shuffled: Label Studio's order is not the batches' order
    order = [loop.api.get(t["data"]["image"]).content for t in tasks]  # no key, as LS does
    assert all(len(png) > 100 for png in order)
    # blinded bytes: no review image's hash is one the batches list (test_blinding.py has more)
    listed = {
        img["sha256"]
        for b in ids
        for img in loop.api.get(f"/batches/{b}", headers=AUTH).json()["images"]
    }
    assert len(listed) == 24 and not {hashlib.sha256(png).hexdigest() for png in order} & listed
    anonymous = httpx.get(loop.api.base_url.join(f"/batches/{ids[0]}"), timeout=30)
    assert anonymous.status_code == 401  # and no key reads batches
    modes = [loop.truth[i][0] for i in _image_ids_in(loop, tasks)]
    assert modes != sorted(modes) and modes != sorted(modes, reverse=True)
    STATE["project"] = project
    STATE["tasks"] = tasks


def _image_ids_in(loop: Loop, tasks: list[dict]) -> list[int]:
    """Image ids behind Label Studio tasks, read from our database (the test knows; LS not)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(loop.env["PROTOMED_DATABASE_URL"])
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT token, image_id FROM review_tasks")).all())
    engine.dispose()
    return [rows[t["data"]["ref"]] for t in tasks]


def test_reviewers_verdicts_make_the_report(loop: Loop) -> None:
    tasks = STATE["tasks"]
    image_ids = _image_ids_in(loop, tasks)
    expected: dict[tuple[str, str], list[bool]] = {}
    posted = []
    for task, image_id in zip(tasks, image_ids, strict=True):
        png = loop.api.get(task["data"]["image"]).content
        mode, cls, _drawn = loop.truth[image_id]
        for who, lenient in zip(loop.reviewers, (False, True), strict=True):
            result, plausible = checker_result(png, task["data"]["expected_class"], lenient)
            ann = loop.ls.annotations.create(task["id"], result=result, completed_by=who)
            posted.append(ann.id)
            expected.setdefault((mode, cls), []).append(plausible)
    rep = wait_reviews(loop, 48)  # every verdict arrived by webhook
    cols = {m["mode"]: str(m["id"]) for m in rep["models"]}
    for row in rep["classes"]:
        for mode in ("baseline", "prototype"):
            got = row["models"][cols[mode]]
            want = expected[(mode, row["class"])]
            assert got["reviews"] == len(want) == 12 and got["images"] == 6
            assert got["plausible"] == sum(want), (mode, row["class"])
            assert got["rate"] == pytest.approx(sum(want) / len(want))
        diff = row["difference"]["value"]
        p_base = sum(expected[("baseline", row["class"])]) / 12
        p_proto = sum(expected[("prototype", row["class"])]) / 12
        assert diff == pytest.approx(p_proto - p_base)
    assert rep["agreement"]["method"] == "cohen" and rep["agreement"]["items"] == 24
    csv_text = loop.api.get("/reports/plausibility", params={"format": "csv"}, headers=AUTH).text
    assert csv_text.splitlines()[0].startswith("class,")
    STATE["posted"] = posted
    STATE["expected"] = expected


def test_report_filters_by_reviewer_id_or_email(loop: Loop) -> None:
    """Label Studio gives the reviewer's user id; protomed also keeps the e-mail, so either
    selects the same 24 verdicts."""
    for uid, email in zip(loop.reviewers, loop.emails, strict=True):
        counts = [
            sum(m["reviews"] for m in report(loop, reviewer=who)["average"]["pooled"].values())
            for who in (str(uid), email, email.upper())
        ]
        assert counts == [24, 24, 24], (uid, email, counts)
    assert report(loop, reviewer="nobody@protomed.local")["classes"] == []


def test_same_webhook_twice_counts_once_and_wrong_secret_is_refused(loop: Loop) -> None:
    before = report(loop)
    ann = loop.ls.annotations.get(STATE["posted"][0])
    payload = {"action": "ANNOTATION_UPDATED", "annotation": ann.model_dump(mode="json")}
    for _ in range(2):
        r = loop.api.post("/reviews/webhook", json=payload, headers={"X-Protomed-Secret": SECRET})
        assert r.status_code == 200 and r.json()["applied"] == 1
    assert report(loop)["average"] == before["average"]
    bad = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": STATE["posted"][0]}]}
    r = loop.api.post("/reviews/webhook", json=bad, headers={"X-Protomed-Secret": "guess"})
    assert r.status_code == 403
    r = loop.api.post("/reviews/webhook", json=bad)
    assert r.status_code == 403
    assert report(loop)["average"] == before["average"]


def hook(loop: Loop, body: dict) -> httpx.Response:
    """A webhook as anyone who read the secret from Label Studio's webhook list can post it."""
    return loop.api.post("/reviews/webhook", json=body, headers={"X-Protomed-Secret": SECRET})


def stored_verdicts(loop: Loop) -> dict[int, tuple]:
    """Every stored verdict straight from protomed's database: annotation id -> (task, reviewer,
    plausible, overall, criteria)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(loop.env["PROTOMED_DATABASE_URL"])
    sql = "SELECT ls_annotation_id, task_id, reviewer, plausible, overall, criteria FROM reviews"
    with engine.connect() as conn:
        rows = {
            ann: (task, who, bool(ok), overall, json.loads(crits))
            for ann, task, who, ok, overall, crits in conn.execute(text(sql)).all()
        }
    engine.dispose()
    return rows


def flipped(result: list[dict]) -> list[dict]:
    """The opposite verdict: every criterion and the overall choice turned around."""
    turn = {"pass": "fail", "fail": "pass", "na": "fail",
            "plausible": "implausible", "implausible": "plausible"}  # fmt: skip
    return [{**r, "value": {"choices": [turn[r["value"]["choices"][0]]]}} for r in result]


def test_forged_webhook_for_an_annotation_label_studio_does_not_have_changes_nothing(
    loop: Loop,
) -> None:
    """Label Studio shows webhook headers to every user of its organisation, so the secret
    is no proof: a verdict that exists only in the webhook body must not count."""
    before, stored = report(loop), stored_verdicts(loop)
    real = loop.ls.annotations.get(STATE["posted"][0]).model_dump(mode="json")
    ghost = max(STATE["posted"]) + 1_000_000
    with pytest.raises(Exception, match="404"):  # Label Studio has no such annotation
        loop.ls.annotations.get(ghost)
    task = next(t for t in STATE["tasks"] if t["id"] == real["task"])  # a real task of ours
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        fake = {**real, "id": ghost, "result": flipped(real["result"])}
        body = {"action": action, "annotation": fake, "task": task, "project": {"id": 1}}
        r = hook(loop, body)
        assert r.status_code == 200 and r.json()["applied"] == 0, r.text
    assert stored_verdicts(loop) == stored
    assert report(loop)["average"] == before["average"]


def test_forged_result_for_a_real_annotation_keeps_label_studios_verdict(loop: Loop) -> None:
    from service.criteria import parse_result

    before, stored = report(loop), stored_verdicts(loop)
    ann = loop.ls.annotations.get(STATE["posted"][0]).model_dump(mode="json")
    body = {"action": "ANNOTATION_UPDATED", "annotation": {**ann, "result": flipped(ann["result"])}}
    r = hook(loop, body)
    assert r.status_code == 200, r.text
    assert stored_verdicts(loop) == stored
    keys = [r["from_name"][5:] for r in ann["result"] if r["from_name"].startswith("crit_")]
    truth = parse_result(ann["result"], keys)  # what Label Studio holds
    assert stored[ann["id"]][2:] == (truth["plausible"], truth["overall"], truth["criteria"])
    assert report(loop)["average"] == before["average"]


def test_forged_deletion_of_a_live_annotation_removes_nothing(loop: Loop) -> None:
    before, stored = report(loop), stored_verdicts(loop)
    live = STATE["posted"][:3]
    r = hook(loop, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in live]})
    assert r.status_code == 200 and r.json()["removed"] == 0, r.text
    assert stored_verdicts(loop) == stored
    assert report(loop)["average"] == before["average"]


def _pooled(rep: dict, mode: str) -> dict:
    col = next(str(m["id"]) for m in rep["models"] if m["mode"] == mode)
    return rep["average"]["pooled"][col]


def test_updates_replace_and_deletes_remove(loop: Loop) -> None:
    before = report(loop)
    # find a plausible verdict of the first reviewer and turn it into a failed criterion
    for ann_id in STATE["posted"][::2]:
        ann = loop.ls.annotations.get(ann_id)
        if any(r["value"]["choices"] == ["plausible"] for r in ann.result):
            break
    result = [dict(r) for r in ann.result]
    result[0] = {**result[0], "value": {"choices": ["fail"]}}
    loop.ls.annotations.update(ann_id, result=result)
    task = next(t for t in STATE["tasks"] if t["id"] == ann.task)
    mode = loop.truth[_image_ids_in(loop, [task])[0]][0]
    deadline = time.monotonic() + 300  # a hang guard: the webhook normally lands in a second
    while _pooled(report(loop), mode)["plausible"] == _pooled(before, mode)["plausible"]:
        assert time.monotonic() < deadline, "the update never reached the report"
        time.sleep(0.3)
    assert _pooled(report(loop), mode)["plausible"] == _pooled(before, mode)["plausible"] - 1
    assert _pooled(report(loop), mode)["reviews"] == _pooled(before, mode)["reviews"]
    loop.ls.annotations.delete(ann_id)
    wait_reviews(loop, 47)


def test_missed_webhook_is_caught_by_the_pull(loop: Loop) -> None:
    project = STATE["project"]
    hooks = [h for h in loop.ls.webhooks.list() if h.project == project["ls_project_id"]]
    # Label Studio sends each event once; here it is never sent. (An update without
    # ``actions`` empties them in Label Studio 1.23, so they are given each time.)
    for h in hooks:
        loop.ls.webhooks.update(h.id, url=h.url, is_active=False, actions=h.actions)
    task = STATE["tasks"][0]
    result, _ = checker_result(loop.api.get(task["data"]["image"]).content,
                               task["data"]["expected_class"], lenient=False)  # fmt: skip
    loop.ls.annotations.create(task["id"], result=result, completed_by=loop.reviewers[0])
    time.sleep(1.0)
    assert sum(m["reviews"] for m in report(loop)["average"]["pooled"].values()) == 47
    jobs = loop.api.post("/reviews/sync", headers=AUTH).json()
    assert all(
        wait_job(loop.api, j["id"], worker=loop.worker)["status"] == "succeeded" for j in jobs
    )
    wait_reviews(loop, 48, timeout=60)
    for h in hooks:
        loop.ls.webhooks.update(h.id, url=h.url, is_active=True, actions=h.actions)
    assert all(h.actions for h in loop.ls.webhooks.list() if h.project == project["ls_project_id"])


def test_webhook_while_label_studio_is_unreachable_queues_a_pull(loop: Loop) -> None:
    """protomed cannot read Label Studio back when its webhook arrives (the proxy in front of
    Label Studio is down; Label Studio itself still posts): the event becomes a queued pull,
    which brings the verdict in once Label Studio answers again."""
    ann_id = STATE["posted"][1]  # the second reviewer's: no earlier test deleted it
    ann = loop.ls.annotations.get(ann_id)
    before = stored_verdicts(loop)[ann_id]
    known = {j["id"] for j in loop.api.get("/jobs", params={"kind": "review_sync"}).json()}
    loop.proxy.stop()
    try:
        loop.ls.annotations.update(ann_id, result=flipped(ann.result))  # Label Studio posts
        deadline = time.monotonic() + 60
        while True:
            jobs = loop.api.get("/jobs", params={"kind": "review_sync"}).json()
            new = [j for j in jobs if j["id"] not in known and j["requested_by"] == "webhook"]
            if new:
                break
            assert time.monotonic() < deadline, "the webhook queued no pull"
            time.sleep(0.3)
        assert stored_verdicts(loop)[ann_id] == before  # nothing read, nothing changed yet
    finally:
        loop.proxy.start()
    for job in new:
        assert wait_job(loop.api, job["id"], worker=loop.worker)["status"] == "succeeded"
    from service.criteria import parse_result

    now = stored_verdicts(loop)[ann_id]
    keys = [r["from_name"][5:] for r in ann.result if r["from_name"].startswith("crit_")]
    truth = parse_result(flipped(ann.result), keys)
    assert now[2:] == (truth["plausible"], truth["overall"], truth["criteria"]) != before[2:]


def test_label_studio_down_during_sync_is_retried_and_nothing_lost(loop: Loop) -> None:
    from sqlalchemy import create_engine, text

    # a batch sent while Label Studio is unreachable (the proxy in front of it is stopped)
    batch = loop.batches[("prototype", CLASSES[0])]
    engine = create_engine(loop.env["PROTOMED_DATABASE_URL"])
    with engine.begin() as conn:  # its images leave the project, so they are new again
        sql = (
            "DELETE FROM review_tasks WHERE image_id IN (SELECT id FROM images WHERE batch_id = :b)"
        )
        conn.execute(text(sql), {"b": batch})
    engine.dispose()
    loop.proxy.stop()
    r = loop.api.post("/reviews", json={"batch_ids": [batch]}, headers=AUTH)
    assert r.status_code == 202 and r.json()["added"] == 6
    job_id = r.json()["job"]["id"]
    deadline = time.monotonic() + 60
    while True:  # the sync fails, says why, and waits for its retry
        job = loop.api.get(f"/jobs/{job_id}", headers=AUTH).json()
        if job["error"] and "Label Studio unavailable" in job["error"] and job["attempts"] >= 2:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["status"] in ("queued", "running")
    loop.proxy.start()
    job = wait_job(loop.api, job_id, worker=loop.worker, timeout=120)
    assert job["status"] == "succeeded" and job["result"]["imported"] == 6, job
    tasks = ls_tasks(loop, STATE["project"]["ls_project_id"])
    refs = [t["data"]["ref"] for t in tasks]
    assert len(refs) == len(set(refs)) == 30  # 24 earlier + 6 new, none twice
