"""Calibrate the synthetic families on the control arm only (issue "A verdict with power", section 1).

    python -m grit_study.sweep --preset smollm2-135m --tiers 1 --only control/lr2e-04_seed3407_steps60  # tuning run
    python benchmarks/calibrate_synthetic.py --run tensorboard_logs/sweep/smollm2-135m/control/lr2e-04_seed3407_steps60

Decodes the validation prompts (never the test split) with the control run's saved adapter and prints
exact match per family next to the difficulty table (``grit_study.synthetic.DIFFICULTY``). The aim:
most families neither near 0% nor near 100%. Edit the table, rerun the control, and freeze the table
before any GRIT run of the sweep; the JSON written here is the record of what was decided and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished control run directory of the sweep")
    parser.add_argument("--out", default="benchmarks/results/synthetic_calibration.json")
    args = parser.parse_args(argv)

    from grit_study import arms, synthetic
    from grit_study.evaluate import accuracy
    from grit_study.presets import resolve_preset
    from grit_study.registry import get_arm

    run = Path(args.run)
    summary = json.loads((run / "run_summary.json").read_text())
    if summary["arm"] != "control":
        raise SystemExit(f"{run} is a {summary['arm']} run: calibrate on the control only")
    preset = resolve_preset(summary["preset"], learning_rate=summary["learning_rate"], seed=summary["seed"],
                            max_steps=summary["max_steps"])
    res = arms.reload_arm(preset, get_arm("control"), summary["sweep"]["adapter_dir"], run)
    tuned = accuracy(res.model, res.tokenizer, res.data.val_rows, preset.template, batch_size=arms.GENERATION_BATCH)
    with res.model.disable_adapter():
        base = accuracy(res.model, res.tokenizer, res.data.val_rows, preset.template, batch_size=arms.GENERATION_BATCH)
    record = {"run": str(run), "split": "val", "val_loss": summary["eval_loss"], "difficulty": synthetic.DIFFICULTY,
              "synthetic": res.data.synthetic, "exact_match": tuned["exact_match"],
              "per_family": tuned["per_family"], "base_per_family": base["per_family"],
              "examples": [p for p in tuned["predictions"] if not p["correct"]][:24]}
    print(f"control {run.name}: val exact match {tuned['exact_match']:.3f} (base {base['exact_match']:.3f})")
    for family, v in tuned["per_family"].items():
        print(f"  {family:15s} {v['exact_match']:.3f} ({v['correct']}/{v['n']})  base "
              f"{base['per_family'][family]['exact_match']:.3f}  knobs {synthetic.DIFFICULTY.get(family)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(history + [record], indent=1, default=str) + "\n")
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
