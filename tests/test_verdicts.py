"""Which verdicts protomed counts, in-process on SQLite: an annotation
without a recognised verdict is incomplete (stored, shown, never counted as plausible); a pull
counts only the Label Studio tasks protomed created itself and survives any task data a
Label Studio member can write; a verdict written by someone other than its named author is
flagged. The same probes against a real Label Studio are in test_reviews.py."""

from __future__ import annotations

from typing import Any

import pytest
from factories import add_review, review_batches
from sqlalchemy import select

from service.criteria import annotation_result, parse_result
from service.db.models import Review, ReviewProject, ReviewTask
from service.db.session import get_sessionmaker
from service.reports import Judgement, image_verdicts, plausibility_report, report_csv

KEYS = ["a", "b"]
URL = "http://protomed.test"


def choice(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}


@pytest.mark.parametrize(
    ("result", "plausible"),
    [
        ([], None),  # {"result": []}: nothing given
        ([choice("overall", "yes please")], None),  # not one of the interface's choices
        ([choice("overall", "plausible")], None),  # no criterion given
        ([choice("crit_a", "pass"), choice("overall", "plausible")], None),  # b missing
        (
            [choice("crit_a", "pass"), choice("crit_b", "maybe"), choice("overall", "plausible")],
            None,
        ),
        ([choice("crit_a", "pass"), choice("crit_b", "pass")], None),  # no overall verdict
        ([choice("crit_a", "pass"), choice("crit_b", "na"), choice("overall", "plausible")], True),
        ([choice("crit_a", "fail"), choice("overall", "plausible")], False),  # one failure
        ([choice("crit_a", "pass"), choice("overall", "implausible")], False),
        ([choice("crit_b", "fail")], False),
    ],
)
def test_a_verdict_not_given_is_incomplete_never_plausible(
    result: list[dict[str, Any]], plausible: bool | None
) -> None:
    assert parse_result(result, KEYS)["plausible"] is plausible


def test_annotation_result_round_trips() -> None:
    both = {"a": "pass", "b": "na"}
    assert parse_result(annotation_result(both), KEYS)["plausible"] is True
    assert parse_result(annotation_result({"a": "fail", "b": "pass"}), KEYS)["plausible"] is False


# --- the report: incomplete verdicts are shown, never counted ------------------------------------


def judgement(image: int, mode: str, who: str, plausible: bool | None, **kw: Any) -> Judgement:
    model = 1 if mode == "baseline" else 2
    crits = {"a": "fail" if plausible is False else "pass"} if plausible is not None else {}
    return Judgement(image, "x", model, mode, who, plausible, crits, **kw)


COLUMNS = [
    {"id": 1, "mode": "baseline", "label": "b"},
    {"id": 2, "mode": "prototype", "label": "p"},
]


def test_incomplete_verdicts_are_counted_apart_from_every_number() -> None:
    base = [
        judgement(1, "baseline", "r1", True),
        judgement(1, "baseline", "r2", False),
        judgement(2, "prototype", "r1", True),
        judgement(2, "prototype", "r2", True),
    ]
    incomplete = [judgement(1, "baseline", "r3", None), judgement(3, "prototype", "r1", None)]
    without = plausibility_report(base, COLUMNS, [{"key": "a"}])
    rep = plausibility_report(base + incomplete, COLUMNS, [{"key": "a"}])
    assert rep.incomplete == 2 and without.incomplete == 0
    # rates, tests, failure rates and agreement are those without the incomplete verdicts
    strip = {"incomplete", "classes", "average"}
    assert rep.model_dump(exclude=strip) == without.model_dump(exclude=strip)
    cell = rep.classes[0].models
    assert (cell["1"].images, cell["1"].reviews, cell["1"].incomplete) == (1, 2, 1)
    assert (cell["2"].images, cell["2"].reviews, cell["2"].incomplete) == (1, 2, 1)
    assert rep.average.pooled["2"].incomplete == 1
    assert "incomplete" in report_csv(rep)
    assert image_verdicts(base + incomplete) == image_verdicts(base)  # the scorer's labels


