"""A run stopped at a checkpoint and resumed from it (RESUME_FROM_CHECKPOINT) is the run that was never
stopped: same batches, losses, GRIT schedule, and one summary in one run directory."""

from __future__ import annotations


import pytest
from transformers import TrainerCallback

from grit_study import arms

pytestmark = pytest.mark.slow


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_resumed_grit_run_equals_the_uninterrupted_one(tmp_path):
    preset = arms.study_preset("tiny", save_steps=2)
    whole = arms.run_hf(preset, "grit", logdir=str(tmp_path / "a"), output_dir=str(tmp_path / "a_out"))
    expected = whole.summary

    cut = arms.run_hf(preset, "grit", logdir=str(tmp_path / "b"), output_dir=str(tmp_path / "b_out"), train=False)
    cut.trainer.add_callback(_StopAt(2))
    cut.trainer.train()
    checkpoint = tmp_path / "b_out" / cut.run_dir.name / "checkpoint-2"
    assert (checkpoint / "grit_recorder.json").is_file() and (checkpoint / "grit_state.pt").is_file()
    assert len(cut.summary["batch_hashes"]) == 2

    resumed = arms.run_hf(preset, "grit", logdir=str(tmp_path / "b"), output_dir=str(tmp_path / "b_out"),
                          resume_from_checkpoint=str(checkpoint))
    got = resumed.summary
    assert resumed.run_dir == cut.run_dir and sorted(p.name for p in (tmp_path / "b").iterdir()) == [cut.run_dir.name]
    assert got["steps"] == expected["steps"] == preset.max_steps
    assert got["batch_hashes"] == expected["batch_hashes"]
    assert got["train_loss_per_step"] == pytest.approx(expected["train_loss_per_step"], rel=1e-6)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert got["preconditioned_steps"] == expected["preconditioned_steps"] == preset.max_steps - 1
    assert got["response_tokens_seen"] == expected["response_tokens_seen"]
    assert got["resumed_from"] == [str(checkpoint)]


def test_a_checkpoint_without_the_recorder_state_is_refused(tmp_path):
    from grit_study.runs import RunRecorder

    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileNotFoundError, match="grit_recorder.json"):
        RunRecorder.saved_run_dir(tmp_path / "checkpoint-2")
