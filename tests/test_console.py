"""Progress bars (``ml.console.progress_bar``): labelled, and off a terminal a bounded number of
plain lines however many updates arrive (counted in lines written, never in seconds)."""

from __future__ import annotations

import io

from tqdm.auto import tqdm

from ml.console import LINES, StagePrinter, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_n_updates_write_a_bounded_number_of_plain_lines() -> None:
    out = io.StringIO()
    with progress_bar(desc="train baseline", total=5000, unit="step", file=out) as bar:
        for _ in range(5000):
            bar.set_postfix(loss="0.1234")
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert 1 < len(lines) <= LINES + 1, lines
    assert all(ln.startswith("train baseline: ") for ln in lines)
    assert lines[-1].startswith("train baseline: 5000/5000 step (100%), loss=0.1234")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_wrapped_iterable_and_an_unknown_total_end_in_one_final_line() -> None:
    out = io.StringIO()
    assert list(progress_bar(range(300), desc="prototypes", unit="epoch", file=out)) == list(
        range(300)
    )
    assert len(out.getvalue().splitlines()) <= LINES + 1
    out = io.StringIO()
    bar = progress_bar(desc="embed images", unit="img", file=out)
    bar.total, bar.n = 35, 35  # as the demo's embedding callback sets it
    bar.refresh()
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("embed images: 35/35 img (100%)")


def test_a_stage_printer_off_a_terminal_is_bounded_too() -> None:
    out = io.StringIO()
    with StagePrinter("evaluate", file=out) as progress:
        for i in range(2000):
            progress("train classifiers" if i < 1000 else "score", i / 2000)
    lines = out.getvalue().splitlines()
    assert "[evaluate] train classifiers ..." in lines and "[evaluate] score ..." in lines
    assert len(lines) <= 2 + LINES + 1, lines


def test_on_a_terminal_the_bar_is_tqdms_with_its_label() -> None:
    bar = progress_bar(desc="sample prototype", total=3, unit="class", file=Terminal())
    assert isinstance(bar, tqdm) and bar.desc == "sample prototype"
    bar.close()