# --- the pull: only protomed's own tasks count ---------------------------------------------------


def ann(ann_id: int, user: int, plausible: bool = True, writer: int | None = -1) -> dict:
    """A Label Studio annotation as the export holds it: written by ``writer`` (default: its
    author; None: Label Studio records no writer, as for annotations imported with a task)."""
    crits = {"cell_size": "pass" if plausible else "fail"}
    return {
        "id": ann_id,
        "completed_by": user,
        "updated_by": user if writer == -1 else writer,
        "result": annotation_result(crits | dict.fromkeys(TOY_REST, "pass")),
        "was_cancelled": False,
    }


TOY_REST = ["nucleus_lobes", "nc_ratio", "cytoplasm_colour", "granules"]


def linked_project(session: Any) -> tuple[ReviewProject, list[ReviewTask]]:
    """A toy review project that reached Label Studio (project 77, tasks 1000...)."""
    from service.reviews import request_review

    project, tasks = request_review(session, review_batches(session), None)
    project.ls_project_id = 77
    for i, task in enumerate(sorted(tasks, key=lambda t: t.position)):
        task.ls_task_id = 1000 + i
    session.commit()
    return project, sorted(tasks, key=lambda t: t.position)


def item(task_id: int, task: ReviewTask, annotations: list[dict], **data: Any) -> dict:
    from service.reviews import task_data

    return {"id": task_id, "data": task_data(task, URL) | data, "annotations": annotations}


def stored(session: Any) -> dict[int, tuple[int, bool | None]]:
    session.expire_all()
    return {
        r.ls_annotation_id: (r.task.ls_task_id, r.plausible)
        for r in session.scalars(select(Review))
    }


def test_a_task_protomed_did_not_create_is_reported_not_adopted(service) -> None:
    """A member imports a task whose ref is one of protomed's tokens, with a majority of
    verdicts in other users' names: the pull keeps protomed's own task, counts only its
    verdicts, and reports the other one; an annotation of the forged task never counts."""
    from service.reviews import apply_annotation, reconcile

    with get_sessionmaker()() as s:
        project, tasks = linked_project(s)
        first, second = tasks[0], tasks[1]
        exported = [
            item(1000, first, [ann(1, 7, plausible=False)]),
            item(1001, second, []),
            item(5000, first, [ann(2, 8), ann(3, 9)]),  # claims first's ref
            item(5001, second, [ann(4, 8)], image=f"{URL}/review-images/{first.token}"),
        ]
        for _ in range(2):  # a later pull changes nothing back and forth
            counts = reconcile(s, project, exported)
            s.commit()
            assert stored(s) == {1: (1000, False)}
            assert (first.ls_task_id, second.ls_task_id) == (1000, 1001)
        assert counts["foreign"] == 2
        odd = {o["ls_task_id"]: o for o in project.odd_tasks}
        assert set(odd) == {5000, 5001}
        assert odd[5000]["claims"] == 1000 and odd[5001]["claims"] == 1001
        assert all("not created by protomed" in o["reason"] for o in odd.values())
        assert not any(first.token in str(o) for o in odd.values())  # the ref is not repeated
        # the webhook path: an annotation of the foreign task is ignored, ours is stored
        assert apply_annotation(s, {**ann(2, 8), "task": 5000, "project": 77}) is None
        assert apply_annotation(s, {**ann(5, 8), "task": 1000, "project": 77}) is not None
        s.commit()
        assert stored(s) == {1: (1000, False), 5: (1000, True)}


