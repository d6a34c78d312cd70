"""Choosing images for experts: a batch sent whole, or a budget per batch of a simple
random sample plus the images the scorer is least sure about; the report counting the random
sample only and saying how many reviewed images it kept apart. In-process API and SQLite; the
Label Studio round trip of a selection is in test_reviews.py."""

from __future__ import annotations

import csv
import io
import itertools
import random
from collections import Counter

import pytest
from factories import add_batch, add_dataset, add_image, add_model, add_review
from sqlalchemy import func, select

from service.db.models import Batch, Image, ReviewSample, ReviewTask
from service.db.session import get_sessionmaker
from service.reports import Judgement, plausibility_report
from service.reviews import task_data
from service.selection import NotScored, Selection, SelectionError, choose

# --- the selection itself (pure) -----------------------------------------------------------------


def batch_of(scores: list[float | None], batch_id: int = 1, scorer_id: int | None = 1) -> Batch:
    """A transient batch whose image i has id 100 + i and the given scorer probability."""
    batch = Batch(id=batch_id, class_name="a", n=len(scores), scorer_id=scorer_id)
    for i, score in enumerate(scores):
        Image(id=100 + i, batch=batch, class_name="a", index=i, score=score)
    return batch


SCORES = [0.5, 0.96, 0.42, 0.03, 0.61, 0.86, 0.35, 0.7, 0.12, 0.55, 0.78, 0.2]
# uncertainty order (|p - 0.5| ascending, no ties): 0.5 (i0), 0.55 (i9), 0.42 (i2), 0.61 (i4),
# 0.35 (i6), 0.7 (i7), 0.78 (i10), 0.2 (i11), 0.86 (i5), 0.12 (i8), 0.96 (i1), 0.03 (i3)
BY_UNCERTAINTY = [0, 9, 2, 4, 6, 7, 10, 11, 5, 8, 1, 3]


@pytest.mark.parametrize(
    ("per_batch", "share", "r"),
    [(10, 0.5, 5), (10, 0.3, 3), (3, 0.5, 2), (1, 0.5, 1), (5, 0.01, 1), (7, 1.0, 7), (4, 0.8, 3)],
)
def test_random_count_rounds_half_up_and_keeps_one(per_batch: int, share: float, r: int) -> None:
    assert Selection("uncertain", per_batch, share).random_count == r


def test_uncertain_picks_are_the_closest_to_half_among_the_rest() -> None:
    batch = batch_of(SCORES)
    for seed in range(50):
        got = choose(batch, {}, Selection("uncertain", 7, 0.4), random.Random(seed))
        drawn = [img.index for img in got.random]
        assert len(drawn) == 3 == len(set(drawn))  # round(7 x 0.4) = 3
        rest = [i for i in BY_UNCERTAINTY if i not in drawn]
        assert [img.index for img in got.uncertain] == rest[:4], seed


def test_the_random_draw_does_not_depend_on_the_scores() -> None:
    """Every image is as likely to be drawn, the borderline ones included (a draw that avoided
    them, or took the sure ones, would make the rates biased). Chi-square over 3000 seeded
    draws: deterministic, and far from significant for a uniform draw."""
    from scipy.stats import chisquare

    batch, rng, counts = batch_of(SCORES), random.Random(1), Counter[int]()
    for _ in range(3000):
        got = choose(batch, {}, Selection("uncertain", 8, 0.5), rng)
        counts.update(img.index for img in got.random)
    observed = [counts[i] for i in range(len(SCORES))]
    assert sum(observed) == 3000 * 4
    assert chisquare(observed).pvalue > 0.01, observed


def task(sample: ReviewSample) -> ReviewTask:
    return ReviewTask(sample=sample, token="t", position=0)


def test_later_draws_take_earlier_uncertain_picks_but_never_twice() -> None:
    """A second request for a batch draws from every image not yet in the random sample,
    the earlier uncertain picks included (so the union of the draws stays a simple random
    sample of the batch); its uncertain picks come from images not in the project at all."""
    batch = batch_of(SCORES)
    tasks = {
        100: task(ReviewSample.uncertain),
        109: task(ReviewSample.uncertain),
        103: task(ReviewSample.random),
        101: task(ReviewSample.random),
    }
    seen: Counter[int] = Counter()
    for seed in range(400):
        got = choose(batch, tasks, Selection("uncertain", 4, 0.5), random.Random(seed))
        drawn = {img.id for img in got.random}
        assert not drawn & {103, 101}  # already in the random sample
        seen.update(drawn)
        picks = [img.id for img in got.uncertain]
        assert not set(picks) & set(tasks) and not set(picks) & drawn
        rest = [100 + i for i in BY_UNCERTAINTY if 100 + i not in tasks and 100 + i not in drawn]
        assert picks == rest[:2]
    assert seen[100] and seen[109]  # earlier uncertain picks can join the random sample
    assert set(seen) == {100 + i for i in range(12)} - {103, 101}
    whole = choose(batch, tasks, Selection())  # 'all': everything not yet random
    assert {img.id for img in whole.random} == {100 + i for i in range(12)} - {103, 101}
    assert whole.uncertain == []


