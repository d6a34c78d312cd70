"""A grouped bar chart on a 0-100% axis (plausibility per class and model, F1 per class and
training set), computed here as plain geometry so the template's ``bar_chart`` macro only draws
SVG."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Series:
    """One bar in every group, in one colour: a model, or a training set."""

    key: str  # the bars' data-<series_attr> value
    label: str
    colour: str


@dataclass(frozen=True)
class BarValue:
    """What one bar shows: a fraction (None: no data), an optional interval for the whisker,
    and the tooltip."""

    value: float | None
    interval: tuple[float, float] | None
    tooltip: str


@dataclass(frozen=True)
class Bar:
    """One series' bar in one group; y grows downwards as in SVG."""

    group: str
    series: str
    colour: str
    x: float
    y: float
    width: float
    height: float
    value: float | None
    whisker: tuple[float, float] | None  # y of the interval's upper and lower ends
    tooltip: str

    @property
    def centre(self) -> float:
        return self.x + self.width / 2

    @property
    def text(self) -> str:
        return "n/a" if self.value is None else f"{100 * self.value:.1f}%"

    @property
    def text_y(self) -> float:
        """Just above the whisker, else above the bar (at the axis for no data)."""
        return (self.whisker[0] if self.whisker else self.y) - 5


@dataclass(frozen=True)
class Chart:
    """Geometry of a grouped bar chart on a 0-100% axis, computed here so the template (the
    ``bar_chart`` macro) only draws."""

    width: float
    height: float
    left: float
    top: float
    plot_width: float
    plot_height: float
    bars: list[Bar]
    groups: list[tuple[str, float]]  # group (class) name, x of its centre
    ticks: list[tuple[float, str]]  # y, label
    legend: list[tuple[str, str, float]]  # label, colour, x
    title: str
    axis_title: str
    series_attr: str  # data-* names on the bars, e.g. data-model / data-rate
    value_attr: str


def grouped_bar_chart(
    groups: list[str],
    series: list[Series],
    values: dict[tuple[str, str], BarValue],
    *,
    title: str,
    axis_title: str,
    series_attr: str,
    value_attr: str,
) -> Chart | None:
    """One bar per (group, series) from ``values[(group, series.key)]``, groups side by side,
    whiskers where a value has an interval (clipped to the axis); None without groups or
    series."""
    if not groups or not series:
        return None
    bar_w, gap, pad = 40.0, 8.0, 56.0
    bars_w = len(series) * (bar_w + gap) - gap
    group_w = max(bars_w + pad, min(7.0 * max(len(g) for g in groups) + 12, 180.0))
    left, top, plot_h, bottom = 56.0, 56.0, 240.0, 44.0
    plot_w = group_w * len(groups)
    legend_w = sum(28 + 7.5 * len(s.label) for s in series)
    width = max(left + plot_w + 16, left + legend_w + 16)

    def y_of(fraction: float) -> float:
        return top + plot_h * (1 - min(max(fraction, 0.0), 1.0))

    bars, centres = [], []
    for g, name in enumerate(groups):
        start = left + g * group_w + (group_w - bars_w) / 2
        centres.append((name, left + g * group_w + group_w / 2))
        for i, s in enumerate(series):
            v = values[(name, s.key)]
            height = plot_h * (v.value or 0.0)
            whisker = None
            if v.value is not None and v.interval is not None:
                whisker = (y_of(v.interval[1]), y_of(v.interval[0]))
            bars.append(
                Bar(
                    group=name,
                    series=s.key,
                    colour=s.colour,
                    x=start + i * (bar_w + gap),
                    y=top + plot_h - height,
                    width=bar_w,
                    height=height,
                    value=v.value,
                    whisker=whisker,
                    tooltip=v.tooltip,
                )
            )
    ticks = [(y_of(t / 100), f"{t}%") for t in range(0, 101, 25)]
    legend, x = [], left
    for s in series:
        legend.append((s.label, s.colour, x))
        x += 28 + 7.5 * len(s.label)
    return Chart(
        width,
        top + plot_h + bottom,
        left,
        top,
        plot_w,
        plot_h,
        bars,
        centres,
        ticks,
        legend,
        title,
        axis_title,
        series_attr,
        value_attr,
    )


# --- plausibility against guidance (one class of a sweep) ----------------------------------------


@dataclass(frozen=True)
class ScalePoint:
    """One guidance scale's plausibility: a dot (None: no image judged), its interval's
    whisker, and whether it is the recommended scale."""

    scale: float
    x: float
    y: float | None
    whisker: tuple[float, float] | None  # y of the interval's upper and lower ends
    value: float | None
    recommended: bool
    tooltip: str


