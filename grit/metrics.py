"""The manager's scalars for logging, under ``grit/``: ``GRITManager.counters()`` and ``.metrics()``.

``counters()`` (host ints, no device read: cheap enough for every log step):
    grit/optimizer_steps (calls to step()), grit/preconditioned_steps, grit/inversions,
    grit/mask_mismatches (LoRA outputs whose shape did not match the attention mask).

``metrics()``, the only manager method that syncs with the device (one float64 device-to-host copy
per device; per-group counters summed on the host), the counters and:
    grit/ng_grad_norm (norm of the last preconditioned LoRA gradient), grit/damping (median λ over
    factors; per factor under relative damping), grit/cond_min|median|max (cond(F + λI) over all
    factors), grit/effective_rank (mean energy rank, rank_adaptation_threshold, of all factors: a
    diagnostic, shapes stay r x d), grit/inversion_time_s (last inversion), grit/skipped_modules
    (cumulative: (module, step) statistics dropped and (module, update) estimates rejected for NaN/Inf), grit/reg_kfac, grit/reg_reproj (last
    step's terms, 0 when off), grit/stat_tokens (statistics tokens seen, max over modules, pending
    included), grit/nonfinite_grads (module gradients zeroed because they were NaN/Inf),
    grit/degenerate_factors (factors still without a valid inverse, e.g. G while B = 0).
    NaN where a quantity does not exist yet (before the first inversion, or ng_grad_norm before the
    first preconditioned step). Before the factor state's first use nothing is allocated (its device
    is not known yet): the device values read 0 / NaN.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .factors import FactorState, to_host

NAN = float("nan")
FACTOR_STATISTICS = ("grit/damping", "grit/cond_min", "grit/cond_median", "grit/cond_max", "grit/effective_rank")


def _device_values(factor_state: FactorState, group_counters: list, ng_scale: Optional[torch.Tensor]) -> dict:
    """name -> host values, one per factor group that has it (one device-to-host copy per device)."""
    values: dict = {}
    if not factor_state.materialized:
        return values
    named = []
    for g, c in zip(factor_state.groups, group_counters):
        named += [("skipped", g.skipped), ("nonfinite", c.nonfinite_grads), ("tokens", g.tokens().max())]
        named += [(name, t) for name, t in (("ng_sq", c.ng_sq), ("reg_kfac", c.reg_kfac),
                                            ("reg_reproj", c.reg_reproj)) if t is not None]
        named += [(key, getattr(g, key)) for key in ("valid", "cond", "lam", "k_energy")]
    if ng_scale is not None:
        named.append(("ng_scale", ng_scale))
    for (name, _), v in zip(named, to_host([t for _, t in named])):
        values.setdefault(name, []).append(v)
    return values


def collect(counters: dict, factor_state: FactorState, group_counters: list, ng_scale: Optional[torch.Tensor],
            ready: bool, inv_time) -> dict:
    """``counters`` plus the device metrics (module docstring). ``group_counters``: the manager's
    ``grit.apply.GroupCounters`` per factor group; ``ng_scale``: the loss scale of the last preconditioned
    step (fp16) or None; ``inv_time``: seconds, a (start, end) pair of CUDA events, or None."""
    out = dict(counters)
    values = _device_values(factor_state, group_counters, ng_scale)

    def total(name):
        return sum(float(v) for v in values.get(name, []))

    ng_norm = NAN
    if "ng_sq" in values:
        # In fp32, as the device did before the norms were kept per group: one group's norm is exact.
        norm = torch.tensor(total("ng_sq"), dtype=torch.float32).sqrt()
        if "ng_scale" in values:
            norm = norm / torch.tensor(total("ng_scale"), dtype=torch.float32)
        ng_norm = float(norm)
    empty = [torch.zeros(0, dtype=torch.float64)]
    valid, cond, lam, k = (torch.cat(values.get(key, empty)) for key in ("valid", "cond", "lam", "k_energy"))
    out.update({"grit/skipped_modules": total("skipped"), "grit/nonfinite_grads": total("nonfinite"),
                "grit/stat_tokens": max((float(v) for v in values.get("tokens", [])), default=0.0),
                "grit/ng_grad_norm": ng_norm, "grit/reg_kfac": total("reg_kfac"),
                "grit/reg_reproj": total("reg_reproj")})
    valid = valid.bool()
    out["grit/degenerate_factors"] = float((~valid).sum()) if ready else NAN
    if ready and valid.any():
        # Back to the devices' dtypes (exact), so the statistics are those of the stored values.
        cond, lam, k = cond[valid].float(), lam[valid].float(), k[valid].float()
        out.update({"grit/damping": float(lam.median()), "grit/cond_min": float(cond.min()),
                    "grit/cond_median": float(cond.median()), "grit/cond_max": float(cond.max()),
                    "grit/effective_rank": float(k.mean())})
    else:
        out.update({key: NAN for key in FACTOR_STATISTICS})
    t = inv_time
    if isinstance(t, tuple):  # CUDA events: elapsed_time syncs, which is allowed here
        t[1].synchronize()
        t = t[0].elapsed_time(t[1]) / 1000.0
    out["grit/inversion_time_s"] = float(t) if t is not None else NAN
    return out


def timed(fn: Callable[[], None], device: torch.device):
    """Run ``fn()``; returns its duration for ``collect``'s ``inv_time``: seconds, or on a GPU a (start, end)
    pair of recorded CUDA events (read, with a sync, only by ``collect``)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