def test_refusals() -> None:
    unscored = batch_of([None] * 6, scorer_id=None)
    with pytest.raises(NotScored, match="generated before its domain had a scorer"):
        choose(unscored, {}, Selection("uncertain", 4, 0.5))
    partly = batch_of([0.5, None, 0.2, 0.9], scorer_id=3)
    with pytest.raises(NotScored, match="1 of its images have no scorer probability"):
        choose(partly, {}, Selection("uncertain", 4, 0.5))
    # random_share 1: a random subset only, no scorer needed
    assert len(choose(unscored, {}, Selection("uncertain", 4, 1.0)).random) == 4
    with pytest.raises(SelectionError, match="per_batch 7 exceeds batch 1's 6 images"):
        choose(unscored, {}, Selection("uncertain", 7, 1.0))
    full = {100 + i: task(ReviewSample.random) for i in range(5)}
    with pytest.raises(SelectionError, match="only 1 of its 6 images are not yet in"):
        choose(batch_of([0.5] * 6), full, Selection("uncertain", 4, 0.5))
    some = {100 + i: task(ReviewSample.uncertain) for i in range(4)}
    with pytest.raises(SelectionError, match="2 of its 6 images are not in the project yet"):
        choose(batch_of([0.5] * 6), some, Selection("uncertain", 6, 0.5), random.Random(0))
    with pytest.raises(SelectionError, match="needs per_batch"):
        Selection("uncertain", None)
    with pytest.raises(SelectionError, match="random_share"):
        Selection("uncertain", 2, 0)


# --- the report counts the random sample only ----------------------------------------------------


def judgement(image: int, model: int, reviewer: str, plausible: bool, sample: str) -> Judgement:
    return Judgement(
        image,
        "a",
        model,
        "baseline" if model == 1 else "prototype",
        reviewer,
        plausible,
        {"size": "pass" if plausible else "fail"},
        sample,
    )


def test_report_leaves_the_uncertain_picks_out_of_every_number() -> None:
    """Baseline: 4 random images, 3 plausible, and 3 uncertain picks, all implausible;
    prototype: 2 random, both plausible, 1 uncertain pick, implausible. Counted with the picks
    the rates would be 3/7 and 2/3; the random sample alone gives 3/4 and 2/2."""
    js = []
    for img, ok in ((1, True), (2, True), (3, True), (4, False)):
        js += [judgement(img, 1, who, ok, "random") for who in ("ann", "bob")]
    for img in (5, 6, 7):
        js += [judgement(img, 1, who, False, "uncertain") for who in ("ann", "bob")]
    js += [judgement(img, 2, "ann", True, "random") for img in (11, 12)]
    js += [judgement(13, 2, "ann", False, "uncertain")]
    # an image judged both as a random-sample image (one project) and as an uncertain pick
    # (another) counts once, as a random-sample image, and is not kept apart
    js += [judgement(12, 2, "bob", True, "uncertain")]
    models = [
        {"id": 1, "mode": "baseline", "label": "b"},
        {"id": 2, "mode": "prototype", "label": "p"},
    ]
    rep = plausibility_report(js, models, [{"key": "size"}])
    base, proto = rep.classes[0].models["1"], rep.classes[0].models["2"]
    assert (base.images, base.plausible, base.rate, base.kept_apart) == (4, 3, 0.75, 3)
    assert (proto.images, proto.plausible, proto.rate, proto.kept_apart) == (2, 2, 1.0, 1)
    assert base.reviews == 8 and proto.reviews == 2
    assert rep.average.pooled["1"].kept_apart == 3 and rep.kept_apart == 4
    assert rep.criteria_failure["1"]["size"].fail == 2  # image 4's two verdicts only
    assert rep.agreement is not None and rep.agreement.items == 4  # random images, both read
    text = rep.methods.sample
    assert "simple random sample" in text and "kept apart" in text


# --- over the API --------------------------------------------------------------------------------


def scored_batches(images: int = 10, scores: list[float | None] | None = None) -> list[int]:
    """A toy-domain dataset with a baseline and a prototype model, one batch of ``images``
    images each (class "a"), scored as ``scores`` (default: spread over [0, 1])."""
    scores = scores or [round((i + 0.5) / images, 4) for i in range(images)]
    with get_sessionmaker()() as s:
        ds = add_dataset(s, name="scored", classes=["a"], counts={"a": images}, domain="toy")
        ids = []
        for mode in ("baseline", "prototype"):
            m = add_model(s, ds, mode=mode)
            b = add_batch(s, m, class_name="a", n=images)
            for i in range(images):
                add_image(s, b, index=i, data=f"{mode}{i}".encode()).score = scores[i]
            ids.append(b.id)
        s.commit()
    return ids


