"""The plausibility scorer's report as pydantic models, torch- and scikit-learn-free, so the API,
the CLI and the dashboard read a stored scorer's metrics (``ml.scorer`` computes them) without
loading the fitting stack."""

from __future__ import annotations

from pydantic import BaseModel, Field

AUC_METHOD = (
    "ROC AUC of out-of-fold probabilities (stratified k-fold; the regularisation chosen inside "
    "each training fold), 95% interval by DeLong's variance (DeLong et al. 1988), clipped to "
    "[0, 1]"
)
CALIBRATION_METHOD = (
    "quantile bins of the predicted probability (as scikit-learn's calibration_curve with "
    "strategy='quantile'): per bin the mean prediction, the observed plausible share and its "
    "Wilson 95% interval"
)


class CalibrationBin(BaseModel):
    """One bin of the calibration curve: images whose predicted probability fell in it."""

    low: float  # the bin's edges in predicted probability
    high: float
    count: int
    mean_predicted: float
    observed: float  # share of the bin's images judged plausible
    observed_ci: tuple[float, float]


class Assessment(BaseModel):
    """How well probabilities ``p`` separate and match verdicts ``y`` (1 = plausible)."""

    n: int
    n_plausible: int
    base_rate: float  # share plausible
    auc: float | None  # None with one class only
    auc_ci: tuple[float, float] | None
    brier: float  # mean squared error of the probabilities (0 best)
    brier_base: float  # the Brier score of always predicting the base rate (the bar to beat)
    calibration: list[CalibrationBin]


class ScorerMetrics(BaseModel):
    """What a trained scorer reports: its cross-validated assessment on the images it was
    trained on, how it was fitted, and per-class counts (plausibility is judged against the
    class an image should show, so the class is an input besides the embedding)."""

    cv: Assessment
    folds: int
    c: float = Field(description="inverse L2 strength of the final fit (chosen by inner CV)")
    c_grid: list[float]
    classes: list[str]
    per_class: dict[str, tuple[int, int]]  # class -> (images, plausible)
    dim: int  # embedding dimensions
    encoder: str
    auc_method: str = AUC_METHOD
    calibration_method: str = CALIBRATION_METHOD
