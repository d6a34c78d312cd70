"""Criteria sets: what experts judge each domain's images by, and the Label Studio labelling
interface built from them.

The seed's rule holds everywhere: one failed criterion makes an image implausible; an image is
plausible only when the reviewer said so and judged every criterion (else the verdict is
incomplete and not counted). Defaults are
written on first start (one per domain, version 1); editing a set through the API stores a new
version, and each version has its own Label Studio project, so old verdicts keep their meaning.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import quoteattr

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ml.errors import Invalid, NotFound
from service.db.models import CriteriaSet

VERDICTS = ("pass", "fail", "na")  # per criterion; "na" when it does not apply to the image
OVERALL = ("plausible", "implausible")
# The optional "real or synthetic?" question (a project's ``origin_question``): a forced choice,
# then how sure the reader is of it. Three levels of confidence in the answer rather than a
# separate "surely real ... surely synthetic" scale: the rating can never contradict the choice,
# has no midpoint that would undo the forced choice, and three levels are what readers use
# consistently; answer and confidence together give a 6-point scale for the ROC curve
# (:func:`origin_rating`).
ORIGIN = ("real", "synthetic")
ORIGIN_CONFIDENCE = ("guessing", "fairly sure", "sure")  # stored as 1, 2, 3

_BONE_MARROW = [
    ("cell_size", "Cell size", "Size fits the cell type and maturation stage."),
    ("nucleus_shape_size", "Nucleus shape and size", "Shape, lobulation and size of the nucleus."),
    ("nc_ratio", "Nucleus-to-cytoplasm ratio", "N:C ratio fits the cell type."),
    ("cytoplasm", "Cytoplasm colour and consistency", "Basophilia, colour, texture."),
    ("chromatin", "Chromatin pattern", "Fine, coarse or clumped as the cell type has it."),
    ("inclusions", "Inclusions", "Vacuoles, Auer rods, inclusions where (and only where) due."),
    ("granules", "Granules", "Type, colour and density of granules."),
]
DEFAULTS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "bone-marrow": ("Bone marrow cytology (seed criteria)", _BONE_MARROW),
    "blood": ("Peripheral blood cells", _BONE_MARROW),
    "dermatoscopy": (
        "Dermatoscopy (editable: the seed does not list its five criteria)",
        [
            ("shape_border", "Lesion shape and border", "Symmetry and border as the class has."),
            ("colour_pigment", "Colour and pigment pattern", "Colours and pigment network."),
            ("structures", "Dermoscopic structures", "Dots, globules, streaks, vessels, veils."),
            ("skin_hair", "Surrounding skin and hair", "Plausible skin texture, hair, lighting."),
            ("artefacts", "No impossible artefacts", "No seams, repeats or impossible anatomy."),
        ],
    ),
    "toy": (
        "Toy cytology (protomed's procedural cells)",
        [
            ("cell_size", "Cell size", "Diameter fits the class."),
            ("nucleus_lobes", "Nucleus lobes", "Number of nucleus lobes fits the class."),
            ("nc_ratio", "N:C ratio", "Nucleus-to-cell area ratio fits the class."),
            ("cytoplasm_colour", "Cytoplasm colour", "Cytoplasm hue fits the class."),
            ("granules", "Granules", "Granule colour and density fit the class."),
        ],
    ),
}


def default_criteria(domain: str) -> list[dict[str, str]]:
    return [{"key": k, "label": label, "help": h} for k, label, h in DEFAULTS[domain][1]]


def ensure_defaults(session: Session) -> None:
    """Version 1 of every default domain, where the domain has no set yet (idempotent)."""
    have = set(session.scalars(select(CriteriaSet.domain).distinct()))
    for domain, (title, _) in DEFAULTS.items():
        if domain not in have:
            session.add(
                CriteriaSet(
                    domain=domain, version=1, title=title, criteria=default_criteria(domain)
                )
            )
    session.flush()


def known_domains(session: Session) -> list[str]:
    """Every domain with a criteria set (the defaults even before start-up wrote them)."""
    return sorted(set(session.scalars(select(CriteriaSet.domain).distinct())) | set(DEFAULTS))


def latest(session: Session, domain: str) -> CriteriaSet | None:
    return session.scalar(
        select(CriteriaSet)
        .where(CriteriaSet.domain == domain)
        .order_by(CriteriaSet.version.desc())
        .limit(1)
    )


def criteria_of(session: Session, domain: str) -> CriteriaSet:
    """The domain's newest criteria set, else :class:`NotFound` naming the known domains."""
    row = latest(session, domain)
    if row is None:
        known = ", ".join(sorted(set(session.scalars(select(CriteriaSet.domain)))))
        raise NotFound(f"no criteria for domain {domain!r}; known: {known}")
    return row


def add_version(
    session: Session, domain: str, title: str, criteria: list[dict[str, Any]]
) -> CriteriaSet:
    """Store an edited set as the domain's next version; :class:`Invalid` if two criteria share
    a key (a verdict is stored per key, so one would overwrite the other)."""
    keys = [c["key"] for c in criteria]
    if len(set(keys)) != len(keys):
        raise Invalid(f"criterion keys must be unique: {keys}")
    top = session.scalar(select(func.max(CriteriaSet.version)).where(CriteriaSet.domain == domain))
    row = CriteriaSet(domain=domain, version=(top or 0) + 1, title=title, criteria=criteria)
    session.add(row)
    session.flush()
    return row