def test_an_edited_ref_is_skipped_and_reported_and_the_pull_goes_on(service) -> None:
    """A member PATCHes task 1001's ref to task 1000's token: the pull does not stop (on main:
    ``UNIQUE constraint failed: review_tasks.ls_task_id``), skips the edited task, keeps what
    it had stored for it, reports it, and applies every other task's verdicts."""
    from service.reviews import reconcile

    with get_sessionmaker()() as s:
        project, tasks = linked_project(s)
        first, second, third = tasks[:3]
        reconcile(s, project, [item(1001, second, [ann(1, 7)])])
        s.commit()
        exported = [
            item(1000, first, [ann(2, 7)]),
            item(1001, second, [ann(1, 7, plausible=False), ann(3, 8)], ref=first.token),
            item(1002, third, [ann(4, 7)], expected_class="not the class"),
            {"id": "x", "data": None},  # not even a task id: skipped, not a crash
            {"id": 1003, "data": "text", "annotations": [ann(5, 7)]},
        ]
        counts = reconcile(s, project, exported)
        s.commit()
        assert stored(s) == {1: (1001, True), 2: (1000, True)}  # 1 kept as it was
        assert counts["skipped"] == 4
        odd = {o["ls_task_id"]: o["reason"] for o in project.odd_tasks}
        assert set(odd) == {1001, 1002, 1003, None}
        assert "edited" in odd[1001] and "edited" in odd[1002]
        assert (second.ls_task_id, first.ls_task_id) == (1001, 1000)


def test_verdicts_on_an_edited_task_count_nowhere_until_it_is_restored(service) -> None:
    """A member points protomed's task at another picture and judges it (the webhook stores
    that verdict, matched by task id): once a pull sees the edit, none of the task's verdicts
    counts (report, scorer labels, sweeps), the report says how many were set aside, and they
    count again when the task is restored."""
    from service.reviews import apply_annotation, plausibility, reconcile
    from service.scorers import reviewed_count
    from service.sweeps import judgements_by_batch

    with get_sessionmaker()() as s:
        project, tasks = linked_project(s)
        first, second = tasks[:2]
        reconcile(s, project, [item(1000, first, [ann(1, 7)]), item(1001, second, [ann(2, 7)])])
        s.commit()
        other = "https://elsewhere.example/another-picture.png"
        # the webhook path stores the verdict given on the edited task (it matches by task id)
        assert apply_annotation(s, {**ann(3, 8), "task": 1001, "project": 77}) is not None
        exported = [
            item(1000, first, [ann(1, 7)]),
            item(1001, second, [ann(2, 7), ann(3, 8)], image=other),
        ]
        reconcile(s, project, exported)
        s.commit()
        assert second.edited == "image" and first.edited is None
        report = plausibility(s)
        assert report.on_edited_tasks == 2  # both verdicts of the edited task set aside
        assert sum(e.reviews for e in report.average.pooled.values()) == 1
        assert reviewed_count(s, "toy") == 1
        by_batch = judgements_by_batch(s, [t.image.batch_id for t in tasks])
        assert [j.image_id for js in by_batch.values() for j in js] == [first.image_id]
        from service.reports import report_csv

        assert "2 verdicts set aside" in report_csv(report)
        reconcile(
            s, project, [item(1000, first, [ann(1, 7)]), item(1001, second, [ann(2, 7), ann(3, 8)])]
        )
        s.commit()
        assert second.edited is None
        back = plausibility(s)
        assert back.on_edited_tasks == 0
        assert sum(e.reviews for e in back.average.pooled.values()) == 3


def test_a_verdict_written_by_another_member_is_flagged(service) -> None:
    """Label Studio records who last wrote an annotation (``updated_by``: the token's user,
    whatever ``completed_by`` says); a verdict written by anyone but its named author, or with
    no writer recorded, is flagged: counted in the report, and excluded or shown alone on
    request."""
    from service.reviews import plausibility, reconcile

    with get_sessionmaker()() as s:
        project, tasks = linked_project(s)
        exported = [
            item(1000, tasks[0], [ann(1, 7), ann(2, 8, plausible=False, writer=7)]),
            item(1001, tasks[1], [ann(3, 7), ann(4, 8, writer=None)]),
        ]
        reconcile(s, project, exported)
        s.commit()
        rows = {r.ls_annotation_id: r for r in s.scalars(select(Review))}
        assert {i: r.flagged for i, r in rows.items()} == {1: False, 2: True, 3: False, 4: True}
        assert rows[2].written_by == "7" and rows[4].written_by is None
        every = plausibility(s)
        assert every.flagged == 2 and sum(e.reviews for e in every.average.pooled.values()) == 4
        own = plausibility(s, flagged="exclude")
        assert own.flagged == 0 and sum(e.reviews for e in own.average.pooled.values()) == 2
        only = plausibility(s, flagged="only")
        assert only.flagged == 2 and sum(e.reviews for e in only.average.pooled.values()) == 2
        assert own.filters is not None and own.filters.flagged == "exclude"


