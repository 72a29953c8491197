"""`make study` (grit_study.main) on the CPU default: the alpaca-smollm2 preset at the job's shorter length,
which its data admits and within which GRIT preconditions; notebooks are not executed here."""

import os

import pytest

from grit_study import main, presets
from grit_study.presets import resolve_preset


@pytest.fixture
def study_env(monkeypatch, tmp_path):
    """The job run on a machine without CUDA, with a throwaway environment and no notebook executed."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("GRIT_")})
    monkeypatch.setattr(presets, "cuda_available", lambda: False)
    calls = []
    monkeypatch.setattr(main, "execute", lambda notebook, name, params, folder: calls.append((name, params)) or 0.0)
    monkeypatch.setattr(main, "include_results", lambda *args, **kwargs: None)
    argv = ["study", "--logdir", str(tmp_path / "logs"), "--notebook-dir", str(tmp_path / "nb"),
            "--figures", str(tmp_path / "fig")]
    return argv, calls


def test_study_runs_the_cpu_default_at_its_own_length(study_env):
    from grit import GRITConfig
    from grit.schedule import expected_preconditioned_steps

    argv, calls = study_env
    assert main.main(argv) == 0
    p = resolve_preset()  # what every notebook's kernel resolves: the environment main set
    assert p.name == "alpaca-smollm2" and (p.max_steps, p.kfac_update_freq) == (16, 4)
    assert calls[-1][1]["PRESET"] == "alpaca-smollm2" and [c[0] for c in calls[:3]] == ["01_baseline", "02_grit",
                                                                                           "02_control"]
    # GRIT preconditions 13 of the 16 steps (its first inversion at step 4; every step has statistics tokens).
    assert expected_preconditioned_steps(GRITConfig(kfac_update_freq=p.kfac_update_freq), p.max_steps, 1000) == 13
    # 16 x 8 sequences from the 694 training rows: well inside the run-length check (arms.study_data).
    assert p.max_steps * p.per_device_train_batch_size * p.gradient_accumulation_steps / 694 < 1


def test_a_users_own_settings_win(study_env):
    argv, _ = study_env
    os.environ["GRIT_MAX_STEPS"] = "30"
    main.main(argv)
    assert resolve_preset().max_steps == 30 and resolve_preset().kfac_update_freq == 4
    os.environ.pop("GRIT_MAX_STEPS")
    os.environ.pop("GRIT_KFAC_UPDATE_FREQ")
    os.environ["GRIT_PRESET"] = "smollm2-135m"  # the synthetic study by name: its own fields
    main.main(argv)
    assert (resolve_preset().max_steps, resolve_preset().kfac_update_freq) == (60, 10)
