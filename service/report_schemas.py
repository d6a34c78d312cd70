"""The plausibility report's shape: pydantic models built by
:func:`service.reports.plausibility_report`, read by its CSV, returned by
``GET /reports/plausibility`` (so OpenAPI publishes the schema) and shown by the dashboard.
Torch-free and web-free, like the rest of the service core.

Rates and interval limits are fractions in [0, 1], left unrounded; ``percent_agreement`` alone is
a percentage. Dict keys naming models are ``str(model_id)`` so a report survives a JSON round
trip unchanged. Field names are the JSON keys, except a class row's ``class_name``, which is
``class`` in JSON (a Python keyword).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.study_statistics import Discrimination, Equivalence
from service.study_statistics import Interval as Interval  # the report's (lower, upper) pair

# Which verdicts a report reads by authorship: all, those written by their named author alone,
# or only those Label Studio says someone else (or nobody it knows) wrote.
Flagged = Literal["include", "exclude", "only"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class ModelColumn(_Model):
    """A model the report has a column for."""

    id: int
    mode: str  # "baseline" | "prototype"
    label: str


class Criterion(_Model):
    key: str
    label: str | None = None


class RateEntry(_Model):
    """One model's plausibility over some images, the image being the unit."""

    images: int = Field(description="n: images with at least one verdict (the unit of the rate)")
    reviews: int = Field(description="verdicts on those images (several reviewers per image)")
    plausible: int = Field(description="images whose reviewers' majority said plausible")
    ties: int = Field(description="images whose reviewers split evenly (counted implausible)")
    rate: float | None = Field(description="plausible / images; null without images")
    ci: Interval = Field(description="Wilson score 95% interval of the rate, over images")
    kept_apart: int = Field(
        0,
        description="reviewed images left out of this rate (and of every test): sent because "
        "the scorer was least sure about them (review sample 'uncertain'), so not a random "
        "sample of the batch",
    )
    incomplete: int = Field(
        0,
        description="verdicts on this class and model left out of every number: the reviewer "
        "gave no overall verdict or left a criterion unjudged, so they are neither plausible "
        "nor implausible",
    )


class Difference(_Model):
    """Prototype minus baseline rate over images: Newcombe's interval and Fisher's exact p."""

    value: float
    ci: Interval
    p_value: float
    test: Literal["fisher-exact"] = "fisher-exact"


class ClassDifference(Difference):
    p_holm: float = Field(
        description="p_value Holm-adjusted over the classes compared (those with a difference)"
    )


class VersusReal(_Model):
    """A model's rate minus the real control images' rate in one class, over images, with
    Newcombe's hybrid score 95% interval (descriptive: no test)."""

    value: float
    ci: Interval


class ControlLeak(_Model):
    """What is left that could tell controls apart in a review project: how well the byte
    size of the review copies alone separates real from synthetic images (AUC, real as the
    positive side; 0.5: not at all), measured when controls were last added."""

    project_id: int
    png_size_auc: float | None
    real: int
    synthetic: int


class CriterionFailure(_Model):
    """Failures among the verdicts that judged a criterion ("na" or absent: not judged)."""

    fail: int
    judged: int
    rate: float | None


class ClassRow(_Model):
    class_name: str = Field(alias="class")
    models: dict[str, RateEntry]
    difference: ClassDifference | None
    criteria: dict[str, dict[str, CriterionFailure]]
    real: RateEntry | None = Field(
        None, description="real held-out images reviewed as controls (none: no controls)"
    )
    versus_real: dict[str, VersusReal] = Field(
        default_factory=dict, description="per model: its rate minus the real images' rate"
    )


class MacroDifference(_Model):
    """Prototype minus baseline macro rate over the classes both models were judged on."""

    value: float | None
    baseline: float | None
    prototype: float | None
    classes: list[str]
    left_out: list[str]


class Stratified(_Model):
    """The pooled comparison stratified by class: Cochran-Mantel-Haenszel test (continuity-
    corrected) and the Mantel-Haenszel common odds ratio, prototype vs baseline (> 1 favours
    the prototype), with the Robins-Breslow-Greenland 95% interval; null where undefined."""

    test: Literal["cochran-mantel-haenszel"] = "cochran-mantel-haenszel"
    statistic: float
    p_value: float
    odds_ratio: float | None
    odds_ratio_ci: Interval | None
    strata: list[str] = Field(description="the classes both models were judged on")


class Average(_Model):
    macro: dict[str, float | None]
    macro_difference: MacroDifference | None
    pooled: dict[str, RateEntry]
    difference: Difference | None = Field(description="pooled images, not stratified")
    stratified: Stratified | None


class Agreement(_Model):
    """Inter-reviewer agreement on the plausible/implausible verdict (see
    :func:`service.reports.agreement`)."""

    method: Literal["cohen", "fleiss"]
    kappa: float
    items: int
    raters: int
    reviewers: list[str]
    percent_agreement: float