def test_report_endpoint_counts_incomplete_and_flagged(service) -> None:
    """JSON and CSV of ``GET /reports/plausibility`` say how many verdicts were incomplete and
    flagged; ``flagged=exclude`` leaves the flagged ones out; a bad value is a 422."""
    with get_sessionmaker()() as s:
        _project, tasks = linked_project(s)
        add_review(s, tasks[0], ls_annotation_id=1, reviewer="7")
        add_review(s, tasks[0], ls_annotation_id=2, reviewer="8", flagged=True, written_by="7")
        add_review(s, tasks[1], ls_annotation_id=3, reviewer="7", plausible=None, overall=None)
        s.commit()
    get = service.client.get
    rep = get("/reports/plausibility", headers=service.admin).json()
    assert (rep["incomplete"], rep["flagged"]) == (1, 1)
    rep = get("/reports/plausibility?flagged=exclude", headers=service.admin).json()
    assert (rep["incomplete"], rep["flagged"]) == (1, 0)
    csv = get("/reports/plausibility?format=csv", headers=service.admin).text
    assert "incomplete" in csv and "flagged" in csv
    r = get("/reports/plausibility?flagged=maybe", headers=service.admin)
    assert r.status_code == 422 and "exclude" in r.text


def test_scorer_and_sweep_labels_leave_incomplete_verdicts_out(service) -> None:
    from service.scorers import reviewed_count, reviewed_images
    from service.sweeps import judgements_by_batch

    with get_sessionmaker()() as s:
        _project, tasks = linked_project(s)
        add_review(s, tasks[0], ls_annotation_id=1, reviewer="7")
        add_review(s, tasks[1], ls_annotation_id=2, reviewer="7", plausible=None, overall=None)
        s.commit()
        assert [r.image_id for r in reviewed_images(s, "toy")] == [tasks[0].image_id]
        assert reviewed_count(s, "toy") == 1
        by_batch = judgements_by_batch(s, [t.image.batch_id for t in tasks])
        assert [j.image_id for js in by_batch.values() for j in js] == [tasks[0].image_id]


def test_dashboard_report_shows_incomplete_flagged_and_odd_tasks(service) -> None:
    from test_dashboard import login, text_of

    from service.reviews import reconcile

    with get_sessionmaker()() as s:
        project, tasks = linked_project(s)
        exported = [
            item(1000, tasks[0], [ann(1, 7), ann(2, 8, writer=7)]),
            item(1001, tasks[1], [{**ann(3, 7), "result": []}]),
            item(5000, tasks[0], [ann(4, 8)]),
        ]
        reconcile(s, project, exported)
        s.commit()
    login(service.client)
    page = text_of(service.client.get("/ui/reports/plausibility").text)
    assert "1 verdicts incomplete" in page and "1 flagged verdicts" in page
    assert "task 5000 (carries the ref of task 1000): claims the ref" in page
    page = text_of(service.client.get("/ui/reports/plausibility?flagged=exclude").text)
    assert "are left out (filter flagged=exclude)" in page
    projects = service.client.get("/reviews/projects", headers=service.admin).json()
    assert (projects[0]["incomplete"], projects[0]["flagged"]) == (1, 1)
    assert [o["ls_task_id"] for o in projects[0]["odd_tasks"]] == [5000]
