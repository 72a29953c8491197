"""README stays short and answers first; docs/ holds the rest, each generated block exactly what its generator
makes of the committed logs (so no number in README or docs/ between markers is typed by hand)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LOGS = ROOT / "tensorboard_logs"
# The preset whose committed sweep README answers from (the synthetic study, until the real-data run lands).
SWEEP_PRESET = "smollm2-135m"
SWEEP_LOGS = LOGS / "sweep" / SWEEP_PRESET
SWEEP_FIGURES = "readme_files/sweep"  # the folder `--report` is given, as README and docs/ link it
# The pages README points to; each one must exist and be linked from README.
PAGES = ("verdict.md", "claims.md", "study.md", "cost.md", "colab-gpu.md", "library.md", "architecture.md",
         "published-comparison.md")
MAX_LINES, MAX_WORDS, FIRST_SCREEN = 200, 2000, 50

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _first_screen() -> str:
    return "\n".join(README.read_text(encoding="utf-8").splitlines()[:FIRST_SCREEN])


def test_readme_is_at_most_200_lines_and_2000_words():
    text = README.read_text(encoding="utf-8")
    lines, words = text.count("\n"), len(text.split())  # what `wc -l` and `wc -w` count
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}): move detail to docs/"
    assert words <= MAX_WORDS, f"README.md has {words} words (at most {MAX_WORDS}): move detail to docs/"


def test_the_answer_and_both_commands_are_on_the_first_screen():
    from grit_study.headline import ANSWER_MARKERS

    head = _first_screen()
    for needle in ("make study", "make test", *ANSWER_MARKERS):
        assert needle in head, f"{needle!r} is not in README's first {FIRST_SCREEN} lines"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, mailto: ...


def test_readme_links_every_page_of_docs():
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for t in _relative_links(README) if not t.startswith("#")}
    missing = [p for p in PAGES if (DOCS / p).resolve() not in linked or not (DOCS / p).is_file()]
    assert not missing, f"docs pages missing or not linked from README: {missing}"


def test_every_relative_link_in_readme_and_docs_points_to_an_existing_file():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) > len(PAGES), "docs/ is missing"
    broken = []
    for page in pages:
        for target in _relative_links(page):
            path, _, anchor = target.partition("#")
            dest = page if not path else (page.parent / path).resolve()
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ----------------------------------------------------------------------------- generated blocks


def _expected(page: Path, text: str, out_dir: Path) -> str:
    """What ``include_text`` writes into ``page`` for ``text`` generated into ``out_dir`` (a temporary folder
    standing in for readme_files/sweep, whose name the generators put into the image links)."""
    from grit_study.main import relink

    return relink(text.replace(f"{out_dir}/", f"{SWEEP_FIGURES}/"), page).strip()


def _sweep_preset() -> str:
    presets = {json.loads(f.read_text())["preset"] for f in SWEEP_LOGS.rglob("run_summary.json")}
    assert presets == {SWEEP_PRESET}, f"{SWEEP_LOGS} holds runs of presets {presets}"
    return SWEEP_PRESET


def test_readme_answer_is_what_the_headline_makes_of_the_sweep_logs(tmp_path):
    from grit_study.headline import ANSWER_MARKERS, write_headline
    from grit_study.main import block

    md = write_headline(SWEEP_LOGS, tmp_path, preset=SWEEP_PRESET)
    assert block(README, *ANSWER_MARKERS) == _expected(README, md, tmp_path), (
        "README's answer differs from the committed logs: run `python -m grit_study.sweep --report readme_files/sweep --preset smollm2-135m`")


def test_the_answer_is_the_verdicts_own_primary_row():
    """The headline reuses the verdict's comparison, so its numbers are the verdict table's grit/test-loss rows."""
    from grit_study.headline import answer_rows
    from grit_study.sweep import VERDICT_TIERS, VERDICT_MARKERS, finished_records
    from grit_study.main import block

    rows = answer_rows([r for r in finished_records(SWEEP_LOGS) if r["tier"] in VERDICT_TIERS])
    assert rows and rows[0]["comparison"].role == "primary"
    verdict = block(DOCS / "verdict.md", *VERDICT_MARKERS)
    for row in rows:
        d = row["comparison"].diff
        cells = f"| {d.mean:+.4g} | [{d.lower:+.4g}, {d.upper:+.4g}] ({100 * d.confidence:.4g}%) |"
        assert cells in verdict, f"{row['steps']} steps: {cells} is not a row of docs/verdict.md"


@pytest.mark.slow
def test_docs_verdict_and_claims_are_what_the_sweep_report_makes_of_the_logs(tmp_path):
    from grit_study.main import block
    from grit_study.sweep import CLAIMS_MARKERS, VERDICT_MARKERS, write_claims_report, write_verdict

    verdict = write_verdict(SWEEP_LOGS, tmp_path, preset=SWEEP_PRESET)
    page = DOCS / "verdict.md"
    assert block(page, *VERDICT_MARKERS) == _expected(page, verdict, tmp_path), (
        "docs/verdict.md differs from the committed logs: run `python -m grit_study.sweep --report readme_files/sweep --preset smollm2-135m`")
    claims = write_claims_report(SWEEP_LOGS, tmp_path, _sweep_preset())
    page = DOCS / "claims.md"
    assert block(page, *CLAIMS_MARKERS) == _expected(page, claims, tmp_path), (
        "docs/claims.md differs from the committed logs: run `python -m grit_study.sweep --report readme_files/sweep --preset smollm2-135m`")


def test_docs_study_results_are_what_03_makes_of_the_top_level_runs():
    from grit_study.compare import load_runs, results_markdown
    from grit_study.main import MARKERS, TARGETS, block

    page = TARGETS["study"]
    assert page == DOCS / "study.md"
    assert block(page, *MARKERS["study"]) == results_markdown(load_runs(LOGS)).strip(), (
        "docs/study.md's results differ from the top-level runs of tensorboard_logs/: run `make study`")


def test_include_text_links_plots_from_the_page_and_creates_a_missing_page(tmp_path, monkeypatch):
    from grit_study import main

    monkeypatch.setattr(main, "REPO", tmp_path)
    page = tmp_path / "docs" / "new.md"
    main.include_text(page, "![p](readme_files/x.png)", "<!-- a -->", "<!-- b -->", new_page="# New")
    assert page.read_text() == "# New\n\n<!-- a -->\n![p](../readme_files/x.png)\n<!-- b -->\n"
    main.include_text(tmp_path / "README.md", "t", "<!-- a -->", "<!-- b -->", new_page="# R")
    main.include_text(tmp_path / "README.md", "![p](readme_files/x.png)", "<!-- a -->", "<!-- b -->")
    assert main.block(tmp_path / "README.md", "<!-- a -->", "<!-- b -->") == "![p](readme_files/x.png)"
    (tmp_path / "other.md").write_text("no markers here")
    with pytest.raises(RuntimeError, match="markers"):
        main.include_text(tmp_path / "other.md", "t", "<!-- a -->", "<!-- b -->")


def test_the_real_data_status_quotes_the_committed_preregistration():
    """README's real-data paragraph quotes the margin, n and the two test losses behind the margin as the
    pre-registration file holds them (which tests/test_prereg.py recomputes from the pilot's logs)."""
    import json

    from grit_study.prereg import load_preregistration

    p = load_preregistration(ROOT / "docs" / "preregistration" / "alpaca-smollm2.json")
    losses = json.loads((ROOT / p.path).read_text())["margin"]["inputs"]["control_test_loss"]
    text = " ".join(README.read_text().split())
    assert (f"at {p.steps} steps, over {p.n} paired seeds, lies within ±{p.margin:.3f}, a tenth of what LoRA "
            f"fine-tuning gains over the base model (test loss {p.base_test_loss:.3f} → "
            f"{sum(losses) / len(losses):.3f})") in text