def tasks_by_position() -> list[ReviewTask]:
    with get_sessionmaker()() as s:
        rows = s.scalars(select(ReviewTask).order_by(ReviewTask.position)).all()
        for t in rows:
            _ = t.image.score, t.image.batch_id
        s.expunge_all()
        return list(rows)


def task_count() -> int:
    with get_sessionmaker()() as s:
        return s.scalar(select(func.count(ReviewTask.id))) or 0


@pytest.fixture
def reviews_on(service, monkeypatch):
    from conftest import reset_service_caches

    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    reset_service_caches()
    return service


def post(service, body: dict):
    return service.client.post("/reviews", json=body, headers=service.admin)


def test_bad_selections_answer_4xx_and_change_nothing(reviews_on) -> None:
    ids = scored_batches(images=6)
    with get_sessionmaker()() as s:
        ds = add_dataset(s, name="old", classes=["a"], counts={"a": 4}, domain="toy")
        b = add_batch(s, add_model(s, ds, mode="baseline"), class_name="a", n=4)
        for i in range(4):
            add_image(s, b, index=i, data=f"old{i}".encode())
        s.commit()
        old = b.id
    cases = [
        ({"select": "uncertain"}, 422, "needs per_batch"),
        ({"per_batch": 3}, 422, "apply to select 'uncertain' only"),
        ({"random_share": 0.5}, 422, "apply to select 'uncertain' only"),
        ({"select": "hardest", "per_batch": 3}, 422, "'all' or 'uncertain'"),
        ({"select": "uncertain", "per_batch": 0}, 422, "per_batch"),
        ({"select": "uncertain", "per_batch": 3, "random_share": 0}, 422, "random_share"),
        ({"select": "uncertain", "per_batch": 3, "random_share": 1.5}, 422, "random_share"),
        ({"select": "uncertain", "per_batch": 3, "random_share": -0.2}, 422, "random_share"),
        ({"select": "uncertain", "per_batch": 7}, 422, "per_batch 7 exceeds batch"),
    ]
    for extra, code, needle in cases:
        r = post(reviews_on, {"batch_ids": ids, **extra})
        assert r.status_code == code and needle in r.text, (extra, r.status_code, r.text)
    # an unscored batch, alone or beside scored ones: nothing is sent, the answer says why
    for batch_ids in ([old], [*ids, old]):
        r = post(reviews_on, {"batch_ids": batch_ids, "select": "uncertain", "per_batch": 2})
        assert r.status_code == 409, r.text
        assert f"batch {old} is not scored" in r.text and "before its domain had a scorer" in r.text
    assert task_count() == 0
    # ... but a random subset of it needs no scorer
    body = {"batch_ids": [old], "select": "uncertain", "per_batch": 2, "random_share": 1}
    r = post(reviews_on, body)
    assert r.status_code == 202, r.text
    assert r.json()["selected"] == [{"batch_id": old, "random": 2, "uncertain": 0}]


def runs(samples: list[str]) -> int:
    """Maximal blocks of equal neighbours: 2 means one kind entirely before the other."""
    return 1 + sum(a != b for a, b in itertools.pairwise(samples))


def test_uncertain_selection_sends_the_expected_images_blinded(reviews_on) -> None:
    ids = scored_batches(images=40)
    body = {"batch_ids": ids, "select": "uncertain", "per_batch": 20, "random_share": 0.5}
    r = post(reviews_on, body)
    assert r.status_code == 202, r.text
    assert r.json()["added"] == 40
    assert r.json()["selected"] == [{"batch_id": b, "random": 10, "uncertain": 10} for b in ids]
    tasks = tasks_by_position()
    assert len(tasks) == 40
    for b in ids:
        mine = [t for t in tasks if t.image.batch_id == b]
        drawn = {t.image_id for t in mine if t.sample == ReviewSample.random}
        picks = {t.image_id for t in mine if t.sample == ReviewSample.uncertain}
        assert len(drawn) == 10 and len(picks) == 10
        with get_sessionmaker()() as s:
            rest = s.scalars(select(Image).where(Image.batch_id == b, Image.id.not_in(drawn))).all()
            closest = sorted(rest, key=lambda i: (abs(i.score - 0.5), i.index))[:10]
        assert picks == {i.id for i in closest}
    # blinded: what Label Studio gets is the same for both kinds, and the order mixes them
    for t in tasks:
        with get_sessionmaker()() as s:
            data = task_data(s.get(ReviewTask, t.id), "http://api")
        assert set(data) == {"image", "expected_class", "ref"}
        assert "uncertain" not in str(data) and "random" not in str(data)
    order = [str(t.sample) for t in tasks]
    assert runs(order) > 2, order  # P(a block of each kind | shuffled) = 2 / C(40, 20) ~ 1e-11
    projects = reviews_on.client.get("/reviews/projects", headers=reviews_on.admin).json()
    assert "uncertain" not in str(projects) and "random" not in str(projects)


