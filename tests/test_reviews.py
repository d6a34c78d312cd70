"""The expert review loop against a real Label Studio server (started by .ci/run; locally set
PROTOMED_TEST_LABEL_STUDIO_URL and PROTOMED_TEST_LABEL_STUDIO_TOKEN), with the API as a real
HTTP server (Label Studio posts webhooks to it), a real Celery worker (Redis broker) and SQLite.

The automated reviewers are two Label Studio users whose annotations are posted through Label
Studio's API, as an expert's clicks in its UI would be; their verdicts come from the toy
domain's rule-based checker (the second reviewer is lenient on granules, so they disagree).
The batches hold real toy cells, some of another class than their batch says, so verdicts
differ between the models (training itself is covered by test_service_e2e).

Each test stands alone: the servers, the worker and the Label Studio reviewers are shared
(module fixture ``base``), and so is one fully reviewed set of batches (``reviewed``) for the
tests that only read it or prove that a forged event changes nothing; a test that changes
verdicts or tasks sends batches of its own dataset (``fresh``). Reports are read for one
dataset, so every test sees only its own verdicts in the one Label Studio project.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import ADMIN_KEY, migrate, redis_broker, service_env
from factories import add_batch, add_dataset, add_image, add_model, png_bytes, service_context
from PIL import Image as PILImage
from service_procs import ApiServer, TcpProxy, Worker, free_port, wait_job
from waiting import wait_until

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
class Base:
    """What every test shares and none changes: the servers, the worker, the reviewers."""

    api: httpx.Client
    ls: Any  # label_studio_sdk.LabelStudio, direct (not through the proxy)
    proxy: TcpProxy
    worker: Worker
    env: dict[str, str]
    reviewers: list[int]  # Label Studio user ids
    emails: list[str]  # ...and their e-mails


@dataclass
class Sent:
    """One dataset's batches, sent to review by a test (or a module fixture) for itself."""

    dataset: int
    batches: dict[tuple[str, str], int]  # (mode, class) -> batch id
    truth: dict[int, tuple[str, str, str]]  # image id -> (mode, class, drawn class)
    response: httpx.Response  # the answer to POST /reviews
    job: dict  # its sync job, finished
    project: dict  # the review project after the sync
    tasks_before: int  # the project's task count before this dataset's were added
    known: set[int]  # Label Studio task ids of the project before
    tasks: list[dict]  # the Label Studio tasks this sync made
    posted: list[int] = field(default_factory=list)  # annotations posted on them
    # (mode, class) -> image id -> the verdicts posted on it
    expected: dict[tuple[str, str], dict[int, list[bool]]] = field(default_factory=dict)


def seed_batches(env: dict[str, str]) -> tuple[int, dict, dict]:
    """A toy-domain dataset of its own, a ready baseline and prototype model, one 6-image
    batch per model and class; the prototype batches hold 5 right cells, the baseline ones 3."""
    from ml.data.toy import draw_cell
    from service.db.session import get_sessionmaker

    rng = np.random.default_rng(0)
    batches, truth = {}, {}
    with service_context(env), get_sessionmaker()() as s:
        ds = add_dataset(
            s,
            name=f"toy-{uuid.uuid4().hex[:8]}",
            classes=CLASSES,
            counts=dict.fromkeys(CLASSES, 6),
            domain="toy",
        )
        for mode, right in (("baseline", 3), ("prototype", 5)):
            model = add_model(s, ds, mode=mode)
            for cls in CLASSES:
                other = CLASSES[1 - CLASSES.index(cls)]
                batch = add_batch(s, model, class_name=cls, n=6, guidance=2)
                for i in range(6):
                    drawn = cls if i < right else other
                    data = png_bytes(draw_cell(drawn, rng, 64))
                    img = add_image(s, batch, index=i, data=data, store=True)
                    truth[img.id] = (mode, cls, drawn)
                batches[(mode, cls)] = batch.id
        s.commit()
        return ds.id, batches, truth


@pytest.fixture(scope="module")
def broker() -> Iterator[dict[str, str]]:
    """A Redis broker namespace of this module's own (conftest's redis_broker)."""
    with redis_broker() as env:
        yield env


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, broker: dict[str, str]) -> Iterator[Base]:
    from label_studio_sdk import LabelStudio

    ls_url, ls_token = ls_settings()
    tmp = tmp_path_factory.mktemp("reviews")
    (tmp / "data").mkdir()
    host, port = ls_url.split("//")[1].split(":")
    proxy = TcpProxy(host, int(port.rstrip("/")))
    proxy.start()
    api_port = free_port()
    env = service_env(
        tmp,
        **broker,
        PROTOMED_LABEL_STUDIO_URL=f"http://127.0.0.1:{proxy.port}",
        PROTOMED_LABEL_STUDIO_TOKEN=ls_token,
        PROTOMED_LABEL_STUDIO_PUBLIC_URL=ls_url,
        PROTOMED_PUBLIC_URL=f"http://127.0.0.1:{api_port}",
        PROTOMED_REVIEW_WEBHOOK_SECRET=SECRET,
        PROTOMED_REVIEW_SYNC_RETRY_S="1",
        PROTOMED_REVIEW_PULL_S="3600",  # the periodic pull stays out of the way; tests pull
    )
    migrate(env["PROTOMED_DATABASE_URL"])
    api = ApiServer(env, tmp / "api.log", port=api_port)
    worker = Worker(env, tmp / "worker.log", queues="default")
    ls = LabelStudio(base_url=ls_url, api_key=ls_token, timeout=30)
    suffix = uuid.uuid4().hex[:8]  # Label Studio keeps users between runs
    try:
        emails = [f"{n}-{suffix}@protomed.local" for n in ("expert-a", "expert-b")]
        reviewers = [ls.users.create(email=e, username=e.split("@")[0]).id for e in emails]
        api.wait_ready()
        worker.wait_ready()
        # an admin's client: reads need a key once they are locked by default
        with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
            yield Base(client, ls, proxy, worker, env, reviewers, emails)
    finally:
        worker.stop()
        api.stop()
        proxy.stop()


