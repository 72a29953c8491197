"""compare.py on run directories written here with TensorBoard's SummaryWriter and known values."""

from __future__ import annotations

import json
import struct

import pytest


def _write_run(logdir, name, *, arm, train_fp="t1", val_fp="v1", losses=(2.0, 1.5, 1.0), hashes=None,
               loss_on_padding=False, departs_from=None, stack="hf+peft", lr=2e-4, seed=3407, max_steps=None,
               final=None):
    from torch.utils.tensorboard import SummaryWriter

    run = logdir / name
    w = SummaryWriter(str(run))
    for step, loss in enumerate(losses, 1):
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/grad_norm", 1.0 / step, step)
        w.add_scalar("train/learning_rate", 1e-4, step)
        w.add_scalar("train/step_time_s", 0.5, step)
        w.add_scalar("train/peak_memory_mb", 100.0 + step, step)
    for step in (0, len(losses)):
        w.add_scalar("eval/loss", 3.0 - step * 0.5, step)
    w.close()
    summary = {
        "arm": arm, "stack": stack, "preset": "tiny", "model_id": "builtin:tiny", "data_source": "synthetic",
        "optimizer": "adamw_torch_fused", "train_fingerprint": train_fp, "val_fingerprint": val_fp,
        "steps": len(losses), "preconditioned_steps": 2 if arm == "grit" else 0, "final_train_loss": losses[-1],
        "eval_loss": {"0": 3.0, str(len(losses)): 3.0 - len(losses) * 0.5}, "median_s_per_step": 0.5,
        "mean_s_per_step": 0.5, "tokens_per_s": 1000.0, "peak_memory_mb": 103.0, "exact_match": 0.25,
        "base_exact_match": 0.0, "batch_hashes": hashes or ["a", "b", "c"][:len(losses)],
        "loss_on_padding": loss_on_padding, "departs_from": departs_from,
        "preset_fields": {"max_seq_length": 96, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                          "learning_rate": lr, "seed": seed, "max_steps": max_steps or len(losses)},
        "hardware": {"cpu_count": 2, "machine": "x86_64"}, "package_versions": {"torch": "2.13.0"},
    }
    summary.update(final or {})
    (run / "run_summary.json").write_text(json.dumps(summary))
    return run


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_scalars_round_trip_through_the_event_accumulator(tmp_path):
    from grit_study.compare import load_runs

    _write_run(tmp_path, "control_20260101-000000", arm="control", losses=(2.5, 1.25, 0.625))
    (run,) = load_runs(tmp_path)
    steps, _, values = run.series("train/loss")
    assert steps == [1, 2, 3] and values == [2.5, 1.25, 0.625]
    assert run.series("eval/loss")[0] == [0, 3]
    assert set(run.scalars) >= {"train/loss", "eval/loss", "train/grad_norm", "train/learning_rate",
                                "train/step_time_s", "train/peak_memory_mb"}


def test_refuses_runs_with_different_fingerprints(tmp_path):
    from grit_study.compare import FingerprintMismatch, check_fingerprints, load_runs, write_results

    _write_run(tmp_path, "control_20260101-000000", arm="control")
    _write_run(tmp_path, "grit_20260101-000000", arm="grit", val_fp="v2")
    runs = load_runs(tmp_path)
    with pytest.raises(FingerprintMismatch, match="REFUSING.*v1.*v2"):
        check_fingerprints(runs)
    with pytest.raises(FingerprintMismatch):
        write_results(runs, tmp_path / "results.md")
    assert not (tmp_path / "results.md").exists()


def test_refuses_fair_runs_with_different_batches_but_not_the_padding_artifact(tmp_path):
    from grit_study.compare import FingerprintMismatch, batch_hash_agreement, check_batch_hashes, load_runs

    _write_run(tmp_path, "baseline_20260101-000000", arm="baseline", stack="unsloth+trl")
    _write_run(tmp_path, "control_20260101-000000", arm="control")
    _write_run(tmp_path, "padding_artifact_20260101-000000", arm="padding_artifact", hashes=["x", "y", "z"],
               loss_on_padding=True, departs_from="grit")
    runs = load_runs(tmp_path)
    check_batch_hashes(runs)
    agreement = batch_hash_agreement(runs)
    assert agreement["control_20260101-000000"] == {"reference": "baseline_20260101-000000", "compared": 3, "equal": 3}
    assert agreement["padding_artifact_20260101-000000"]["equal"] == 0
    _write_run(tmp_path, "grit_20260101-000000", arm="grit", hashes=["a", "B", "c"])
    with pytest.raises(FingerprintMismatch, match="grit.*1 of 3"):
        check_batch_hashes(load_runs(tmp_path))


