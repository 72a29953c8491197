"""Tier 5 of the sweep: IFEval on the deployed GGUF of the base and of every finished tier-3 run (issue 21)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from grit_study import ifeval, sweep

ROOT = Path(__file__).resolve().parents[1]
TIER3 = sweep.PlannedRun(3, "control", 2e-4, sweep.BASE_SEED, 4, "full", 2)  # a tier-3 run, tiny's length


def _tier3_run(root: Path, run: sweep.PlannedRun = TIER3, preset: str = "tiny") -> Path:
    """A finished tier-3 run of ``preset`` as the sweep writes it: summary with the sweep's record, test loss."""
    from grit_study.files import SUMMARY_NAME

    d = sweep.run_dir(sweep.preset_logdir(root, preset), run)
    d.mkdir(parents=True)
    summary = {"arm": run.arm, "preset": preset, "learning_rate": run.learning_rate, "seed": run.seed,
               "max_steps": run.steps, "eval_loss": {"0": 2.0, str(run.steps): 1.0}, "test_loss": 1.0,
               "sweep": {"tier": run.tier, "definition": sweep.definition(run, preset)}}
    (d / SUMMARY_NAME).write_text(json.dumps(summary))
    return d


def _saved_adapter(folder: Path) -> None:
    """A PEFT adapter of the tiny preset's shape (B non-zero, so the merge changes the model), as run_one saves it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grit_study.models import lora_config, tiny_dir
    from grit_study.presets import resolve_preset

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    torch.manual_seed(0)
    peft = get_peft_model(model, lora_config(resolve_preset("tiny")))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft.save_pretrained(str(folder))


def _args(tmp_path, *extra):
    return ["--preset", "tiny", "--logdir", str(tmp_path / "logs"), "--adapters", str(tmp_path / "adapters"), *extra]


def test_the_make_target_named_in_the_refusal_is_the_makefiles():
    version = re.search(r"^LLAMA_CPP_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    stamp = re.search(r"^LLAMA_STAMP := \$\(VENV\)/(\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    assert sweep.LLAMA_CPP_MAKE_TARGET == ".venv/" + stamp.replace("$(LLAMA_CPP_VERSION)", version)


def test_tier5_is_opt_in_and_refused_without_llama_cpp(tmp_path, capfd, monkeypatch):
    _tier3_run(tmp_path / "logs")
    capfd.readouterr()
    assert sweep.main(_args(tmp_path, "--dry-run", "--tiers", "1")) == 0
    assert "IFEval" not in capfd.readouterr().out  # not in the default tiers, nor in any other
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    assert sweep.main(_args(tmp_path, "--tiers", "5")) == 2
    out = capfd.readouterr().out
    assert "2 models, 0 done, 2 to do" in out and "ifeval base" in out and f"ifeval {TIER3.name}" in out
    assert "estimated" in out and "tokens/s (default, none measured yet)" in out
    assert "REFUSED" in out and f"make {sweep.LLAMA_CPP_MAKE_TARGET}" in out
    assert not (tmp_path / "logs" / "tiny" / "base").exists() and not (tmp_path / "adapters").exists()
    assert sweep.main(_args(tmp_path, "--tiers", "5", "--dry-run")) == 0  # the plan, still printed


def test_the_estimate_uses_measured_tokens_per_second_and_counts_saved_responses(tmp_path):
    out = tmp_path / "m" / "ifeval"
    out.mkdir(parents=True)
    (out / ifeval.RESPONSES_NAME).write_text('{"key": 1}\n{"key": 2}\n{"key": 3')  # 2 saved, a torn third
    target = sweep.IFEvalTarget("m", out, tmp_path / "gguf")
    assert sweep.ifeval_rates([]) == (sweep.IFEVAL_DEFAULT_TOKENS_PER_S, "default, none measured yet",
                                      sweep.IFEVAL_DEFAULT_EXPORT_S, "default")
    rate, src, export_s, _ = sweep.ifeval_rates([{"tokens_per_second": 10.0, "sweep": {"seconds": {"export": 50}}},
                                                 {"tokens_per_second": 30.0}])
    assert (rate, src, export_s) == (20.0, "measured, mean of 2 summaries", 50)
    eta = sweep.ifeval_estimate([target], {"m": "todo"}, tmp_path, max_new_tokens=8, limit=5, tokens_per_s=4.0,
                                export_s=7.0, retrain_s=1000.0)
    assert eta == (5 - 2) * 8 / 4.0 + 7.0  # the base (run None) has no adapter to retrain
    assert (out / ifeval.RESPONSES_NAME).read_text().endswith('{"key": 3')  # the estimate only reads


def _fake_result(folder: Path, strict_mean: float, keys: dict[str, bool], *, max_new: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(keys)
    summary = {"prompt_level_strict_acc": strict_mean, "inst_level_strict_acc": strict_mean,
               "prompt_level_loose_acc": strict_mean + 0.1, "inst_level_loose_acc": strict_mean + 0.1,
               "ifeval_strict_mean": strict_mean, "n_prompts": n, "complete": False, "limit": n,
               "max_new_tokens": max_new, "share_stop": 0.5, "sweep": {"tier": 5}}
    (folder / ifeval.SUMMARY_NAME).write_text(json.dumps(summary))
    (folder / ifeval.SCORES_NAME).write_text("".join(json.dumps({"key": k, "prompt_strict": v}) + "\n"
                                                     for k, v in keys.items()))


def test_the_report_gives_each_model_and_each_arms_mean_sd_and_mde(tmp_path):
    root = tmp_path / "logs"
    logdir = root / "tiny"
    assert sweep.ifeval_markdown(logdir, "tiny") == ""  # no results: no section
    _fake_result(logdir / "base" / "ifeval", 0.2, {"a": True, "b": False, "c": False})
    values = {("control", 0): 0.30, ("control", 1): 0.40, ("control", 2): 0.50,
              ("grit", 0): 0.35, ("grit", 1): 0.40, ("grit", 2): 0.60}
    for (arm, k), v in values.items():
        run = sweep.PlannedRun(3, arm, 2e-4, sweep.BASE_SEED + k, 4, "full", 2)
        _fake_result(_tier3_run(root, run) / "ifeval", v, {"a": False, "b": True, "c": k > 0})
    other = sweep.PlannedRun(3, "grit", 2e-4, sweep.BASE_SEED + 3, 4, "full", 2)
    _fake_result(_tier3_run(root, other) / "ifeval", 0.9, {"a": True}, max_new=32)  # other settings
    md = sweep.ifeval_markdown(logdir, "tiny")
    assert md.startswith("### IFEval on the deployed model (tier 5)") and "**Smoke run**" in md
    assert "| base (limited) | 0.200 |" in md
    assert f"| control/lr2e-04_seed{sweep.BASE_SEED + 1}_steps4 (limited) | 0.400 |" in md
    assert "| +2 / −1 |" in md and "| +1 / −1 |" in md  # gained b and c / lost a; gained b / lost a
    assert "| control | 3 | 0.400 ± 0.100 |" in md and "| +0.200 |" in md  # control's mean minus the base's
    from grit_study.stats import minimum_detectable_effect

    assert f"| {minimum_detectable_effect(0.1, 3).exact:.3f} |" in md
    assert "grit − control, paired by seed (3 seeds), IFEval (strict mean): +0.050 ± 0.050 (MDE " in md
    assert f"Left out of the per-arm rows" in md and f"grit/lr2e-04_seed{sweep.BASE_SEED + 3}_steps4" in md


def test_the_committed_synthetic_sweep_has_no_ifeval_section():
    assert sweep.ifeval_markdown(ROOT / "tensorboard_logs" / "sweep" / "smollm2-135m", "smollm2-135m") == ""


@pytest.mark.runtime
@pytest.mark.slow
def test_ifeval_tier_on_the_tiny_preset_base_and_a_tier3_run(tmp_path, capfd):
    """Base and a tier-3 run, exported, generated and scored (2 prompts, 4 tokens); a rerun skips both; another
    max_new_tokens is refused, nothing overwritten; a limited run is never done for the full tier."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    run_dir = _tier3_run(tmp_path / "logs")
    _saved_adapter(tmp_path / "adapters" / "tiny" / TIER3.name / "adapter")
    smoke = _args(tmp_path, "--tiers", "5", "--ifeval-limit", "2", "--ifeval-max-new-tokens", "4")
    assert sweep.main(smoke) == 0
    base_dir = tmp_path / "logs" / "tiny" / "base" / "ifeval"
    summaries = {}
    for name, folder in (("base", base_dir), (TIER3.name, run_dir / "ifeval")):
        s = json.loads((folder / ifeval.SUMMARY_NAME).read_text())
        assert s["n_prompts"] == 2 and s["limit"] == 2 and s["complete"] is False and s["max_new_tokens"] == 4
        assert s["sweep"]["model"] == name and s["sweep"]["limit"] == 2 and s["sweep"]["max_new_tokens"] == 4
        assert len((folder / ifeval.RESPONSES_NAME).read_text().splitlines()) == 2  # every response saved
        summaries[name] = s
    assert summaries[TIER3.name]["sweep"]["seconds"]["export"] >= 0
    # The same chat template in both GGUFs: base and tuned render the prompts alike.
    templates = {n: GGUFReader(s["gguf_path"]).fields["tokenizer.chat_template"].contents()
                 for n, s in summaries.items()}
    assert templates["base"] == templates[TIER3.name]
    assert summaries["base"]["gguf_sha256"] != summaries[TIER3.name]["gguf_sha256"]
    assert not (tmp_path / "adapters" / "tiny" / TIER3.name / "export" / "merged").exists()

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "logs").rglob("*") if p.is_file()}
    capfd.readouterr()
    assert sweep.main(smoke) == 0  # done: skipped
    out = capfd.readouterr().out
    assert "2 models, 2 done, 0 to do" in out and "[sweep] IFEval " not in out
    # Another max_new_tokens: refused, never overwritten (dry run: the plan and the refusal, exit 0).
    other = _args(tmp_path, "--tiers", "5", "--ifeval-limit", "2", "--ifeval-max-new-tokens", "8")
    assert sweep.main(other) == 2
    out = capfd.readouterr().out
    assert "other settings" in out and "REFUSED" in out and f"{base_dir} (4)" in out
    assert sweep.main([*other, "--dry-run"]) == 0
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "logs").rglob("*") if p.is_file()}
    assert after == before
    # A limited run never counts as done for the full tier (or for a larger limit): it resumes instead.
    targets, _ = sweep.ifeval_targets(tmp_path / "logs" / "tiny", tmp_path / "adapters" / "tiny", "tiny")
    assert [sweep.ifeval_status(t, 4, None) for t in targets] == ["todo", "todo"]
    assert [sweep.ifeval_status(t, 4, 3) for t in targets] == ["todo", "todo"]
    assert sweep.main([*_args(tmp_path, "--tiers", "5", "--ifeval-max-new-tokens", "4"), "--dry-run"]) == 0
    assert "0 done, 2 to do" in capfd.readouterr().out
    # The report: both models, marked as a smoke run.
    md = sweep.ifeval_markdown(tmp_path / "logs" / "tiny", "tiny")
    assert "| base (limited) |" in md and f"| {TIER3.name} (limited) |" in md and "**Smoke run**" in md
