"""grit_study.tables: the one Markdown table formatter of compare, report and claims, and its cells,
against tables and statistics written out here by hand."""

from __future__ import annotations

import statistics

import pytest

from grit_study.tables import cell, markdown_table, mean_sd, mean_sd_cell, mean_sd_text


def test_markdown_table_lines():
    assert markdown_table(["arm", "test loss"], [["grit", "0.6100"], ["control", "–"]]) == [
        "| arm | test loss |",
        "|---|---|",
        "| grit | 0.6100 |",
        "| control | – |",
    ]
    assert markdown_table(["a"], []) == ["| a |", "|---|"]


def test_cell_formats_floats_only():
    assert cell(None) == "–"
    assert cell(0.123456) == "0.1235"
    assert cell(2e-4, ".0e") == "2e-04"
    assert cell(3407, ".4f") == "3407"  # a count stays a count
    assert cell("hf+peft") == "hf+peft"


def test_mean_sd_is_the_sample_sd():
    values = [0.61, 0.64, 0.58, 0.66]
    mean, sd = mean_sd(values)
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert sd == pytest.approx(statistics.stdev(values), rel=1e-12)  # n - 1 in the denominator
    assert mean_sd([0.5]) == (0.5, None)


def test_mean_sd_cells():
    assert mean_sd_cell([], ".4f") == "–"
    assert mean_sd_cell([0.25], ".4f") == "0.2500"
    # mean 2.0, sd sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2) = 1.41421...
    assert mean_sd_cell([1.0, 3.0], ".4f") == "2.0000 ± 1.4142"
    assert mean_sd_cell([1000, 3000], ",.0f") == "2,000 ± 1,414"
    assert mean_sd_text(0.5, None, ".3f") == "0.500"