def test_sending_a_batch_whole_later_makes_every_task_random(reviews_on) -> None:
    ids = scored_batches(images=8)
    body = {"batch_ids": ids, "select": "uncertain", "per_batch": 4}
    assert post(reviews_on, body).json()["added"] == 8
    again = post(reviews_on, body).json()  # a second budget: drawn from what is not random yet
    assert again["selected"] == [{"batch_id": b, "random": 2, "uncertain": 2} for b in ids]
    tasks = tasks_by_position()
    # the earlier picks the second draw took are random now, and no image has two tasks
    assert len(tasks) == 8 + again["added"] == len({t.image_id for t in tasks})
    # random: 4 + 4 drawn; uncertain: 4 earlier, less those drawn, + 4 new (= the new tasks)
    assert Counter(t.sample for t in tasks) == {"random": 8, "uncertain": again["added"]}
    whole = post(reviews_on, {"batch_ids": ids})
    assert whole.status_code == 202, whole.text
    assert whole.json()["added"] == 16 - len(tasks)
    tasks = tasks_by_position()
    assert len(tasks) == 16 and {t.sample for t in tasks} == {ReviewSample.random}
    assert sorted(t.position for t in tasks) == list(range(16))


def test_report_rate_is_the_random_samples_exactly(reviews_on) -> None:
    """The uncertain picks are all judged implausible and the random sample mostly plausible:
    the report's rate is the random sample's, to the last digit, and the picks show as kept
    apart (JSON, CSV, dashboard)."""
    from test_dashboard import login, text_of

    ids = scored_batches(images=10)
    body = {"batch_ids": ids, "select": "uncertain", "per_batch": 8, "random_share": 0.5}
    assert post(reviews_on, body).status_code == 202
    expected: dict[str, tuple[int, int, int]] = {}  # mode -> (plausible, random images, picks)
    with get_sessionmaker()() as s:
        tasks = s.scalars(select(ReviewTask).order_by(ReviewTask.image_id)).all()
        ann = iter(range(1, 1000))
        for b, mode in zip(ids, ("baseline", "prototype"), strict=True):
            mine = [t for t in tasks if t.image.batch_id == b]
            drawn = [t for t in mine if t.sample == ReviewSample.random]
            picks = [t for t in mine if t.sample == ReviewSample.uncertain]
            bad = 1 if mode == "baseline" else 0  # the first random image: implausible
            for i, t in enumerate(drawn):
                for who in ("7", "8"):
                    add_review(s, t, ls_annotation_id=next(ann), reviewer=who, plausible=i >= bad)
            for t in picks:
                for who in ("7", "8"):
                    add_review(s, t, ls_annotation_id=next(ann), reviewer=who, plausible=False)
            expected[mode] = (len(drawn) - bad, len(drawn), len(picks))
        s.commit()
    assert expected == {"baseline": (3, 4, 4), "prototype": (4, 4, 4)}
    r = reviews_on.client.get("/reports/plausibility", headers=reviews_on.admin)
    rep = r.json()
    cols = {m["mode"]: str(m["id"]) for m in rep["models"]}
    for mode, (plausible, n, picks) in expected.items():
        for entry in (
            rep["classes"][0]["models"][cols[mode]],
            rep["average"]["pooled"][cols[mode]],
        ):
            assert entry["images"] == n and entry["plausible"] == plausible
            assert entry["rate"] == plausible / n and entry["kept_apart"] == picks
            assert entry["reviews"] == 2 * n
    assert rep["kept_apart"] == 8 and rep["agreement"]["items"] == 8
    assert rep["classes"][0]["difference"]["value"] == 1.0 - 0.75
    params = {"format": "csv"}
    table = list(
        csv.reader(
            io.StringIO(
                reviews_on.client.get(
                    "/reports/plausibility", params=params, headers=reviews_on.admin
                ).text
            )
        )
    )
    assert table[1][1:3] == [
        "75.00 (n=4; 8 reviews; 4 kept apart)",
        "100.00 (n=4; 8 reviews; 4 kept apart)",
    ]
    (line,) = [row for row in table if row and row[0] == "kept apart"]
    assert line[1].startswith("8 reviewed images kept apart")
    login(reviews_on.client)
    page = reviews_on.client.get("/ui/reports/plausibility").text
    assert "8 reviewed images kept apart" in text_of(page)
    assert "75.00 (4; 4 kept apart)" in text_of(page)
