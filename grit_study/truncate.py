"""Cut a trained LoRA adapter to per-module ranks k by SVD and save it as a real, smaller PEFT adapter.

    from grit_study.truncate import grit_ranks, truncate_adapter
    ks = grit_ranks(result.grit_manager)                       # GRIT's effective ranks, per module
    info = truncate_adapter(result.model, ks, "outputs/grit_full_k")  # or one global k: ranks=8
    info["parameters"], info["bytes"], info["relative_error"]

The same method for every arm (issue 12): per module, ΔW = s·B·A in float64 is cut to its best rank-k
approximation ΔW_k = U_k S_k V_kᵀ (Eckart-Young), and the folder written holds A_k = √S_k V_kᵀ (k x d_in)
and B_k = U_k √S_k (d_out x k): the singular values split symmetrically, so neither factor carries the
whole scale. The adapter's scale is folded in, not kept: the written LoraConfig gives every module
``lora_alpha = r`` (alpha_pattern k for a module of rank k, use_rslora off), so PEFT's scale is exactly 1
and PEFT computes B_k A_k = ΔW_k. ``rank_pattern``/``alpha_pattern`` name every module by its full,
regex-escaped path, so PEFT alone (``PeftModel.from_pretrained``) loads modules of different k.

GRIT's "fewer parameters" are Σ k·(d_in + d_out) with k a factor's 99%-energy rank while A and B keep
shape r x d (published code); here they are the numel of the tensors on disk, and the file's size.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

ADAPTER_FILE = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
COMBINE = ("max", "min")


def _lora_modules(model, adapter: str) -> list:
    """[(qualname, layer)] of the PEFT LoRA layers that hold ``adapter``; refuses what is not s·B·A."""
    from peft.tuners.lora import LoraLayer

    found = []
    for qualname, m in model.named_modules():
        if not isinstance(m, LoraLayer) or adapter not in m.lora_A:
            continue
        if getattr(m, "use_dora", {}).get(adapter):
            raise ValueError(f"{qualname}: DoRA's update is not s·B·A; truncate_adapter does not apply")
        if getattr(m, "lora_bias", {}).get(adapter):
            raise ValueError(f"{qualname}: a LoRA bias (lora_bias=True) is not part of s·B·A; truncate_adapter "
                             "does not carry it")
        a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{qualname}: LoRA factors of shape {tuple(a.shape)}, {tuple(b.shape)} are not linear")
        found.append((qualname, m))
    if not found:
        raise ValueError(f"truncate_adapter: no PEFT LoRA module holds adapter {adapter!r}")
    return found


def _adapter_name(model, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    active = getattr(model, "active_adapters", None)
    active = list(active() if callable(active) else active or [])
    if len(active) != 1:
        raise ValueError(f"the model has active adapters {active}; pass adapter_name to choose one")
    return active[0]


def _svd_cut(a, b, s: float, k: int):
    """(A_k, B_k, sigma) of the best rank-k approximation of s·B·A, all float64 on the CPU.

    ΔW has rank <= r, so its SVD comes from an r x r core, never from the d_out x d_in matrix: with
    B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, and the core's SVD U' S V'ᵀ gives
    U = Q_B U', V = Q_A V' exactly. Cheap at any width (a 4096 x 14336 MLP costs two thin QRs).
    """
    import torch

    q_b, r_b = torch.linalg.qr(b)          # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.T)        # (d_in, r), (r, r)
    u, sigma, vh = torch.linalg.svd(s * (r_b @ r_a.T))
    root = sigma[:k].sqrt()
    b_k = (q_b @ u[:, :k]) * root[None, :]             # U_k √S_k
    a_k = root[:, None] * (vh[:k] @ q_a.T)             # √S_k V_kᵀ
    return a_k, b_k, sigma


def _frobenius_sq(left, right) -> float:
    """‖left @ right‖_F² = ⟨leftᵀleft, right rightᵀ⟩ without forming the product."""
    return float(((left.T @ left) * (right @ right.T)).sum())


def truncate_adapter(model, ranks: dict[str, int] | int, out_dir: str | os.PathLike,
                     adapter_name: str | None = None) -> dict[str, Any]:
    """Write ``model``'s LoRA adapter cut to rank k per module as a PEFT adapter folder at ``out_dir``.

    model: a ``PeftModel`` with LoRA on Linear layers (a 4-bit base is fine: only A, B and s are read).
    ranks: one k for every module, or {module name: k} with the names of ``model.named_modules()`` (as
        ``GRITManager.lora_module_names`` and :func:`grit_ranks` give them), every LoRA module named once.
        k is clamped to min(k, r, d_in, d_out): ΔW = s·B·A has rank <= r, so k >= r keeps ΔW exactly.
    adapter_name: the adapter to cut; default the model's single active adapter.

    Returns ``{"adapter_dir", "parameters": Σ numel of the written lora_A, lora_B tensors
    (= Σ k·(d_in + d_out)), "full_parameters": the same for the source adapter (Σ r·(d_in + d_out)),
    "bytes": size of adapter_model.safetensors, "ranks": {module: k written}, "relative_error":
    {module: ‖ΔW - ΔW_k‖_F / ‖ΔW‖_F} (0 where ΔW = 0)}``. The error is computed from the tensors as
    written (their dtype included), not from the singular values: it says what the saved file loses.

    The saved scale is 1 (alpha folded into the factors, see the module docstring); the source model is
    not modified.
    """
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter = _adapter_name(model, adapter_name)
    peft_config = getattr(model, "peft_config", {}).get(adapter)
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"truncate_adapter needs a PeftModel whose adapter {adapter!r} is a LoraConfig; got "
                         f"{type(peft_config).__name__}: wrap the model with peft.get_peft_model or load it "
                         "with PeftModel.from_pretrained")
    for extra in ("modules_to_save", "trainable_token_indices"):
        if getattr(peft_config, extra, None):
            raise ValueError(f"adapter {adapter!r} also trains {extra}={getattr(peft_config, extra)!r}; "
                             "truncate_adapter writes LoRA factors only and would drop them")
    modules = _lora_modules(model, adapter)
    names = [q for q, _ in modules]
    if isinstance(ranks, bool) or not isinstance(ranks, (int, dict)):
        raise ValueError(f"ranks must be an int or {{module name: int}}, got {type(ranks).__name__}")
    wanted = {q: ranks for q in names} if isinstance(ranks, int) else dict(ranks)
    missing, unknown = sorted(set(names) - set(wanted)), sorted(set(wanted) - set(names))
    if missing or unknown:
        raise ValueError(f"ranks must name every LoRA module of adapter {adapter!r} once: missing {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}, unknown {unknown[:3]}"
                         f"{' ...' if len(unknown) > 3 else ''} (names as in model.named_modules(), e.g. "
                         f"{names[0]!r})")
    for q, k in wanted.items():
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"{q}: rank {k!r} must be an integer >= 1 (PEFT has no rank-0 module)")

    # PEFT matches patterns against the module path inside the base model, and saves tensors under the
    # PeftModel's path without the adapter name: "base_model.model.<path>.lora_A.weight".
    prefix = "base_model.model."
    tensors, written, errors, full = {}, {}, {}, 0
    rank_pattern, alpha_pattern = {}, {}
    for qualname, m in modules:
        if not qualname.startswith(prefix):
            raise ValueError(f"{qualname}: not under {prefix!r}; pass the PeftModel itself, not its base_model")
        a_src, b_src = m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach()
        dtype = a_src.dtype
        a = a_src.to("cpu", torch.float64)
        b = b_src.to("cpu", torch.float64)
        r, d_in, d_out = a.shape[0], a.shape[1], b.shape[0]
        s = float(m.scaling[adapter])
        k = int(min(int(wanted[qualname]), r, d_in, d_out))
        a_k, b_k, _ = _svd_cut(a, b, s, k)
        a_k, b_k = a_k.to(dtype).contiguous(), b_k.to(dtype).contiguous()
        # The error of what is written: ΔW - ΔW_k = [s·B, -B_k] [A; A_k].
        left = torch.cat([s * b, -b_k.to(torch.float64)], dim=1)
        right = torch.cat([a, a_k.to(torch.float64)], dim=0)
        norm_sq = s * s * _frobenius_sq(b, a)
        err_sq = max(_frobenius_sq(left, right), 0.0)
        errors[qualname] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
        key = qualname[len(prefix):]
        tensors[f"{qualname}.lora_A.weight"] = a_k
        tensors[f"{qualname}.lora_B.weight"] = b_k
        rank_pattern[re.escape(key)] = k
        alpha_pattern[re.escape(key)] = k  # alpha = r: PEFT's scale alpha/r is exactly 1
        written[qualname] = k
        full += r * (d_in + d_out)

    config = copy.deepcopy(peft_config)
    top = max(written.values())
    config.r, config.lora_alpha, config.use_rslora = top, top, False
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    config.inference_mode = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    path = out / ADAPTER_FILE
    save_file(tensors, str(path), metadata={"format": "pt"})  # what PeftModel.save_pretrained writes

    # Count what is on disk, not what was meant to be written.
    parameters = 0
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            parameters += math.prod(f.get_slice(name).get_shape())
    return {"adapter_dir": str(out), "parameters": int(parameters), "full_parameters": int(full),
            "bytes": path.stat().st_size, "ranks": written, "relative_error": errors}


def grit_ranks(manager, combine: str = "max") -> dict[str, int]:
    """{module name: k} from GRIT's effective ranks, for :func:`truncate_adapter`.

    Per module, k_A is the energy rank of the factor paired with A, F_A, and k_B that of F_B (under the
    default pairing "kfac" F_A = G, the rank-space output-gradient covariance, and F_B = U, the rank-space
    input covariance; under "reference" the other way round, grit.kfac_math): the smallest k whose
    top-k eigenvalues hold ``rank_adaptation_threshold`` of the factor's energy, at least
    ``min_lora_rank`` (``grit.kfac_math.energy_rank``), as of the last valid inversion (the last factor
    update, not the final weights). A side that never had a valid inversion keeps k = r (no cut).

    combine: ``"max"`` (default): k = max(k_A, k_B), so neither side loses energy GRIT counted as kept;
    ``"min"``: k = min(k_A, k_B), the more aggressive cut. The published count Σ k·(d_in + d_out) uses
    one k per factor; a PEFT module has one rank, so the two must be combined.
    """
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    if not manager.ready:
        raise ValueError("the GRIT manager has not inverted its factors yet (manager.ready is False): train "
                         "past the first factor update before reading effective ranks")
    pick = max if combine == "max" else min
    out = {}
    for g in manager.factor_state.groups:
        k_a, k_b = g.A.k_energy.tolist(), g.B.k_energy.tolist()
        for name, ka, kb in zip(g.names, k_a, k_b):
            out[name] = int(pick(ka, kb))
    missing = set(manager.lora_module_names) - set(out)
    if missing:
        raise ValueError(f"the factor state has no ranks for {sorted(missing)[:3]}; the manager's modules and "
                         "its factor groups disagree")
    return out
