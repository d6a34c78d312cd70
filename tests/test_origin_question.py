"""The optional "real or synthetic?" question: in the labelling interface only when the review
project asks it (after the plausibility criteria, which it never changes), stored per verdict,
and scored in the plausibility report pooled, per class and per reader, with exact intervals,
an exact TOST against 50% and the confidence AUC, each checked against numbers computed here by
hand. "Indistinguishable" is claimed only when the TOST passes. Label Studio itself is
test_origin_question_ls.py."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from conftest import Service, reset_service_caches
from factories import add_review
from scipy.stats import beta
from sqlalchemy import select
from test_review_controls import seed_study

from service.criteria import (
    ORIGIN,
    ORIGIN_CONFIDENCE,
    annotation_result,
    label_config,
    latest,
    origin_rating,
    parse_result,
)
from service.db.models import Review, ReviewProject, ReviewTask
from service.db.session import get_sessionmaker
from service.report_schemas import INDISTINGUISHABLE, NOT_SHOWN
from service.reports import (
    Judgement,
    discrimination_text,
    plausibility_report,
    report_csv,
)
from service.reviews import apply_annotation, project_for

CRITS = [{"key": "size", "label": "Size"}, {"key": "colour", "label": "Colour"}]
KEYS = [c["key"] for c in CRITS]


@pytest.fixture
def ls(service: Service, monkeypatch: pytest.MonkeyPatch) -> Service:
    """The service with a Label Studio address set (never reached: the request stops at the
    queued sync job)."""
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    reset_service_caches()
    return service


# --- the labelling interface ---------------------------------------------------------------------


def choices(xml: str) -> list[ET.Element]:
    return ET.fromstring(xml).findall("Choices")


def test_the_question_is_in_the_interface_only_when_asked() -> None:
    plain = choices(label_config(CRITS))
    assert [c.get("name") for c in plain] == ["crit_size", "crit_colour", "overall"]
    asked_xml = label_config(CRITS, ask_origin=True)
    asked = choices(asked_xml)
    # the plausibility part is unchanged and comes first; the question follows it
    assert [c.get("name") for c in asked] == [
        "crit_size",
        "crit_colour",
        "overall",
        "origin",
        "origin_confidence",
    ]
    for before, after in zip(plain, asked, strict=False):
        assert ET.tostring(before) == ET.tostring(after)
    origin, confidence = asked[3], asked[4]
    assert [c.get("value") for c in origin] == list(ORIGIN) == ["real", "synthetic"]
    assert [c.get("value") for c in confidence] == list(ORIGIN_CONFIDENCE)
    assert origin.get("required") == confidence.get("required") == "true"
    # neutral and the same on every task: no task variable, no word about the truth or the mix
    root = ET.fromstring(asked_xml)
    question = [h.get("value", "") for h in root.findall("Header")][-2:]
    assert question == ["Is this image real or synthetic?", "How sure are you of that answer?"]
    assert not any("$" in q for q in question)
    # the comment stays last, as without the question
    assert root[-1].tag == plain_root_last_tag()


def plain_root_last_tag() -> str:
    return ET.fromstring(label_config(CRITS))[-1].tag


@pytest.mark.parametrize(
    "criteria",
    [
        {"size": "pass", "colour": "pass"},
        {"size": "fail", "colour": "pass"},
        {"size": "na", "colour": "pass"},
        {"size": "pass"},  # incomplete
    ],
)
def test_origin_answers_round_trip_and_never_change_the_verdict(criteria: dict[str, str]) -> None:
    without = parse_result(annotation_result(criteria), KEYS)
    assert without["answered_synthetic"] is None and without["origin_confidence"] is None
    for answered, confidence in itertools.product((False, True), (1, 2, 3)):
        result = annotation_result(
            criteria, answered_synthetic=answered, origin_confidence=confidence
        )
        parsed = parse_result(result, KEYS)
        assert parsed["answered_synthetic"] is answered
        assert parsed["origin_confidence"] == confidence
        for same in ("plausible", "criteria", "overall", "comment"):
            assert parsed[same] == without[same], same
    # values the interface cannot send are not answers
    odd = [
        *annotation_result(criteria),
        {"from_name": "origin", "value": {"choices": ["maybe"]}},
        {"from_name": "origin_confidence", "value": {"choices": ["5"]}},
    ]
    parsed = parse_result(odd, KEYS)
    assert parsed["answered_synthetic"] is None and parsed["origin_confidence"] is None


def test_origin_rating_orders_answer_and_confidence() -> None:
    """1 = sure it is real ... 6 = sure it is synthetic."""
    ratings = [origin_rating(False, c) for c in (3, 2, 1)] + [
        origin_rating(True, c) for c in (1, 2, 3)
    ]
    assert ratings == [1, 2, 3, 4, 5, 6]


# --- projects and stored answers -----------------------------------------------------------------


def test_ask_origin_makes_a_project_of_its_own_and_stores_the_answers(ls: Service) -> None:
    batches, _, _ = seed_study(ls, images=2)
    plain = ls.client.post("/reviews", json={"batch_ids": batches[:1]}, headers=ls.admin)
    asked = ls.client.post(
        "/reviews", json={"batch_ids": batches, "ask_origin": True}, headers=ls.admin
    )
    assert plain.status_code == asked.status_code == 202, (plain.text, asked.text)
    p0, p1 = plain.json()["project"], asked.json()["project"]
    assert p0["criteria_set_id"] == p1["criteria_set_id"] and p0["id"] != p1["id"]
    assert (p0["origin_question"], p1["origin_question"]) == (False, True)
    assert asked.json()["added"] == 4  # the first batch's images again, in the other project
    with get_sessionmaker()() as s:
        criteria = latest(s, "toy")
        assert criteria is not None
        assert project_for(s, criteria, True).id == p1["id"]
        assert project_for(s, criteria).id == p0["id"]
        keys = [c["key"] for c in criteria.criteria]
        tasks = {}
        for number, project_id in ((1, p0["id"]), (2, p1["id"])):
            project = s.get(ReviewProject, project_id)
            assert project is not None
            project.ls_project_id = 100 + number
            task = s.scalars(select(ReviewTask).where(ReviewTask.project_id == project_id)).first()
            assert task is not None
            task.ls_task_id = 200 + number
            tasks[number] = task
        s.flush()
        given = dict.fromkeys(keys, "pass")
        for number in (1, 2):
            apply_annotation(
                s,
                {
                    "id": 300 + number,
                    "task": 200 + number,
                    "project": 100 + number,
                    "completed_by": 7,
                    "updated_by": 7,
                    "result": annotation_result(
                        given, answered_synthetic=True, origin_confidence=2
                    ),
                },
            )
        s.commit()
        stored = {r.ls_annotation_id: r for r in s.scalars(select(Review))}
        # the project that did not ask keeps no answer to a question it never showed
        assert (stored[301].answered_synthetic, stored[301].origin_confidence) == (None, None)
        assert (stored[302].answered_synthetic, stored[302].origin_confidence) == (True, 2)
        assert stored[301].plausible is stored[302].plausible is True


# --- the report ----------------------------------------------------------------------------------


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """By the beta quantiles (the definition), not through the code under test."""
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def auc_by_pairs(pos: list[int], neg: list[int]) -> float:
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def check(group: dict[str, Any], k_acc: int, n: int, k_sens: int, ns: int, k_spec: int) -> None:
    nr = n - ns
    assert (group["n"], group["synthetic"], group["real"]) == (n, ns, nr)
    for name, k, m in (
        ("accuracy", k_acc, n),
        ("sensitivity", k_sens, ns),
        ("specificity", k_spec, nr),
    ):
        assert (group[name]["k"], group[name]["n"]) == (k, m), name
        assert group[name]["rate"] == pytest.approx(k / m)
        assert group[name]["ci"] == pytest.approx(clopper_pearson(k, m), abs=1e-9), name


def test_report_scores_readers_against_the_truth(ls: Service) -> None:
    """12 synthetic and 6 real images (one class), two readers.
    Reader A (by e-mail): calls 9 of 12 synthetic images synthetic and 4 of 6 real ones real:
    accuracy 13/18, sensitivity 9/12, specificity 4/6. Reader B: 6/12 and 3/6: 9/18.
    Pooled over the 36 answers: 15/24, 7/12, 22/36. Neither reader nor the pool is shown to be
    indistinguishable (n far too small). An incomplete verdict's answer counts nowhere."""
    batches, dataset_id, _ = seed_study(ls)
    body = {
        "batch_ids": batches,
        "controls": {"dataset_id": dataset_id, "per_class": 6},
        "ask_origin": True,
    }
    r = ls.client.post("/reviews", json=body, headers=ls.admin)
    assert r.status_code == 202, r.text
    calls = {"A": (9, 4), "B": (6, 3)}  # (synthetic called synthetic, real called real)
    ratings: dict[str, tuple[list[int], list[int]]] = {"A": ([], []), "B": ([], [])}
    with get_sessionmaker()() as s:
        tasks = s.scalars(select(ReviewTask).order_by(ReviewTask.id)).all()
        number = itertools.count(1)
        for reader, email in (("A", "a@study.org"), ("B", None)):
            seen = {True: 0, False: 0}
            for t in tasks:
                synthetic = t.image.batch.model is not None
                right = seen[synthetic] < calls[reader][0 if synthetic else 1]
                seen[synthetic] += 1
                answered = synthetic if right else not synthetic
                confidence = 1 + (seen[synthetic] % 3)
                ratings[reader][0 if synthetic else 1].append(origin_rating(answered, confidence))
                add_review(
                    s,
                    t,
                    ls_annotation_id=next(number),
                    reviewer=f"user-{reader}",
                    reviewer_email=email,
                    plausible=True,
                    answered_synthetic=answered,
                    origin_confidence=confidence,
                )
        # an incomplete verdict: its answer is in no number
        add_review(
            s,
            tasks[0],
            ls_annotation_id=next(number),
            reviewer="user-C",
            plausible=None,
            overall=None,
            answered_synthetic=True,
            origin_confidence=3,
        )
        s.commit()
    report = ls.client.get("/reports/plausibility", headers=ls.admin).json()
    d = report["discrimination"]
    assert d["margin"] == 0.10 and d["alpha"] == 0.05
    check(d["readers"]["a@study.org"], 13, 18, 9, 12, 4)
    check(d["readers"]["user-B"], 9, 18, 6, 12, 3)
    check(d["pooled"], 22, 36, 15, 24, 7)
    (cls,) = d["classes"]
    assert d["classes"][cls] == d["pooled"]  # one class
    assert set(d["readers"]) == {"a@study.org", "user-B"}
    for reader, key in (("A", "a@study.org"), ("B", "user-B")):
        pos, neg = ratings[reader]
        group = d["readers"][key]
        assert group["rated"] == 18
        assert group["auc"] == pytest.approx(auc_by_pairs(pos, neg))
        assert group["roc"][0] == [0.0, 0.0] and group["roc"][-1] == [1.0, 1.0]
    pos = ratings["A"][0] + ratings["B"][0]
    neg = ratings["A"][1] + ratings["B"][1]
    assert d["pooled"]["auc"] == pytest.approx(auc_by_pairs(pos, neg))
    for group in (d["pooled"], *d["readers"].values()):
        assert group["equivalence"]["equivalent"] is False
        assert group["claim"] == NOT_SHOWN
    csv_text = ls.client.get(
        "/reports/plausibility", params={"format": "csv"}, headers=ls.admin
    ).text
    assert "real or synthetic?" in csv_text and "reader a@study.org" in csv_text
    lo, hi = clopper_pearson(22, 36)
    assert f"{100 * 22 / 36:.2f} [{100 * lo:.1f}; {100 * hi:.1f}] (22/36)" in csv_text
    # every "indistinguishable" in the CSV is the negative claim
    assert csv_text.count("indistinguishable") == csv_text.count(NOT_SHOWN) > 0
    page = ls.client.get("/ui/reports/plausibility", headers=ls.admin)
    assert page.status_code == 200 and 'id="discrimination"' in page.text
    assert NOT_SHOWN in page.text
    assert page.text.count(INDISTINGUISHABLE) == page.text.count(NOT_SHOWN)
    # the reviewer filter keeps one reader's answers
    one = ls.client.get(
        "/reports/plausibility", params={"reviewer": "a@study.org"}, headers=ls.admin
    ).json()["discrimination"]
    assert list(one["readers"]) == ["a@study.org"] and one["pooled"]["n"] == 18


