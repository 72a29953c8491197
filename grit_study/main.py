"""The main job: execute the study's notebooks with papermill and keep the executed copies.

    python -m grit_study.main study       # 01 baseline, 02 GRIT, 02 control, 03 compare (make study)
    python -m grit_study.main ablations   # natural gradient only, regularizers only, reference pairing,
                                          # the published padding artifact, GRIT without grafting (the
                                          # published scale), then 03 again (make ablations)

Every notebook runs in its own kernel (Unsloth patches transformers on import, so the arms must not
share a process) with the auto preset unless ``GRIT_PRESET`` says otherwise; on the CPU default
(alpaca-smollm2) ``study`` runs fewer steps than the preset (``STUDY_OVERRIDES``). 03 then writes the plots
and ``readme_files/results.md`` (ablations: every run of the log directory, into ``readme_files/ablations/``),
and the results table is copied between the job's markers into its page of docs/: ``docs/study.md``
(study) or ``docs/ablations.md`` (ablations, created on its first run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
NOTEBOOKS = REPO / "notebooks"
COMPARE = "03_compare"

# Which notebook runs each arm, and the arms of each job: both from the registry (grit_study.registry).
STUDY_ARMS = ("baseline", "grit", "control")

# `make study` on the CPU default must fit in 30 minutes on an idle 2-core machine; the preset's 60 steps (the
# sweep's protocol) do not. Estimate for alpaca-smollm2 (max_seq_length 512):
#   training: 9.6 s per step at 256 tokens per sequence, scaled to this sample's expected micro-batch width at
#     512 (275 tokens, padded to the longer of 2 rows): 10.3 s; +20% because the Unsloth and GRIT arms' steps
#     took 1.19-1.27x the control's in the committed synthetic runs: 12.4 s. 3 arms x 16 steps = 595 s.
#   evaluation: 1.8 ms per padded token (the committed synthetic runs: 20 s per 11,040-token val pass), with
#     batches sorted by length val is 23.6k tokens (43 s), test 39.7k (72 s). Per arm: start-up and 4-bit load
#     45 s, val at steps 0 and 16 (eval_steps 20 > 16) 86 s, test 72 s, retention 5 s, export 20 s plus its
#     merged-model and GGUF passes over val 2 x 43 s: 314 s; x 3 arms, +30 s to sample the retention texts once,
#     +15 s for 03: 987 s.
#   in all about 1,580 s (26 min); 20 steps would be 29 min, too close to the limit.
# kfac_update_freq 4: GRIT's factors are first inverted at step 4, so 13 of the 16 steps are preconditioned (the
# sweep's 60-step runs: 51 of 60 at 10). 16 x 8 sequences draw 0.18 epochs of the 694 training rows.
# Given as GRIT_<FIELD> environment variables, inherited by every notebook's kernel; a variable the user has
# set wins. Other presets (GRIT_PRESET=smollm2-135m, llama3-8b on CUDA) run their own fields.
STUDY_OVERRIDES = {"alpaca-smollm2": {"max_steps": 16, "kfac_update_freq": 4}}


def _jobs(names) -> list[tuple[str, str, dict]]:
    from .registry import get_arm

    out = []
    for name in names:
        spec = get_arm(name)
        out.append((spec.notebook, f"{spec.notebook[:2]}_{name}", {"ARM": name}))
    return out


def study_jobs() -> list[tuple[str, str, dict]]:
    return [(nb, out, {**params, "EXPORT": True}) for nb, out, params in _jobs(STUDY_ARMS)]


def ablation_jobs() -> list[tuple[str, str, dict]]:
    from .registry import arms_in

    # The baseline's padding artifact needs Unsloth's own collator path; the GRIT-side one shows the effect.
    return _jobs(a.name for a in arms_in("ablation") if a.stack == "hf+peft")


# The page and the section of it that 03's table is copied into, per job; ablations get their own figures folder.
MARKERS = {"study": ("<!-- results:start -->", "<!-- results:end -->"),
           "ablations": ("<!-- ablations:start -->", "<!-- ablations:end -->")}
RESULTS_START, RESULTS_END = MARKERS["study"]
TARGETS = {"study": DOCS / "study.md", "ablations": DOCS / "ablations.md"}
# What a job's page holds when it does not exist yet (only ablations: docs/study.md is committed).
NEW_PAGE = {"ablations": "# Ablations (`make ablations`)\n\nWritten by `make ablations` (`grit_study/main.py`) from every "
            "run of its log directory: natural gradient only, regularizers only, the published pairing, the published "
            "padding artifact and GRIT without grafting, beside the study's arms. One seed each, at the preset's "
            "learning rate, untuned: descriptive, not a verdict. Plots: `readme_files/ablations/`.\n"}


def execute(notebook: str, output_name: str, parameters: dict, notebook_dir: Path) -> float:
    import papermill

    out = notebook_dir / f"{output_name}.ipynb"
    print(f"[study] {notebook} -> {out} {parameters}", flush=True)
    t0 = time.time()
    papermill.execute_notebook(str(NOTEBOOKS / f"{notebook}.ipynb"), str(out), parameters=parameters,
                               cwd=str(REPO), kernel_name="python3", progress_bar=False, log_output=True)
    seconds = time.time() - t0
    print(f"[study] {output_name}: {seconds:.0f} s", flush=True)
    return seconds


def relink(text: str, page: Path) -> str:
    """The generators link their plots from the repository root (``readme_files/...``, as README reads them);
    for a page in a subfolder of the repository (docs/) those links are rewritten relative to the page."""
    folder, repo = page.resolve().parent, REPO.resolve()
    if folder == repo or repo not in folder.parents:
        return text
    return text.replace("](readme_files/", f"]({Path(os.path.relpath(repo, folder)).as_posix()}/readme_files/")


def block(page: Path, start: str, end: str) -> str:
    """The generated text of ``page`` between ``start`` and ``end`` (as ``include_text`` wrote it, stripped)."""
    text = page.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise RuntimeError(f"{page} lacks the {start} / {end} markers around its generated section")
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def include_text(page: Path, text: str, start: str, end: str, *, new_page: str | None = None) -> None:
    """Replace ``page``'s section between ``start`` and ``end`` with ``text`` (links made relative to the page),
    so README and docs/ show what the logs hold. A missing page is created from ``new_page`` when given."""
    if not page.exists() and new_page is not None:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"{new_page.rstrip()}\n\n{start}\n{end}\n", encoding="utf-8")
    old = page.read_text(encoding="utf-8")
    if start not in old or end not in old:
        raise RuntimeError(f"{page} lacks the {start} / {end} markers around the section to rewrite")
    head, rest = old.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{relink(text, page).strip()}\n{end}{tail}", encoding="utf-8")


def include_results(page: Path, results: Path, start: str = RESULTS_START, end: str = RESULTS_END, *,
                    new_page: str | None = None) -> None:
    """03's results table into ``page`` between the job's markers."""
    include_text(page, results.read_text(encoding="utf-8"), start, end, new_page=new_page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["study", "ablations"])
    parser.add_argument("--logdir", default="tensorboard_logs", help="TensorBoard root every run writes into")
    parser.add_argument("--notebook-dir", default="outputs/notebooks", help="where executed notebooks are kept")
    parser.add_argument("--figures", default="readme_files", help="where 03 writes plots and results.md")
    args = parser.parse_args(argv)

    from .presets import resolve_preset

    preset = resolve_preset().name
    if args.job == "study":
        for name, value in STUDY_OVERRIDES.get(preset, {}).items():
            os.environ.setdefault(f"GRIT_{name.upper()}", str(value))
        p = resolve_preset()
        print(f"[study] preset {preset}: max_steps {p.max_steps}, kfac_update_freq {p.kfac_update_freq}", flush=True)
    notebook_dir = Path(args.notebook_dir)
    notebook_dir.mkdir(parents=True, exist_ok=True)
    common = {"LOGDIR": args.logdir}
    t0 = time.time()
    for notebook, name, params in study_jobs() if args.job == "study" else ablation_jobs():
        execute(notebook, name, {**common, **params}, notebook_dir)
    figures = Path(args.figures) if args.job == "study" else Path(args.figures) / "ablations"
    execute(COMPARE, f"03_compare_{args.job}", {**common, "PRESET": preset, "FIGURES_DIR": str(figures)}, notebook_dir)
    include_results(TARGETS[args.job], figures / "results.md", *MARKERS[args.job], new_page=NEW_PAGE.get(args.job))
    print(f"[study] {args.job} on preset {preset}: {time.time() - t0:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