def test_runs_are_keyed_by_arm_rate_seed_and_steps_and_the_newest_of_a_key_wins(tmp_path):
    from grit_study.compare import load_runs

    _write_run(tmp_path, "grit_20260101-000000", arm="grit", losses=(9.0, 8.0))
    _write_run(tmp_path, "grit_20260102-000000", arm="grit", losses=(1.0, 0.5))       # same key, newer
    _write_run(tmp_path, "grit_20260103-000000", arm="grit", losses=(1.0, 0.7), lr=8e-4)  # another rate
    _write_run(tmp_path, "control_20260101-000000", arm="control", losses=(1.0, 0.6))
    runs = load_runs(tmp_path)
    assert [(r.arm, r.key[1]) for r in runs] == [("control", 2e-4), ("grit", 2e-4), ("grit", 8e-4)]
    assert runs[1].summary["final_train_loss"] == 0.5
    assert len(load_runs(tmp_path, latest_per_key=False)) == 4
    assert [r.arm for r in load_runs(tmp_path, learning_rate=8e-4)] == ["grit"]
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        load_runs(tmp_path, preset="llama3-8b")


def test_batch_hashes_are_compared_within_each_seed_and_length(tmp_path):
    from grit_study.compare import FingerprintMismatch, batch_hash_agreement, check_batch_hashes, load_runs

    _write_run(tmp_path, "control_a", arm="control", hashes=["a", "b", "c"])
    _write_run(tmp_path, "grit_a", arm="grit", hashes=["a", "b", "c"], lr=8e-4)
    _write_run(tmp_path, "control_b", arm="control", hashes=["x", "y", "z"], seed=1)  # another order, by design
    _write_run(tmp_path, "grit_b", arm="grit", hashes=["x", "y", "z"], seed=1)
    runs = load_runs(tmp_path, recursive=True)
    check_batch_hashes(runs)
    agreement = batch_hash_agreement(runs)
    assert agreement["grit_b"] == {"reference": "control_b", "compared": 3, "equal": 3}
    assert agreement["grit_a"]["reference"] == "control_a"
    _write_run(tmp_path, "riemannian_b", arm="riemannian", hashes=["x", "Y", "z"], seed=1)
    with pytest.raises(FingerprintMismatch, match="riemannian_b.*1 of 3"):
        check_batch_hashes(load_runs(tmp_path))


def test_plots_and_table(tmp_path):
    from grit_study.compare import load_runs, plot_all, write_results

    logs = tmp_path / "logs"
    _write_run(logs, "control_20260101-000000", arm="control")
    _write_run(logs, "grit_20260101-000000", arm="grit", losses=(2.0, 1.0, 0.5),
               final={"test_loss": 0.9, "retention_kl": 0.25, "drift": 12.34})
    runs = load_runs(logs)
    out = tmp_path / "readme_files"
    paths = plot_all(runs, out)
    assert {p.name for p in paths} == {"train_loss.png", "eval_loss.png", "grad_norm.png", "learning_rate.png",
                                       "step_time.png", "peak_memory.png"}
    width_single, _ = _png_size(out / "train_loss.png")
    table = write_results(runs, out / "results.md").read_text()
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    grit_row = dict(zip(header, (c.strip() for c in next(l for l in lines if l.startswith("| grit")).strip("|").split("|"))))
    assert grit_row["final train loss"] == "0.5000" and grit_row["preconditioned"] == "2"
    assert grit_row["final eval loss"] == "1.5000" and grit_row["exact match"] == "0.250"
    # The final evaluation's figures sit beside the eval curve's; a run without them shows a dash.
    assert (grit_row["test loss"], grit_row["retention KL"], grit_row["drift"]) == ("0.9000", "0.2500", "12.3")
    control_row = next(l for l in lines if l.startswith("| control"))
    assert dict(zip(header, (c.strip() for c in control_row.strip("|").split("|"))))["test loss"] == "–"
    assert "train t1, val v1" in table and "2-core CPU" in table
    assert "test loss and exact match on test;" in table
    # A preset without a test split evaluates on val, and the table must say so (llama3-8b on Alpaca).
    _write_run(logs, "control_20260101-000001", arm="control", final={"test_loss": 1.1, "final_split": "val"})
    assert "test loss and exact match on test for grit; val for control;" in \
        write_results(load_runs(logs), out / "results.md").read_text()

    # A LOSS_ON_PADDING run gets its own panel next to the arm it departs from, on every figure.
    _write_run(logs, "padding_artifact_20260101-000000", arm="padding_artifact", losses=(0.2, 0.1, 0.05),
               loss_on_padding=True, departs_from="grit", hashes=["p", "q", "r"])
    runs = load_runs(logs)
    plot_all(runs, out)
    width_double, _ = _png_size(out / "train_loss.png")
    assert width_double > 1.8 * width_single
    assert "not comparable" in write_results(runs, out / "results.md").read_text()