def answers(n_synthetic: int, right_synthetic: int, n_real: int, right_real: int) -> tuple:
    """Judgements on synthetic images (a model's) and real ones (controls) of one reader."""
    ids = itertools.count(1)

    def made(n: int, right: int, synthetic: bool) -> list[Judgement]:
        return [
            Judgement(
                next(ids),
                "c",
                1 if synthetic else 0,
                "baseline" if synthetic else "real",
                "r",
                True,
                {},
                answered_synthetic=synthetic if i < right else not synthetic,
            )
            for i in range(n)
        ]

    return made(n_synthetic, right_synthetic, True), made(n_real, right_real, False)


MODELS = [{"id": 1, "mode": "baseline", "label": "baseline #1"}]


def test_indistinguishable_only_when_the_tost_passes() -> None:
    """6 right of 10 is no evidence of guessing (exact TOST p = 0.62 with margin 0.10): 'not
    shown'. 400 answers with 200 right (synthetic 100/200, real 100/200): the exact 90%
    interval (0.458, 0.542) lies inside (0.4, 0.6), so 'indistinguishable'; with a margin of
    0.02 the same answers are not shown to be."""
    synthetic, real = answers(5, 3, 5, 3)
    small = plausibility_report(synthetic, MODELS, [], controls=real)
    d = small.discrimination
    assert d is not None and d.pooled.accuracy is not None
    assert (d.pooled.accuracy.k, d.pooled.n) == (6, 10)
    assert d.pooled.equivalence is not None
    assert d.pooled.equivalence.p_value == pytest.approx(0.6177193, abs=1e-6)
    assert d.pooled.claim == NOT_SHOWN
    text = discrimination_text(small)
    assert text is not None and NOT_SHOWN in text
    assert text.count("indistinguishable") == 1

    synthetic, real = answers(200, 100, 200, 100)
    large = plausibility_report(synthetic, MODELS, [], controls=real)
    d = large.discrimination
    assert d is not None and d.pooled.equivalence is not None
    assert d.pooled.equivalence.equivalent and d.pooled.equivalence.ci_inside
    assert d.pooled.equivalence.ci == pytest.approx(clopper_pearson(200, 400, 0.90), abs=1e-9)
    assert d.pooled.claim == INDISTINGUISHABLE
    text = discrimination_text(large)
    assert text is not None and text.startswith("real or synthetic, 400 answers")
    assert f"{INDISTINGUISHABLE}:" in text and NOT_SHOWN not in text
    assert f"{INDISTINGUISHABLE}:" in report_csv(large)

    narrow = plausibility_report(synthetic, MODELS, [], controls=real, margin=0.02)
    assert narrow.discrimination is not None
    assert narrow.discrimination.pooled.claim == NOT_SHOWN
    assert narrow.discrimination.margin == 0.02


