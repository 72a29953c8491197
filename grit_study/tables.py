"""The one Markdown table formatter of the study's reports (compare, report, claims; the sweep writes
through report and claims), and the cells they share.

    lines = markdown_table(["arm", "test loss"], [["grit", cell(0.61234)],
                                                  ["control", mean_sd_cell([0.6, 0.7], ".4f")]])
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a GitHub Markdown table: header, ``|---|`` separator, one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def cell(value: Any, spec: str = ".4f") -> str:
    """A missing value as "–", a float formatted with ``spec``, anything else as ``str`` (ints included,
    so a count is never printed as a float)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample sd (n − 1) of ``values``; the sd is None for a single value, where it is undefined."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)


def mean_sd_text(mean: float, sd: float | None, spec: str) -> str:
    """"mean ± sd" with one format for both, or the mean alone when there is no sd."""
    return format(mean, spec) + (f" ± {format(sd, spec)}" if sd is not None else "")


def mean_sd_cell(values: Sequence[float], spec: str) -> str:
    """The cell of values over seeds: "–" for none, the value for one, "mean ± sd" for several."""
    return mean_sd_text(*mean_sd(values), spec) if len(values) else "–"