class Methods(_Model):
    """What the numbers mean, stated in the report itself."""

    unit: Literal["image"] = "image"
    consensus: str = (
        "plausible iff more of the image's reviewers said plausible than not; a tie counts as "
        "implausible"
    )
    intervals: str = "Wilson score 95% per rate; Newcombe hybrid score 95% per difference"
    class_test: str = "Fisher's exact, two-sided, over images; Holm-adjusted over k classes"
    pooled_test: str = (
        "Cochran-Mantel-Haenszel stratified by class (continuity-corrected), with the "
        "Mantel-Haenszel common odds ratio; unstratified Fisher over pooled images alongside"
    )
    criteria: str = "failure rates per verdict (descriptive, no test)"
    sample: str = (
        "every number counts only images of a simple random sample of their batch (review "
        "sample 'random'; a batch sent whole is one); images sent because the scorer was "
        "least sure about them (sample 'uncertain') are kept apart: counted in kept_apart, "
        "in no rate, test, failure rate or agreement"
    )
    verdicts: str = (
        "a verdict is implausible if a criterion failed or the overall choice is implausible, "
        "plausible only with an overall 'plausible' and every criterion judged; any other "
        "verdict is incomplete: counted in 'incomplete', in no rate, test, failure rate, "
        "agreement or scorer label"
    )
    holm_classes: int = Field(0, description="k: the classes in the Holm adjustment")
    controls: str = (
        "real images from a dataset's held-out part (never a reviewed model's training images) "
        "reviewed blinded among the synthetic ones: per class their plausible rate (Wilson) "
        "and each model's rate minus it (Newcombe), counted like a model's"
    )
    discrimination: str = (
        "answers to 'real or synthetic?' (projects that ask it) on counted verdicts of the "
        "random sample, the truth being the image's batch (control = real), positive = "
        "synthetic: accuracy, sensitivity and specificity with Clopper-Pearson 95% intervals, "
        "pooled and per class over answers (an image read by several readers counts once per "
        "reader), and per reader; 'indistinguishable' only when the exact TOST (two one-sided "
        "binomial tests at alpha) puts accuracy within 0.5 +- margin, never because accuracy "
        "did not differ significantly from 0.5; the AUC ranks answer and confidence as one "
        "6-point rating; the answers never change a plausibility verdict"
    )


INDISTINGUISHABLE = "indistinguishable"
NOT_SHOWN = "not shown to be indistinguishable"


class OriginScores(Discrimination):
    """Answers to "real or synthetic?" of one group (all, a class or a reader): accuracy,
    sensitivity and specificity (positive = synthetic) with exact intervals, the exact TOST of
    accuracy against 0.5 +- margin, and the ROC AUC of the answer-and-confidence ratings."""

    equivalence: Equivalence | None = Field(description="null without answers")
    claim: Literal["indistinguishable", "not shown to be indistinguishable"] = Field(
        description="'indistinguishable' only when the TOST shows accuracy within 0.5 +- margin "
        "(equivalence.equivalent); never from a non-significant difference from 0.5"
    )
    rated: int = Field(description="answers with a confidence rating (the AUC's n)")
    auc: float | None = Field(
        description="Mann-Whitney AUC of the 6-point rating (1 sure real ... 6 sure synthetic) "
        "on synthetic vs real images; 0.5: no separation; null without both kinds rated"
    )
    roc: list[Interval] = Field(
        default_factory=list,
        description="ROC points (false positive rate, true positive rate) of the same ratings",
    )


class OriginDiscrimination(_Model):
    """Can readers tell the real control images from the synthetic ones? Counted answers on
    the random sample only; truth is the image's batch (control = real)."""

    margin: float = Field(description="equivalence bounds: accuracy 0.5 - margin to 0.5 + margin")
    alpha: float = Field(description="level of each one-sided test of the TOST")
    pooled: OriginScores = Field(description="every answer of every reader (reads as units)")
    classes: dict[str, OriginScores]
    readers: dict[str, OriginScores] = Field(description="by reviewer e-mail, else user id")


class Filters(_Model):
    dataset_id: int | None = None
    models: str | None = None
    reviewer: str | None = None
    criteria_set_id: int | None = None
    flagged: Flagged = "include"


class PlausibilityReport(_Model):
    """The seed paper's Tables 3-4: per class and model, the share of images judged plausible."""

    methods: Methods
    models: list[ModelColumn]
    baseline_id: int | None
    prototype_id: int | None
    classes: list[ClassRow]
    average: Average
    criteria: list[Criterion]
    criteria_failure: dict[str, dict[str, CriterionFailure]]
    agreement: Agreement | None
    kept_apart: int = Field(
        0,
        description="reviewed images kept out of every number (the scorer's uncertain picks; "
        "methods.sample); per class and model in each rate entry's kept_apart",
    )
    incomplete: int = Field(
        0,
        description="verdicts read but counted nowhere (no overall verdict, or a criterion "
        "left unjudged); per class and model in each rate entry's incomplete",
    )
    flagged: int = Field(
        0,
        description="verdicts read that Label Studio says were written by someone other than "
        "their named reviewer, or by nobody it knows (any member can write in another's name "
        "in Label Studio Community); filters.flagged=exclude leaves them out, only shows them",
    )
    on_edited_tasks: int = Field(
        0,
        description="verdicts left out because their Label Studio task's data (ref, image, "
        "expected class) was edited after protomed imported it; they count again once the "
        "task is restored (the review project's odd_tasks lists the tasks)",
    )
    filters: Filters | None = None
    control_leaks: list[ControlLeak] = Field(
        default_factory=list,
        description="per review project with controls: the PNG-size AUC of its review copies",
    )
    discrimination: OriginDiscrimination | None = Field(
        None,
        description="how well readers told real from synthetic images; null unless a counted "
        "verdict answered 'real or synthetic?'",
    )