def test_no_answers_no_section() -> None:
    plain = [Judgement(i, "c", 1, "baseline", "r", True, {}) for i in range(3)]
    assert plausibility_report(plain, MODELS, []).discrimination is None
    # uncertain picks are kept apart here as everywhere
    apart = [
        Judgement(i, "c", 1, "baseline", "r", True, {}, sample="uncertain", answered_synthetic=True)
        for i in range(3)
    ]
    assert plausibility_report(apart, MODELS, []).discrimination is None


@pytest.mark.parametrize("margin", ["0", "0.5", "-0.1", "0.7", "nan", "abc"])
def test_margin_outside_0_and_half_is_refused(ls: Service, margin: str) -> None:
    r = ls.client.get("/reports/plausibility", params={"margin": margin}, headers=ls.admin)
    assert r.status_code == 422, r.text
    page = ls.client.get("/ui/reports/plausibility", params={"margin": margin}, headers=ls.admin)
    assert page.status_code == 422


def test_margin_is_used(ls: Service) -> None:
    r = ls.client.get("/reports/plausibility", params={"margin": "0.2"}, headers=ls.admin)
    assert r.status_code == 200 and r.json()["discrimination"] is None
    page = ls.client.get("/ui/reports/plausibility", params={"margin": "0.2"}, headers=ls.admin)
    assert page.status_code == 200
