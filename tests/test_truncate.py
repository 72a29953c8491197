"""truncate_adapter / grit_ranks (issue 12 §1): a truncated adapter is a real PEFT adapter whose ΔW is the
float64 SVD cut of the full one, checked against numpy's SVD of the dense ΔW (never the code's own QR path)."""

import copy
import json

import numpy as np
import pytest
import torch

from grit_fixtures import batch, tiny_lora_model

R, ALPHA = 4, 12  # s = 3: a dropped or doubled scale moves ΔW by x3


def delta_w(model, adapter="default") -> dict:
    """{module qualname: s·B·A} as float64 numpy, from the modules PEFT built."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            a = m.lora_A[adapter].weight.detach().double().numpy()
            b = m.lora_B[adapter].weight.detach().double().numpy()
            out[name] = float(m.scaling[adapter]) * (b @ a)
    return out


def numpy_cut(dw: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def reload(source, out_dir):
    """The truncated adapter loaded by plain PEFT on a fresh copy of the source's base (LoRA layers removed,
    nothing merged)."""
    from peft import PeftModel

    base = copy.deepcopy(source).unload()
    return PeftModel.from_pretrained(base, str(out_dir))


def reloaded_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n)


def check_against_numpy(source, loaded, ks: dict):
    full, cut = delta_w(source), delta_w(loaded)
    assert set(cut) == set(full) == set(ks)
    for name, dw in full.items():
        want = numpy_cut(dw, ks[name])
        got = cut[name]
        assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want), name


def test_truncated_adapter_reloads_with_peft_as_the_numpy_svd_cut(tmp_path):
    from grit_study.truncate import truncate_adapter

    model = tiny_lora_model(seed=0, r=R, alpha=ALPHA)
    info = truncate_adapter(model, 2, tmp_path / "k2")
    loaded = reload(model, tmp_path / "k2")
    names = list(delta_w(model))
    check_against_numpy(model, loaded, {n: 2 for n in names})
    # Parameters from the reloaded tensors: Σ k·(d_in + d_out), and what the function reported.
    shapes = {n: m for n, m in model.named_modules() if n in names}
    expect = sum(2 * (m.in_features + m.out_features) for m in shapes.values())
    assert reloaded_params(loaded) == info["parameters"] == expect
    assert info["full_parameters"] == sum(R * (m.in_features + m.out_features) for m in shapes.values())
    assert info["bytes"] == (tmp_path / "k2" / "adapter_model.safetensors").stat().st_size > 0
    # The relative error is the numpy cut's.
    for n, dw in delta_w(model).items():
        want = np.linalg.norm(dw - numpy_cut(dw, 2)) / np.linalg.norm(dw)
        assert info["relative_error"][n] == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert want > 1e-3  # a real cut: B random, ΔW of full rank r


def test_per_module_ranks_via_rank_pattern(tmp_path):
    from grit_study.truncate import truncate_adapter

    model = tiny_lora_model(seed=1, r=R, alpha=ALPHA)
    names = sorted(delta_w(model))
    ks = {n: 1 + i % R for i, n in enumerate(names)}  # 1, 2, 3, 4, 1, ...: every k differs from its neighbour
    assert len(set(ks.values())) == R
    info = truncate_adapter(model, ks, tmp_path / "mixed")
    assert info["ranks"] == ks
    loaded = reload(model, tmp_path / "mixed")
    for n, m in loaded.named_modules():
        if n in ks:
            assert m.lora_A["default"].weight.shape[0] == m.lora_B["default"].weight.shape[1] == ks[n], n
    check_against_numpy(model, loaded, ks)
    expect = sum(ks[n] * (m.in_features + m.out_features) for n, m in model.named_modules() if n in ks)
    assert reloaded_params(loaded) == info["parameters"] == expect
    cfg = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert sorted(cfg["rank_pattern"].values()) == sorted(ks.values())


def test_rank_at_least_r_keeps_delta_w(tmp_path):
    from grit_study.truncate import truncate_adapter

    model = tiny_lora_model(seed=2, r=R, alpha=ALPHA)
    info = truncate_adapter(model, R + 3, tmp_path / "full")
    assert set(info["ranks"].values()) == {R}  # clamped to r: ΔW has rank <= r
    loaded = reload(model, tmp_path / "full")
    full, back = delta_w(model), delta_w(loaded)
    for n, dw in full.items():
        assert np.linalg.norm(back[n] - dw) <= 1e-6 * np.linalg.norm(dw), n
        assert info["relative_error"][n] < 1e-6
    # The same outputs as the source adapter, end to end.
    inputs = batch(0)
    with torch.no_grad():
        want = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        got = loaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ranks_must_name_every_module(tmp_path):
    from grit_study.truncate import truncate_adapter

    model = tiny_lora_model(seed=0, r=R, alpha=ALPHA)
    names = sorted(delta_w(model))
    with pytest.raises(ValueError, match="missing"):
        truncate_adapter(model, {n: 2 for n in names[1:]}, tmp_path / "x")
    with pytest.raises(ValueError, match=">= 1"):
        truncate_adapter(model, 0, tmp_path / "x")


def energy_rank_numpy(F: np.ndarray, threshold: float, min_rank: int) -> int:
    w = np.clip(np.linalg.eigvalsh(F), 0, None)[::-1]
    frac = np.cumsum(w) / w.sum()
    k = int(np.sum(frac < threshold)) + 1
    return int(min(max(k, min(min_rank, len(w))), len(w)))


@pytest.mark.parametrize("combine", ["max", "min"])
def test_grit_ranks_combine_the_factor_energy_ranks(combine):
    from grit import GRITConfig, GRITManager
    from grit_study.truncate import grit_ranks

    r, threshold = 8, 0.9
    model = tiny_lora_model(seed=3, r=r, alpha=ALPHA)
    manager = GRITManager(model, GRITConfig(kfac_update_freq=1, kfac_min_samples=1, lambda_kfac=0.0,
                                            lambda_reproj=0.0, precondition=False, min_lora_rank=1,
                                            rank_adaptation_threshold=threshold))
    with pytest.raises(ValueError, match="not inverted"):
        grit_ranks(manager)
    model(**batch(1, bsz=3, seq=12, pad_lengths=(0, 2, 5))).loss.backward()
    manager.step()
    assert manager.ready
    ks = grit_ranks(manager, combine=combine)
    pick = max if combine == "max" else min
    factors = manager.factors()
    assert set(ks) == set(manager.lora_module_names) == set(factors)
    sides = []
    for name, f in factors.items():
        k_a = energy_rank_numpy(f["F_A"].double().numpy(), threshold, 1)
        k_b = energy_rank_numpy(f["F_B"].double().numpy(), threshold, 1)
        sides.append((k_a, k_b))
        assert ks[name] == pick(k_a, k_b), name
    assert any(a != b for a, b in sides)  # the combination is exercised
    manager.close()


def test_grit_full_is_grit_plus_reprojection_at_the_preset_frequency():
    from grit_study.arms import grit_config
    from grit_study.presets import PRESETS
    from grit_study.registry import get_arm

    # The published 50 of 200 steps, scaled to each preset's run length; the grit arm's config is untouched
    # (GRITConfig's default), so adding grit_full changed no other arm's recorded definition.
    expected = {"tiny": 1, "smollm2-135m": 15, "alpaca-smollm2": 15, "llama3-8b": 50}
    for name, preset in PRESETS.items():  # the presets as defined, without the environment's overrides
        full, grit = grit_config(preset, get_arm("grit_full")).to_dict(), grit_config(preset, get_arm("grit")).to_dict()
        assert full["enable_reprojection"] and full["enable_rank_adaptation"]
        assert full["reprojection_freq"] == expected[name] and grit["reprojection_freq"] == 50
        assert {k: v for k, v in full.items() if k not in ("enable_reprojection", "reprojection_freq")} == \
            {k: v for k, v in grit.items() if k not in ("enable_reprojection", "reprojection_freq")}
    assert get_arm("grit_full").group == "claims"