def toy_project(base: Base) -> dict | None:
    """protomed's review project for the toy domain (one per criteria set), if made yet."""
    return next(iter(base.api.get("/reviews/projects", headers=AUTH).json()), None)


def send_to_review(base: Base) -> Sent:
    """Seed a dataset of its own and send all four batches to review; wait for the sync."""
    dataset, batches, truth = seed_batches(base.env)
    before = toy_project(base)
    known = {t["id"] for t in ls_tasks(base, before["ls_project_id"])} if before else set()
    ids = [batches[(m, c)] for m in ("baseline", "prototype") for c in CLASSES]
    r = base.api.post("/reviews", json={"batch_ids": ids}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = wait_job(base.api, r.json()["job"]["id"], worker=base.worker, timeout=120)
    project = toy_project(base)
    assert project is not None, job
    tasks = [t for t in ls_tasks(base, project["ls_project_id"]) if t["id"] not in known]
    tasks_before = before["tasks"] if before else 0
    return Sent(dataset, batches, truth, r, job, project, tasks_before, known, tasks)


def annotate(base: Base, sent: Sent, pairs: list[tuple[dict, int]]) -> list[int]:
    """Each (task, reviewer index) pair posts the toy checker's verdict as that reviewer (the
    second one is lenient), as an expert's clicks would; waits until protomed has them all."""
    image_ids = _image_ids_in(base, [task for task, _ in pairs])
    start = reviews_of(base, sent)
    posted = []
    for (task, who), image_id in zip(pairs, image_ids, strict=True):
        png = base.api.get(task["data"]["image"]).content
        mode, cls, _drawn = sent.truth[image_id]
        result, plausible = checker_result(png, task["data"]["expected_class"], who == 1)
        ann = base.ls.annotations.create(
            task["id"], result=result, completed_by=base.reviewers[who]
        )
        posted.append(ann.id)
        sent.expected.setdefault((mode, cls), {}).setdefault(image_id, []).append(plausible)
    sent.posted += posted
    wait_reviews(base, sent, start + len(pairs))  # every verdict arrived by webhook
    return posted


@pytest.fixture(scope="module")
def synced(base: Base) -> Sent:
    """Four batches sent to review; tests only read them."""
    return send_to_review(base)


@pytest.fixture(scope="module")
def reviewed(base: Base, synced: Sent) -> Sent:
    """The same batches with both reviewers' verdicts on every task; tests only read them, or
    prove that what they post changes nothing."""
    annotate(base, synced, [(task, who) for task in synced.tasks for who in (0, 1)])
    return synced


@pytest.fixture
def fresh(base: Base) -> Iterator[Sent]:
    """Batches of this test's own, sent to review (no verdicts yet): the test may change them.
    Label Studio is reachable again afterwards, whatever the test did to the proxy."""
    sent = send_to_review(base)
    try:
        yield sent
    finally:
        if not base.proxy.running:
            base.proxy.start()


def checker_result(img_png: bytes, expected: str, lenient: bool) -> tuple[list[dict], bool]:
    """A reviewer's Label Studio result from the toy checker's verdict on the image; the
    lenient reviewer marks granules n/a."""
    from ml.data.toy import check_image
    from service.criteria import annotation_result

    verdict = check_image(PILImage.open(io.BytesIO(img_png)).convert("RGB"), expected)
    crits = {c.name: "pass" if c.passed else "fail" for c in verdict.criteria}
    if lenient:
        crits["granules"] = "na"
    return annotation_result(crits), "fail" not in crits.values()


def ls_tasks(base: Base, ls_project_id: int) -> list[dict]:
    raw = base.ls.projects.exports.download_sync(
        ls_project_id, export_type="JSON", download_all_tasks=True
    )
    return json.loads(b"".join(raw))


def report(base: Base, sent: Sent, **filters: str) -> dict:
    """The plausibility report over ``sent``'s dataset only."""
    params = {"dataset_id": str(sent.dataset), **filters}
    r = base.api.get("/reports/plausibility", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def total(rep: dict) -> int:
    return sum(m["reviews"] for m in rep["average"]["pooled"].values())


def reviews_of(base: Base, sent: Sent) -> int:
    return total(report(base, sent))


def wait_reviews(base: Base, sent: Sent, n: int, timeout: float = 120) -> dict:
    """The report once it counts ``n`` verdicts (a hang guard: webhooks land in a second)."""

    def counted() -> dict | None:
        rep = report(base, sent)
        return rep if total(rep) == n else None

    return wait_until(counted, timeout=timeout, what=f"{n} reviews in the report")


def test_sync_imports_blinded_shuffled_tasks(base: Base, synced: Sent) -> None:
    r, ids = synced.response, list(synced.batches.values())
    assert r.json()["added"] == 24 and r.json()["project"]["domain"] == "toy"
    assert synced.job["status"] == "succeeded", (synced.job, base.worker.tail())
    project = toy_project(base)
    assert project["tasks"] == synced.tasks_before + 24 and project["ls_project_id"]
    tasks = synced.tasks
    assert len(tasks) == 24
    for t in tasks:  # blinded: only the image, the class it should show, an opaque ref
        assert set(t["data"]) == {"image", "expected_class", "ref"}
        assert "batch" not in t["data"]["image"] and "model" not in t["data"]["image"]
    # shuffled: Label Studio's order is not the batches' order
    order = [base.api.get(t["data"]["image"]).content for t in tasks]  # no key, as LS does
    assert all(len(png) > 100 for png in order)
    # blinded bytes: no review image's hash is one the batches list (test_blinding.py has more)
    listed = {
        img["sha256"]
        for b in ids
        for img in base.api.get(f"/batches/{b}", headers=AUTH).json()["images"]
    }
    assert len(listed) == 24 and not {hashlib.sha256(png).hexdigest() for png in order} & listed
    anonymous = httpx.get(base.api.base_url.join(f"/batches/{ids[0]}"), timeout=30)
    assert anonymous.status_code == 401  # and no key reads batches
    modes = [synced.truth[i][0] for i in _image_ids_in(base, tasks)]
    assert modes != sorted(modes) and modes != sorted(modes, reverse=True)


def _image_ids_in(base: Base, tasks: list[dict]) -> list[int]:
    """Image ids behind Label Studio tasks, read from our database (the test knows; LS not)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(base.env["PROTOMED_DATABASE_URL"])
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT token, image_id FROM review_tasks")).all())
    engine.dispose()
    return [rows[t["data"]["ref"]] for t in tasks]


def test_reviewers_verdicts_make_the_report(base: Base, reviewed: Sent) -> None:
    expected = reviewed.expected
    rep = wait_reviews(base, reviewed, 48)  # every verdict arrived by webhook
    cols = {m["mode"]: str(m["id"]) for m in rep["models"]}

    def majority(mode: str, cls: str) -> list[bool]:
        """Each image's verdict: most of its reviewers', a tie (1 of 2) implausible."""
        return [2 * sum(v) > len(v) for v in expected[(mode, cls)].values()]

    for row in rep["classes"]:
        for mode in ("baseline", "prototype"):
            got = row["models"][cols[mode]]
            want = expected[(mode, row["class"])]
            assert got["reviews"] == sum(map(len, want.values())) == 12
            assert got["images"] == len(want) == 6  # the image is the unit
            assert got["plausible"] == sum(majority(mode, row["class"])), (mode, row["class"])
            assert got["ties"] == sum(2 * sum(v) == len(v) for v in want.values())
            assert got["rate"] == pytest.approx(got["plausible"] / 6)
        diff = row["difference"]["value"]
        p_base = sum(majority("baseline", row["class"])) / 6
        p_proto = sum(majority("prototype", row["class"])) / 6
        assert diff == pytest.approx(p_proto - p_base)
        assert row["difference"]["p_holm"] >= row["difference"]["p_value"]
    assert rep["agreement"]["method"] == "cohen" and rep["agreement"]["items"] == 24
    params = {"format": "csv", "dataset_id": str(reviewed.dataset)}
    csv_text = base.api.get("/reports/plausibility", params=params, headers=AUTH).text
    assert csv_text.splitlines()[0].startswith("class,")


def test_report_filters_by_reviewer_id_or_email(base: Base, reviewed: Sent) -> None:
    """Label Studio gives the reviewer's user id; protomed also keeps the e-mail, so either
    selects the same 24 verdicts."""
    for uid, email in zip(base.reviewers, base.emails, strict=True):
        counts = [
            total(report(base, reviewed, reviewer=who)) for who in (str(uid), email, email.upper())
        ]
        assert counts == [24, 24, 24], (uid, email, counts)
    assert report(base, reviewed, reviewer="nobody@protomed.local")["classes"] == []


def test_same_webhook_twice_counts_once_and_wrong_secret_is_refused(
    base: Base, reviewed: Sent
) -> None:
    before = report(base, reviewed)
    ann = base.ls.annotations.get(reviewed.posted[0])
    payload = {"action": "ANNOTATION_UPDATED", "annotation": ann.model_dump(mode="json")}
    for _ in range(2):
        r = base.api.post("/reviews/webhook", json=payload, headers={"X-Protomed-Secret": SECRET})
        assert r.status_code == 200 and r.json()["applied"] == 1
    assert report(base, reviewed)["average"] == before["average"]
    bad = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": reviewed.posted[0]}]}
    r = base.api.post("/reviews/webhook", json=bad, headers={"X-Protomed-Secret": "guess"})
    assert r.status_code == 403
    r = base.api.post("/reviews/webhook", json=bad)
    assert r.status_code == 403
    assert report(base, reviewed)["average"] == before["average"]


def hook(base: Base, body: dict) -> httpx.Response:
    """A webhook as anyone who read the secret from Label Studio's webhook list can post it."""
    return base.api.post("/reviews/webhook", json=body, headers={"X-Protomed-Secret": SECRET})


def stored_verdicts(base: Base) -> dict[int, tuple]:
    """Every stored verdict straight from protomed's database: annotation id -> (task, reviewer,
    plausible, overall, criteria)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(base.env["PROTOMED_DATABASE_URL"])
    sql = "SELECT ls_annotation_id, task_id, reviewer, plausible, overall, criteria FROM reviews"
    with engine.connect() as conn:
        rows = {
            ann: (task, who, None if ok is None else bool(ok), overall, json.loads(crits))
            for ann, task, who, ok, overall, crits in conn.execute(text(sql)).all()
        }
    engine.dispose()
    return rows


def flipped(result: list[dict]) -> list[dict]:
    """The opposite verdict: every criterion and the overall choice turned around."""
    turn = {
        "pass": "fail",
        "fail": "pass",
        "na": "fail",
        "plausible": "implausible",
        "implausible": "plausible",
    }
    return [{**r, "value": {"choices": [turn[r["value"]["choices"][0]]]}} for r in result]


def test_forged_webhook_for_an_annotation_label_studio_does_not_have_changes_nothing(
    base: Base, reviewed: Sent
) -> None:
    """Label Studio shows webhook headers to every user of its organisation, so the secret
    is no proof: a verdict that exists only in the webhook body must not count."""
    before, stored = report(base, reviewed), stored_verdicts(base)
    real = base.ls.annotations.get(reviewed.posted[0]).model_dump(mode="json")
    ghost = max(reviewed.posted) + 1_000_000
    with pytest.raises(Exception, match="404"):  # Label Studio has no such annotation
        base.ls.annotations.get(ghost)
    task = next(t for t in reviewed.tasks if t["id"] == real["task"])  # a real task of ours
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        fake = {**real, "id": ghost, "result": flipped(real["result"])}
        body = {"action": action, "annotation": fake, "task": task, "project": {"id": 1}}
        r = hook(base, body)
        assert r.status_code == 200 and r.json()["applied"] == 0, r.text
    assert stored_verdicts(base) == stored
    assert report(base, reviewed)["average"] == before["average"]


def test_forged_result_for_a_real_annotation_keeps_label_studios_verdict(
    base: Base, reviewed: Sent
) -> None:
    from service.criteria import parse_result

    before, stored = report(base, reviewed), stored_verdicts(base)
    ann = base.ls.annotations.get(reviewed.posted[0]).model_dump(mode="json")
    body = {"action": "ANNOTATION_UPDATED", "annotation": {**ann, "result": flipped(ann["result"])}}
    r = hook(base, body)
    assert r.status_code == 200, r.text
    assert stored_verdicts(base) == stored
    keys = [r["from_name"][5:] for r in ann["result"] if r["from_name"].startswith("crit_")]
    truth = parse_result(ann["result"], keys)  # what Label Studio holds
    assert stored[ann["id"]][2:] == (truth["plausible"], truth["overall"], truth["criteria"])
    assert report(base, reviewed)["average"] == before["average"]


def test_forged_deletion_of_a_live_annotation_removes_nothing(base: Base, reviewed: Sent) -> None:
    before, stored = report(base, reviewed), stored_verdicts(base)
    live = reviewed.posted[:3]
    r = hook(base, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in live]})
    assert r.status_code == 200 and r.json()["removed"] == 0, r.text
    assert stored_verdicts(base) == stored
    assert report(base, reviewed)["average"] == before["average"]


def _pooled(rep: dict, mode: str) -> dict:
    col = next(str(m["id"]) for m in rep["models"] if m["mode"] == mode)
    return rep["average"]["pooled"][col]


def _plausible_first(tasks: list[dict], base: Base) -> list[dict]:
    """The tasks whose image the strict reviewer finds plausible, then the others."""

    def plausible(task: dict) -> bool:
        png = base.api.get(task["data"]["image"]).content
        return checker_result(png, task["data"]["expected_class"], lenient=False)[1]

    return sorted(tasks, key=lambda t: not plausible(t))


def test_updates_replace_and_deletes_remove(base: Base, fresh: Sent) -> None:
    # the first reviewer's verdicts on a few tasks, a plausible one among them
    annotate(base, fresh, [(t, 0) for t in _plausible_first(fresh.tasks, base)[:4]])
    before = report(base, fresh)
    # find a plausible verdict of the first reviewer and turn it into a failed criterion
    for ann_id in fresh.posted:
        ann = base.ls.annotations.get(ann_id)
        if any(r["value"]["choices"] == ["plausible"] for r in ann.result):
            break
    result = [dict(r) for r in ann.result]
    result[0] = {**result[0], "value": {"choices": ["fail"]}}
    base.ls.annotations.update(ann_id, result=result)
    task = next(t for t in fresh.tasks if t["id"] == ann.task)
    mode = fresh.truth[_image_ids_in(base, [task])[0]][0]
    wait_until(
        lambda: (
            _pooled(report(base, fresh), mode)["plausible"] != _pooled(before, mode)["plausible"]
        ),
        timeout=300,  # a hang guard: the webhook normally lands in a second
        what="the update reached the report",
    )
    assert _pooled(report(base, fresh), mode)["plausible"] == _pooled(before, mode)["plausible"] - 1
    assert _pooled(report(base, fresh), mode)["reviews"] == _pooled(before, mode)["reviews"]
    base.ls.annotations.delete(ann_id)
    wait_reviews(base, fresh, total(before) - 1)


def test_missed_webhook_is_caught_by_the_pull(base: Base, fresh: Sent) -> None:
    project = fresh.project
    # the lenient reviewer's verdict on another task: its later update is the barrier below
    (barrier,) = annotate(base, fresh, [(fresh.tasks[1], 1)])
    barrier_before = stored_verdicts(base)[barrier]
    hooks = [h for h in base.ls.webhooks.list() if h.project == project["ls_project_id"]]
    # Label Studio sends each event once; here a new annotation's is never sent. (An update
    # without ``actions`` empties them in Label Studio 1.23, so they are given each time.)
    for h in hooks:
        kept = [a for a in h.actions if a != "ANNOTATION_CREATED"]
        base.ls.webhooks.update(h.id, url=h.url, is_active=True, actions=kept)
    try:
        task = fresh.tasks[0]
        result, _ = checker_result(
            base.api.get(task["data"]["image"]).content,
            task["data"]["expected_class"],
            lenient=False,
        )
        missed = base.ls.annotations.create(
            task["id"], result=result, completed_by=base.reviewers[0]
        )
        # Label Studio sends its events in order: once the barrier's update (sent after the
        # new annotation) has landed, an event for the new annotation would have landed too
        ann = base.ls.annotations.get(barrier)
        base.ls.annotations.update(barrier, result=flipped(ann.result))
        wait_until(
            lambda: stored_verdicts(base)[barrier] != barrier_before,
            what="the barrier's update stored",
        )
        assert missed.id not in stored_verdicts(base)
        assert reviews_of(base, fresh) == 1
    finally:
        for h in hooks:
            base.ls.webhooks.update(h.id, url=h.url, is_active=True, actions=h.actions)
    jobs = base.api.post("/reviews/sync", headers=AUTH).json()
    assert all(
        wait_job(base.api, j["id"], worker=base.worker)["status"] == "succeeded" for j in jobs
    )
    wait_reviews(base, fresh, 2, timeout=60)
    assert all(h.actions for h in base.ls.webhooks.list() if h.project == project["ls_project_id"])


def test_webhook_while_label_studio_is_unreachable_queues_a_pull(base: Base, fresh: Sent) -> None:
    """protomed cannot read Label Studio back when its webhook arrives (the proxy in front of
    Label Studio is down; Label Studio itself still posts): the event becomes a queued pull,
    which brings the verdict in once Label Studio answers again."""
    (ann_id,) = annotate(base, fresh, [(fresh.tasks[0], 1)])  # the second reviewer's
    ann = base.ls.annotations.get(ann_id)
    before = stored_verdicts(base)[ann_id]
    known = {j["id"] for j in base.api.get("/jobs", params={"kind": "review_sync"}).json()}

    def queued_pulls() -> list[dict]:
        jobs = base.api.get("/jobs", params={"kind": "review_sync"}).json()
        return [j for j in jobs if j["id"] not in known and j["requested_by"] == "webhook"]

    base.proxy.stop()
    try:
        base.ls.annotations.update(ann_id, result=flipped(ann.result))  # Label Studio posts
        new = wait_until(queued_pulls, timeout=60, what="the webhook queued a pull")
        assert stored_verdicts(base)[ann_id] == before  # nothing read, nothing changed yet
    finally:
        base.proxy.start()
    for job in new:
        assert wait_job(base.api, job["id"], worker=base.worker)["status"] == "succeeded"
    from service.criteria import parse_result

    now = stored_verdicts(base)[ann_id]
    keys = [r["from_name"][5:] for r in ann.result if r["from_name"].startswith("crit_")]
    truth = parse_result(flipped(ann.result), keys)
    assert now[2:] == (truth["plausible"], truth["overall"], truth["criteria"]) != before[2:]


def test_label_studio_down_during_sync_is_retried_and_nothing_lost(base: Base, fresh: Sent) -> None:
    from sqlalchemy import create_engine, text

    # a batch sent while Label Studio is unreachable (the proxy in front of it is stopped)
    batch = fresh.batches[("prototype", CLASSES[0])]
    engine = create_engine(base.env["PROTOMED_DATABASE_URL"])
    with engine.begin() as conn:  # its images leave the project, so they are new again
        sql = (
            "DELETE FROM review_tasks WHERE image_id IN (SELECT id FROM images WHERE batch_id = :b)"
        )
        conn.execute(text(sql), {"b": batch})
    engine.dispose()
    base.proxy.stop()
    try:
        r = base.api.post("/reviews", json={"batch_ids": [batch]}, headers=AUTH)
        assert r.status_code == 202 and r.json()["added"] == 6
        job_id = r.json()["job"]["id"]

        def failed_and_retrying() -> dict | None:  # the sync fails, says why, and retries
            job = base.api.get(f"/jobs/{job_id}", headers=AUTH).json()
            error = job["error"] or ""
            return job if "Label Studio unavailable" in error and job["attempts"] >= 2 else None

        job = wait_until(failed_and_retrying, timeout=60, what="the sync failed and retried")
        assert job["status"] in ("queued", "running")
    finally:
        base.proxy.start()
    job = wait_job(base.api, job_id, worker=base.worker, timeout=120)
    assert job["status"] == "succeeded" and job["result"]["imported"] == 6, job
    tasks = ls_tasks(base, fresh.project["ls_project_id"])
    refs = [t["data"]["ref"] for t in tasks if t["id"] not in fresh.known]
    assert len(refs) == len(set(refs)) == 30  # this test's 24 earlier + 6 new, none twice


def test_enough_verdicts_queue_the_domains_scorer_once(base: Base, reviewed: Sent) -> None:
    """Verdicts arriving by webhook retrain the domain's plausibility scorer once the domain
    has enough reviewed images (24 here, at least ``scorer_min_images``): one ``score`` job,
    however many webhooks came in after it was queued (this module's worker serves only the
    default queue, so it waits, queued)."""
    jobs = base.api.get("/jobs", params={"kind": "score", "limit": 50}, headers=AUTH).json()
    assert [(j["params"], j["requested_by"], j["status"]) for j in jobs] == [
        ({"domain": "toy"}, "retrain", "queued")
    ], jobs


def test_uncertain_selection_reaches_label_studio_blinded(base: Base) -> None:
    """A budget of 5 images per batch (2 random, 3 the scorer's least sure): exactly those
    reach Label Studio, as tasks that look alike (the same three data keys, nothing naming the
    selection), in an order that mixes the two kinds."""
    from sqlalchemy import create_engine, text

    dataset, batches, truth = seed_batches(base.env)
    engine = create_engine(base.env["PROTOMED_DATABASE_URL"])
    with engine.begin() as conn:  # scored as the sampling job would (index i: 0.1 + 0.15 i)
        for image_id in truth:
            conn.execute(
                text('UPDATE images SET score = 0.1 + 0.15 * "index" WHERE id = :i'),
                {"i": image_id},
            )
    before = toy_project(base)
    known = {t["id"] for t in ls_tasks(base, before["ls_project_id"])} if before else set()
    body = {
        "batch_ids": list(batches.values()),
        "select": "uncertain",
        "per_batch": 5,
        "random_share": 0.4,
    }
    r = base.api.post("/reviews", json=body, headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json()["added"] == 20
    assert all(s["random"] == 2 and s["uncertain"] == 3 for s in r.json()["selected"])
    job = wait_job(base.api, r.json()["job"]["id"], worker=base.worker, timeout=120)
    assert job["status"] == "succeeded", (job, base.worker.tail())
    project = toy_project(base)
    tasks = [t for t in ls_tasks(base, project["ls_project_id"]) if t["id"] not in known]
    sql = (
        "SELECT t.token, t.sample, i.batch_id, i.id, i.score FROM review_tasks t "
        "JOIN images i ON i.id = t.image_id JOIN batches b ON b.id = i.batch_id "
        "JOIN models m ON m.id = b.model_id WHERE m.dataset_id = :d"
    )
    with engine.connect() as conn:
        rows = conn.execute(text(sql), {"d": dataset}).all()
        scores = dict(conn.execute(text("SELECT id, score FROM images")).all())
    engine.dispose()
    ours = {token: sample for token, sample, *_ in rows}
    assert len(tasks) == 20 and {t["data"]["ref"] for t in tasks} == set(ours)
    for t in tasks:
        assert set(t["data"]) == {"image", "expected_class", "ref"}
        assert "uncertain" not in json.dumps(t) and "random" not in json.dumps(t["data"])
    for batch in batches.values():  # the picks: closest to 0.5 among the images not drawn
        drawn = {i for _, sample, b, i, _ in rows if b == batch and sample == "random"}
        picks = {i for _, sample, b, i, _ in rows if b == batch and sample == "uncertain"}
        rest = sorted(
            (
                i
                for i in truth
                if i not in drawn
                and scores[i] is not None
                and _batch_of(truth, batches, i) == batch
            ),
            key=lambda i: (abs(scores[i] - 0.5), i),
        )
        assert len(drawn) == 2 and picks == set(rest[:3]), (batch, drawn, picks)
    kinds = [ours[t["data"]["ref"]] for t in sorted(tasks, key=lambda t: t["id"])]
    assert Counter(kinds) == {"random": 8, "uncertain": 12}
    # P(one kind entirely before the other | shuffled) = 2 / C(20, 8), about 1.6e-5
    assert 1 + sum(a != b for a, b in itertools.pairwise(kinds)) > 2, kinds


def _batch_of(truth: dict, batches: dict, image_id: int) -> int:
    """The batch of a seeded image: its (mode, class) from ``truth``."""
    mode, cls, _ = truth[image_id]
    return batches[(mode, cls)]


# --- what a Label Studio member can write ------------------------------------------------------


@dataclass
class Member:
    """A Label Studio member who signed up through the organisation's invite link, as any
    reviewer does, with the API token Label Studio gives them."""

    id: int
    api: httpx.Client


@pytest.fixture(scope="module")
def member(base: Base) -> Iterator[Member]:
    url, token = ls_settings()
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=30)
    invite = admin.get("/api/invite").json()["token"]
    email, password = f"member-{uuid.uuid4().hex[:8]}@protomed.local", uuid.uuid4().hex
    with httpx.Client(base_url=url, timeout=30) as browser:
        browser.get("/user/signup/")
        form = {
            "email": email,
            "password": password,
            "csrfmiddlewaretoken": browser.cookies.get("csrftoken"),
        }
        r = browser.post(
            f"/user/signup/?token={invite}", data=form, headers={"Referer": f"{url}/user/signup/"}
        )
        assert r.status_code == 302, r.text[-500:]
        mine = browser.get("/api/current-user/token").json()["token"]
        me = browser.get("/api/current-user/whoami").json()["id"]
    admin.close()
    with httpx.Client(base_url=url, headers={"Authorization": f"Token {mine}"}, timeout=30) as api:
        yield Member(me, api)


def pull(base: Base) -> list[dict]:
    """Every project pulled now; the finished sync jobs."""
    jobs = base.api.post("/reviews/sync", headers=AUTH).json()
    return [wait_job(base.api, j["id"], worker=base.worker) for j in jobs]


def odd_tasks(base: Base) -> dict[int | None, dict]:
    project = toy_project(base)
    assert project is not None
    return {o["ls_task_id"]: o for o in project["odd_tasks"]}


def verdict_result(base: Base, plausible: bool) -> list[dict]:
    """Every criterion of the toy set passed (or failed), as a Label Studio result."""
    from service.criteria import annotation_result

    keys = [c["key"] for c in base.api.get("/criteria/toy").json()["criteria"]]
    return annotation_result(dict.fromkeys(keys, "pass" if plausible else "fail"))


def test_a_task_protomed_did_not_create_is_reported_not_adopted(
    base: Base, fresh: Sent, member: Member
) -> None:
    """A member imports a task carrying one of protomed's refs (every member can read them)
    with a forged majority in the reviewers' names and another picture: the pull counts only
    protomed's own task, reports the other one, and the genuine task's verdicts still arrive
    by webhook; pulling again changes nothing."""
    ls_project = fresh.project["ls_project_id"]
    target = fresh.tasks[0]
    forged = {
        "data": {**target["data"], "image": fresh.tasks[1]["data"]["image"]},
        "annotations": [
            {"result": verdict_result(base, False), "completed_by": who} for who in base.reviewers
        ],
    }
    r = member.api.post(f"/api/projects/{ls_project}/import?return_task_ids=true", json=[forged])
    assert r.status_code == 201, r.text
    (forged_id,) = r.json()["task_ids"]
    for _ in range(2):
        assert all(j["status"] == "succeeded" for j in pull(base))
        assert reviews_of(base, fresh) == 0
        odd = odd_tasks(base)[forged_id]
        assert odd["claims"] == target["id"] and "not created by protomed" in odd["reason"]
    # the genuine task's verdict still counts through the webhook, the forged ones never
    annotate(base, fresh, [(target, 0)])
    assert all(j["status"] == "succeeded" for j in pull(base))
    assert reviews_of(base, fresh) == 1
    assert forged_id in odd_tasks(base)


def test_an_edited_ref_does_not_stop_the_pull(base: Base, fresh: Sent, member: Member) -> None:
    """A member PATCHes one task's ref to another task's token: every pull still succeeds (it
    failed with ``IntegrityError`` and its SQL in ``job.error``), the edited task is skipped
    and reported, its verdict is set aside (it may be about another image), and the others'
    verdicts come in."""
    first, second = fresh.tasks[0], fresh.tasks[1]
    annotate(base, fresh, [(first, 0), (second, 0)])
    edited = {"data": {**second["data"], "ref": first["data"]["ref"]}}
    r = member.api.patch(f"/api/tasks/{second['id']}/", json=edited)
    assert r.status_code == 200, r.text
    for _ in range(2):
        jobs = pull(base)
        assert all(j["status"] == "succeeded" for j in jobs), jobs
        assert not any("SQL" in (j.get("error") or "") for j in jobs)
        rep = report(base, fresh)
        assert total(rep) == 1  # the edited task's stored verdict counts nowhere...
        assert rep["on_edited_tasks"] == 1  # ...and the report says it was set aside
    odd = odd_tasks(base)[second["id"]]
    assert odd["claims"] == second["id"] and "ref edited" in odd["reason"]
    assert first["id"] not in odd_tasks(base)
    r = member.api.patch(f"/api/tasks/{second['id']}/", json={"data": second["data"]})
    assert r.status_code == 200, r.text  # restored: its verdict counts again
    assert all(j["status"] == "succeeded" for j in pull(base))
    rep = report(base, fresh)
    assert (total(rep), rep["on_edited_tasks"]) == (2, 0)
    assert second["id"] not in odd_tasks(base)


def test_verdicts_written_in_another_members_name_are_flagged(
    base: Base, fresh: Sent, member: Member
) -> None:
    """Label Studio Community lets any member write an annotation in another's name
    (``completed_by``) or rewrite another's; it records the writer (``updated_by``, set from
    the token, whatever the request says). Such verdicts are flagged: counted in the report
    and the project, left out with ``flagged=exclude``."""
    first, second = fresh.tasks[0], fresh.tasks[1]
    own = member.api.post(
        f"/api/tasks/{first['id']}/annotations/", json={"result": verdict_result(base, True)}
    ).json()
    forged = member.api.post(
        f"/api/tasks/{second['id']}/annotations/",
        json={
            "result": verdict_result(base, False),
            "completed_by": base.reviewers[0],
            "updated_by": base.reviewers[0],
        },
    ).json()
    assert (forged["completed_by"], forged["updated_by"]) == (base.reviewers[0], member.id)
    rep = wait_reviews(base, fresh, 2)
    assert rep["flagged"] == 1
    assert total(report(base, fresh, flagged="exclude")) == 1
    assert report(base, fresh, flagged="only")["flagged"] == 1
    # someone else rewrites the member's own verdict: flagged too
    base.ls.annotations.update(own["id"], result=verdict_result(base, False))
    wait_until(lambda: report(base, fresh)["flagged"] == 2, what="the rewrite flagged")
    assert total(report(base, fresh, flagged="exclude")) == 0
    assert toy_project(base)["flagged"] >= 2


def forgery(base: Base, ref: str) -> dict:
    """A task carrying ``ref`` with a verdict in a reviewer's name, as any member can import
    it (the pull exports annotated tasks only: one without verdicts changes nothing)."""
    verdict = {"result": verdict_result(base, True), "completed_by": base.reviewers[0]}
    return {"data": {"ref": ref, "image": "x", "expected_class": "x"}, "annotations": [verdict]}


def test_import_recovery_adopts_only_what_protomed_sent(
    base: Base, fresh: Sent, member: Member
) -> None:
    """A crash between Label Studio's import and protomed's commit: the next sync recovers the
    ids from an export, but only for tasks whose import protomed had sent, and only its own
    task per ref (the first numbered after the import was sent); a task a member imported with
    a ref, whether before protomed sent it (a leaked token) or copied after, is never adopted
    (on main the leaked one was adopted before anything was imported)."""
    from sqlalchemy import select

    from service.config import get_settings
    from service.db.models import ReviewTask
    from service.db.session import get_sessionmaker
    from service.reviews import request_review
    from workers.review_sync import export, import_tasks

    _dataset, batches, _truth = seed_batches(base.env)
    ls_project = fresh.project["ls_project_id"]
    with service_context(base.env), get_sessionmaker()() as s:
        project, tasks = request_review(s, list(batches.values()), None)
        s.commit()
        leaked, copied = sorted(tasks, key=lambda t: t.position)[:2]
        early = member.api.post(
            f"/api/projects/{ls_project}/import?return_task_ids=true",
            json=[forgery(base, leaked.token)],
        ).json()
        ls, answered = base.ls, []

        class Crash(Exception):
            pass

        class CrashAfterImport:  # Label Studio imports; the worker dies before its commit
            def __init__(self) -> None:
                self.projects, self.exports, self.tasks = self, ls.projects.exports, ls.tasks

            def import_tasks(self, *args: Any, **kwargs: Any) -> Any:
                answered.extend(ls.projects.import_tasks(*args, **kwargs).task_ids)
                raise Crash

        with pytest.raises(Crash):
            import_tasks(CrashAfterImport(), project, get_settings())
        s.rollback()
        assert all(t.ls_task_id is None for t in tasks) and len(answered) == len(tasks)
        copy = member.api.post(
            f"/api/projects/{ls_project}/import?return_task_ids=true",
            json=[forgery(base, copied.token)],
        ).json()
        assert import_tasks(ls, project, get_settings()) == 0  # nothing imported twice
        s.expire_all()
        order = sorted(tasks, key=lambda t: t.position)
        assert [t.ls_task_id for t in order] == answered
        foreign = {early["task_ids"][0], copy["task_ids"][0]}
        assert not foreign & set(s.scalars(select(ReviewTask.ls_task_id)))
        refs = {t.token for t in tasks}
        claims = [t for t in export(ls, ls_project, all_tasks=True) if t["data"].get("ref") in refs]
        assert len(claims) == len(tasks) + 2
    jobs = pull(base)
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    assert foreign <= set(odd_tasks(base)), (jobs, toy_project(base))