@dataclass(frozen=True)
class ScaleChart:
    """Geometry of plausibility (left axis, 0-100%, dots with whiskers, joined) and diversity
    (right axis, dashed) against the guidance scale (x, to scale); the template only draws."""

    width: float
    height: float
    left: float
    top: float
    plot_width: float
    plot_height: float
    points: list[ScalePoint]
    line: str  # SVG polyline points of the judged scales
    diversity: list[tuple[float, float]]  # (x, y) of the scales with a diversity figure
    diversity_line: str
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    d_ticks: list[tuple[float, str]]  # right axis
    title: str


def scale_chart(
    rates: list[tuple[float, float | None, tuple[float, float], bool, str]],
    diversity: list[tuple[float, float | None]],
    diversity_max: float | None,
    *,
    title: str,
) -> ScaleChart | None:
    """``rates``: (scale, rate or None, interval, recommended, tooltip) per scale, ascending;
    ``diversity``: (scale, value or None), drawn against 0..``diversity_max`` (shared by the
    sweep's classes, so their lines compare). None without scales."""
    if not rates:
        return None
    left, top, plot_w, plot_h, right, bottom = 52.0, 28.0, 300.0, 170.0, 52.0, 40.0
    lo_s, hi_s = rates[0][0], rates[-1][0]
    span = hi_s - lo_s or 1.0

    def x_of(scale: float) -> float:
        return left + 14 + (plot_w - 28) * (scale - lo_s) / span

    def y_of(fraction: float) -> float:
        return top + plot_h * (1 - min(max(fraction, 0.0), 1.0))

    points = []
    for scale, rate, (lo, hi), best, tip in rates:
        points.append(
            ScalePoint(
                scale=scale,
                x=x_of(scale),
                y=None if rate is None else y_of(rate),
                whisker=None if rate is None else (y_of(hi), y_of(lo)),
                value=rate,
                recommended=best,
                tooltip=tip,
            )
        )
    line = " ".join(f"{p.x:.2f},{p.y:.2f}" for p in points if p.y is not None)
    top_d = diversity_max or 0.0
    div = [(x_of(s), y_of(v / top_d)) for s, v in diversity if v is not None and top_d > 0]
    d_ticks = [(y_of(f), f"{f * top_d:.2f}") for f in (0.0, 0.5, 1.0)] if top_d > 0 else []
    return ScaleChart(
        width=left + plot_w + right,
        height=top + plot_h + bottom,
        left=left,
        top=top,
        plot_width=plot_w,
        plot_height=plot_h,
        points=points,
        line=line,
        diversity=div,
        diversity_line=" ".join(f"{x:.2f},{y:.2f}" for x, y in div),
        x_ticks=[(x_of(s), f"{s:g}") for s, *_ in rates],
        y_ticks=[(y_of(t / 100), f"{t}%") for t in range(0, 101, 25)],
        d_ticks=d_ticks,
        title=title,
    )


@dataclass(frozen=True)
class CalibrationPoint:
    """One calibration bin drawn at (mean predicted, observed) with its interval's whisker."""

    x: float
    y: float
    whisker: tuple[float, float]  # y of the interval's upper and lower ends
    tooltip: str


@dataclass(frozen=True)
class CalibrationChart:
    """A reliability diagram on [0, 1] x [0, 1]: the bins, the diagonal (perfect calibration)
    and the base rate as a horizontal line; the template only draws it."""

    size: float
    left: float
    top: float
    plot: float
    points: list[CalibrationPoint]
    ticks: list[tuple[float, str]]  # position along either axis, label
    base_y: float

    @property
    def height(self) -> float:
        """Room for the plot, the x ticks and the axis title below it."""
        return self.top + self.plot + 40


def calibration_chart(
    bins: list[tuple[float, float, tuple[float, float], int]], base_rate: float
) -> CalibrationChart | None:
    """Geometry of a calibration curve from bins (mean predicted, observed, observed interval,
    count); None without bins."""
    if not bins:
        return None
    left, top, plot = 56.0, 16.0, 240.0

    def x_of(v: float) -> float:
        return left + plot * min(max(v, 0.0), 1.0)

    def y_of(v: float) -> float:
        return top + plot * (1 - min(max(v, 0.0), 1.0))

    points = [
        CalibrationPoint(
            x_of(pred),
            y_of(obs),
            (y_of(ci[1]), y_of(ci[0])),
            f"predicted {pred:.2f}, observed {obs:.2f} ({ci[0]:.2f}-{ci[1]:.2f}), {count} images",
        )
        for pred, obs, ci, count in bins
    ]
    ticks = [(t / 4, f"{t * 25}%") for t in range(5)]
    return CalibrationChart(left + plot + 16, left, top, plot, points, ticks, y_of(base_rate))