def label_config(criteria: list[dict[str, Any]], ask_origin: bool = False) -> str:
    """Label Studio's XML: the image, the class it should show, pass/fail/n-a per criterion, an
    overall verdict and a comment. Nothing about the model or mode is shown (blinding).

    ``ask_origin``: after the plausibility verdict (so it is judged as without the question),
    "real or synthetic?" and the reader's confidence, both required, in the same neutral words
    on every task: nothing in them hints at the truth or at the share of real images."""
    parts = [
        "<View>",
        '  <Header value="Expected class: $expected_class"/>',
        # Small generated images: shown at a readable size, without blurring the pixels.
        '  <Image name="image" value="$image" zoom="true" zoomControl="true" maxWidth="384px" '
        'smoothing="false"/>',
    ]
    for c in criteria:
        parts += [
            f'  <Header value={quoteattr(c["label"])} size="5"/>',
            f'  <Choices name={quoteattr("crit_" + c["key"])} toName="image" '
            'choice="single-radio" showInline="true" required="true">',
            *(f'    <Choice value="{v}"/>' for v in VERDICTS),
            "  </Choices>",
        ]
    parts += [
        '  <Header value="Overall (one failed criterion makes the image implausible)" size="5"/>',
        '  <Choices name="overall" toName="image" choice="single-radio" showInline="true" '
        'required="true">',
        *(f'    <Choice value="{v}"/>' for v in OVERALL),
        "  </Choices>",
    ]
    if ask_origin:
        parts += [
            '  <Header value="Is this image real or synthetic?" size="5"/>',
            '  <Choices name="origin" toName="image" choice="single-radio" showInline="true" '
            'required="true">',
            *(f'    <Choice value="{v}"/>' for v in ORIGIN),
            "  </Choices>",
            '  <Header value="How sure are you of that answer?" size="5"/>',
            '  <Choices name="origin_confidence" toName="image" choice="single-radio" '
            'showInline="true" required="true">',
            *(f'    <Choice value="{v}"/>' for v in ORIGIN_CONFIDENCE),
            "  </Choices>",
        ]
    parts += [
        '  <TextArea name="comment" toName="image" placeholder="Comment (optional)" '
        'maxSubmissions="1" editable="true"/>',
        "</View>",
    ]
    return "\n".join(parts)


def verdict(criteria: dict[str, str], overall: str | None, keys: list[str]) -> bool | None:
    """The seed's rule on what was given: False (implausible) if any criterion failed or the
    overall verdict is implausible, one failure being enough; True (plausible) only with an
    overall "plausible" and every criterion of the set given (pass or n/a), which is what the
    labelling interface requires; None (incomplete) otherwise. A verdict not given is never a
    yes: Label Studio stores whatever its API is sent (``{"result": []}`` included)."""
    if overall == "implausible" or "fail" in criteria.values():
        return False
    if overall == "plausible" and all(k in criteria for k in keys):
        return True
    return None


def origin_rating(answered_synthetic: bool, confidence: int) -> int:
    """Answer and confidence as one ordinal rating for the ROC curve, 1 = surely real (sure of
    "real") ... 6 = surely synthetic (sure of "synthetic"); higher means more likely synthetic,
    as :func:`service.study_statistics.roc_points` reads ratings."""
    return 3 + confidence if answered_synthetic else 4 - confidence


def parse_result(result: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """An annotation's result -> {criteria, overall, comment, plausible, answered_synthetic,
    origin_confidence}; ``plausible`` is :func:`verdict`'s True, False or None (incomplete),
    from the criteria and overall choice alone (the origin answers never change it);
    ``answered_synthetic`` and ``origin_confidence`` (1..3) are None where not answered.

    Only the interface's own choices count: any other value or shape is taken as not given
    (it can neither break the verdict nor the report)."""
    criteria: dict[str, str] = {}
    overall: str | None = None
    comment: str | None = None
    origin: str | None = None
    confidence: int | None = None
    for item in result if isinstance(result, list) else []:
        if not isinstance(item, dict):
            continue
        name, value = item.get("from_name"), item.get("value")
        if not isinstance(name, str) or not isinstance(value, dict):
            continue
        choices = value.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if name.startswith("crit_") and name[5:] in keys and choice in VERDICTS:
            criteria[name[5:]] = choice
        elif name == "overall" and choice in OVERALL:
            overall = choice
        elif name == "origin" and choice in ORIGIN:
            origin = choice
        elif name == "origin_confidence" and choice in ORIGIN_CONFIDENCE:
            confidence = ORIGIN_CONFIDENCE.index(choice) + 1
        elif name == "comment" and isinstance(value.get("text"), list):
            lines = [t for t in value["text"] if isinstance(t, str)]
            comment = "\n".join(lines) if lines else None
    plausible = verdict(criteria, overall, keys)
    return {
        "criteria": criteria,
        "overall": overall,
        "comment": comment,
        "plausible": plausible,
        "answered_synthetic": None if origin is None else origin == "synthetic",
        "origin_confidence": confidence,
    }


def annotation_result(
    criteria: dict[str, str],
    overall: str | None = None,
    *,
    answered_synthetic: bool | None = None,
    origin_confidence: int | None = None,
) -> list[dict[str, Any]]:
    """The inverse of :func:`parse_result`: a Label Studio result for given verdicts, as an
    automated (rule-based) reviewer posts it. ``overall`` defaults to the seed's rule; the
    origin answers are left out where None."""
    if overall is None:
        overall = "implausible" if "fail" in criteria.values() else "plausible"
    choices = [(f"crit_{k}", v) for k, v in criteria.items()] + [("overall", overall)]
    if answered_synthetic is not None:
        choices.append(("origin", ORIGIN[answered_synthetic]))
    if origin_confidence is not None:
        choices.append(("origin_confidence", ORIGIN_CONFIDENCE[origin_confidence - 1]))
    return [
        {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [v]}}
        for name, v in choices
    ]
