"""GRITManager: when to update, invert and apply the rank-space K-FAC preconditioner.

Contract (what the trainer glue and the notebooks rely on; the math is in ``grit.math``)::

    manager = GRITManager(model, GRITConfig(...))  # finds every PEFT LoRA Linear layer (plain or bnb 4-bit base,
                                                   # adapter cfg.adapter_name or the active one) and hooks it now;
                                                   # a forward pre-hook on `model` reads attention_mask (padding
                                                   # never enters the statistics)
    loss.backward()                                # one or more micro-batches
    manager.step() -> bool                         # after the last backward, before optimizer.step():
                                                   # adds regularizer gradients, updates/inverts factors when due,
                                                   # preconditions lora_A/lora_B grads; True iff it preconditioned
    optimizer.step()

    manager.optimizer_steps        int, calls to step()
    manager.preconditioned_steps   int, steps whose gradients were preconditioned (no device sync to read)
    manager.metrics()              {"grit/...": float}, the only method that syncs with the device:
        grit/preconditioned_steps, grit/ng_grad_norm (norm of the last preconditioned LoRA gradient),
        grit/damping (median λ over factors; per-factor under relative damping), grit/cond_min|median|max (cond(F + λI) over all factors),
        grit/effective_rank (mean energy rank, rank_adaptation_threshold, of all factors: a diagnostic,
        shapes stay r x d), grit/inversion_time_s (last inversion), grit/skipped_modules (cumulative
        (module, update) pairs rejected for NaN/Inf), grit/reg_kfac, grit/reg_reproj (last step's terms,
        0 when off), grit/stat_tokens (statistics tokens seen, max over modules, pending included);
        extensions: grit/optimizer_steps, grit/inversions, grit/nonfinite_grads (module gradients zeroed
        because they were NaN/Inf), grit/degenerate_factors (factors still without a valid inverse, e.g. G
        while B = 0), grit/mask_mismatches. NaN where a quantity does not exist yet (before the first
        inversion, or ng_grad_norm before the first preconditioned step).
    manager.state_dict() / load_state_dict(sd)     everything it owns: pending sums, factors, inverses,
                                                   projectors, counters (a plain dict of tensors and ints)
    manager.lora_modules           list of the discovered PEFT LoRA layers (224 on Llama-3-8B, 7 targets)
    manager.close()                removes the hooks
    manager.attach_grad_scaler(scaler)  fp16: the .grad that step() sees is scaled by scaler's loss scale (a
                                   torch.amp.GradScaler, not yet unscaled); statistics, regularizer gradients
                                   and metrics are corrected for it, and non-finite gradients are left for the
                                   scaler to detect (it skips the step and lowers the scale) instead of zeroed
    extensions: manager.inversions (int), manager.ready (bool, a first inversion happened),
    manager.lora_module_names, manager.adapter_name, manager.factors() (CPU copies per module, for tests
    and inspection), manager.capturing (settable bool: pause statistics capture)

``step()`` changes ``.grad`` only, except with ``enable_reprojection`` (then it also projects
the LoRA weights in place every ``reprojection_freq`` steps). With ``precondition=False``, both
lambdas 0 and reprojection off it changes nothing, so training is bit-identical to no manager;
statistics are still captured and factors inverted (``grit/stat_tokens > 0`` proves the hooks ran).
When it preconditions, a module gradient that is NaN/Inf (a corrupted batch) is zeroed and counted,
so no parameter receives NaN through GRIT.

Schedule (steps n = 1, 2, ...): factors update at n % kfac_update_freq == 0; the first inversion
at the first such step with >= kfac_min_samples global statistics tokens; preconditioning at
n > ng_warmup_steps once inverted (``grit.config.expected_preconditioned_steps``). The
regularizers act from the first inversion on (they need factors), warm-up or not.
Host syncs: none in the hooks or step(), except one scalar read at update steps before the first
inversion (the kfac_min_samples check).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from . import math as gm
from .config import GRITConfig
from .distributed import maybe_all_reduce, world_size
from .hooks import StatCapture, find_lora_layers
from .regularizers import regularize_A, regularize_B, reproject_A, reproject_B


@dataclass
class _Module:
    name: str
    layer: nn.Module          # the PEFT LoRA layer
    lora_A: nn.Linear         # (r, d_in) weight
    lora_B: nn.Linear         # (d_out, r) weight
    adapter: str
    group: "_FactorGroup" = None
    index: int = 0            # position in its factor group


class _FactorGroup:
    """All modules with the same rank r on one device; their statistics stacked as (n, r, r)."""

    def __init__(self, modules: list, device: torch.device, r: int):
        n = len(modules)
        self.modules, self.device, self.r, self.n = modules, device, r, n
        z = dict(device=device, dtype=torch.float32)
        eye = torch.eye(r, **z).expand(2 * n, r, r).contiguous()
        # Sums since the last update over kept positions (grit.hooks adds to them): Σuuᵀ, Σĝĝᵀ, token count.
        self.pend_U = torch.zeros(n, r, r, **z)
        self.pend_G = torch.zeros(n, r, r, **z)
        self.pend_C = torch.zeros(n, **z)
        self.U = torch.zeros(n, r, r, **z)          # current factor estimates (means)
        self.G = torch.zeros(n, r, r, **z)
        self.C = torch.zeros(n, device=device, dtype=torch.float64)  # tokens folded in so far
        self.has_stats = torch.zeros(n, device=device, dtype=torch.bool)
        # Rows 0..n-1: the A side (F_A), rows n..2n-1: the B side (F_B).
        self.F = torch.zeros(2 * n, r, r, **z)      # last valid factors (regularizers use them)
        self.inv = eye.clone()                      # last valid (F + λI)^-1; identity until one exists
        self.P = eye.clone()                        # projectors on the top-k eigenvectors
        self.valid = torch.zeros(2 * n, device=device, dtype=torch.bool)
        self.lam = torch.zeros(2 * n, **z)
        self.cond = torch.ones(2 * n, **z)
        self.k_energy = torch.full((2 * n,), r, device=device, dtype=torch.long)

    def pending(self) -> list:
        return [self.pend_U, self.pend_G, self.pend_C]

    def scale2(self) -> torch.Tensor:
        s = [float(m.layer.scaling[m.adapter]) for m in self.modules]
        return torch.tensor(s, dtype=torch.float32).to(self.device, non_blocking=True) ** 2

    STATE = ("pend_U", "pend_G", "pend_C", "U", "G", "C", "has_stats", "F", "inv", "P", "valid", "lam", "cond",
             "k_energy")


class _ParamGroup:
    """Same-shaped lora_A (or lora_B) weights of one factor group: grads stacked for one bmm."""

    def __init__(self, side: str, fgroup: _FactorGroup, modules: list):
        self.side, self.fgroup = side, fgroup
        self.params = [m.lora_A.weight if side == "A" else m.lora_B.weight for m in modules]
        offset = 0 if side == "A" else fgroup.n
        self.rows = [offset + m.index for m in modules]
        self.index = torch.tensor(self.rows, device=fgroup.device)


class GRITManager:
    """Rank-space K-FAC natural gradient for the LoRA layers of a PEFT model (contract: module docstring)."""

    def __init__(self, model: nn.Module, config: GRITConfig | None = None):
        self.config = cfg = config if config is not None else GRITConfig()
        found, adapter = find_lora_layers(model, cfg.adapter_name)
        self.adapter_name = adapter
        self._modules = [_Module(name, layer, layer.lora_A[adapter], layer.lora_B[adapter], adapter)
                         for name, layer in found]
        for m in self._modules:
            r = m.lora_A.out_features
            if cfg.lora_rank is not None and r != cfg.lora_rank:
                raise ValueError(f"GRITConfig.lora_rank={cfg.lora_rank} but {m.name} has rank {r}; set lora_rank "
                                 "to the model's rank or None")
        keyed: dict = {}
        for m in self._modules:
            keyed.setdefault((m.lora_A.weight.device, m.lora_A.out_features), []).append(m)
        self._groups = [_FactorGroup(ms, dev, r) for (dev, r), ms in keyed.items()]
        self._param_groups = []
        for g in self._groups:
            for i, m in enumerate(g.modules):
                m.group, m.index = g, i
            for side in ("A", "B"):
                by_shape: dict = {}
                for m in g.modules:
                    w = m.lora_A.weight if side == "A" else m.lora_B.weight
                    by_shape.setdefault((tuple(w.shape), w.dtype, w.device), []).append(m)
                self._param_groups += [_ParamGroup(side, g, ms) for ms in by_shape.values()]
        targets = [(m.group.pend_U, m.group.pend_G, m.group.pend_C, m.index) for m in self._modules]
        self._capture = StatCapture(model, [m.lora_A for m in self._modules], targets)

        self.optimizer_steps = 0
        self.preconditioned_steps = 0
        self.inversions = 0
        self.ready = False                      # a first inversion happened
        dev = self._groups[0].device
        self._skipped = torch.zeros((), dtype=torch.long, device=dev)   # rejected (module, update) pairs
        self._nonfinite_grads = torch.zeros((), dtype=torch.long, device=dev)  # zeroed (module, step) grads
        self._ng_norm = None
        self._reg = {"kfac": None, "reproj": None}
        self._inv_time = None
        self._scaler = None

    # ----------------------------------------------------------------- public
    @property
    def lora_modules(self) -> list:
        return [m.layer for m in self._modules]

    @property
    def lora_module_names(self) -> list:
        return [m.name for m in self._modules]

    @torch.no_grad()
    def step(self) -> bool:
        cfg = self.config
        self._capture.flush()
        self.optimizer_steps += 1
        n = self.optimizer_steps
        if n % cfg.kfac_update_freq == 0:
            self._update_factors()
        precondition = cfg.precondition and self.ready and n > cfg.ng_warmup_steps
        regularize = self.ready and cfg.regularized
        if precondition or regularize:
            self._apply_to_grads(precondition, regularize)
        if cfg.enable_reprojection and self.ready and n % cfg.reprojection_freq == 0:
            self._reproject()
        if precondition:
            self.preconditioned_steps += 1
        return precondition

    def metrics(self) -> dict:
        """Scalars for logging under ``grit/``; NaN where a quantity does not exist yet (before the first inversion)."""
        nan = float("nan")
        self._capture.flush()
        out = {"grit/optimizer_steps": float(self.optimizer_steps),
               "grit/preconditioned_steps": float(self.preconditioned_steps),
               "grit/inversions": float(self.inversions),
               "grit/skipped_modules": float(self._skipped.item()),
               "grit/nonfinite_grads": float(self._nonfinite_grads.item()),
               "grit/stat_tokens": float(max(float((g.C + g.pend_C.double()).max()) for g in self._groups)),
               "grit/mask_mismatches": float(self._capture.masks.mismatches)}
        out["grit/ng_grad_norm"] = float(self._ng_norm) if self._ng_norm is not None else nan
        for key in ("kfac", "reproj"):
            out[f"grit/reg_{key}"] = float(self._reg[key]) if self._reg[key] is not None else 0.0
        valid = torch.cat([g.valid.cpu() for g in self._groups])
        out["grit/degenerate_factors"] = float((~valid).sum()) if self.ready else nan
        if self.ready and valid.any():
            cond = torch.cat([g.cond.cpu() for g in self._groups])[valid]
            lam = torch.cat([g.lam.cpu() for g in self._groups])[valid]
            k = torch.cat([g.k_energy.cpu() for g in self._groups])[valid].float()
            out.update({"grit/damping": float(lam.median()), "grit/cond_min": float(cond.min()),
                        "grit/cond_median": float(cond.median()), "grit/cond_max": float(cond.max()),
                        "grit/effective_rank": float(k.mean())})
        else:
            out.update({k: nan for k in ("grit/damping", "grit/cond_min", "grit/cond_median", "grit/cond_max",
                                         "grit/effective_rank")})
        t = self._inv_time
        if isinstance(t, tuple):  # CUDA events: elapsed_time syncs, which is allowed here
            t[1].synchronize()
            t = t[0].elapsed_time(t[1]) / 1000.0
        out["grit/inversion_time_s"] = float(t) if t is not None else nan
        return out

    def factors(self) -> dict:
        """{module name: {"U", "G", "F_A", "F_B", "inv_A", "inv_B", "P_A", "P_B" (r, r), "tokens"}} on the CPU.

        U and G are the current statistics (``grit.math``); F_*, inv_*, P_* those of the last inversion
        (zeros / identity where none was valid yet). Syncs with the device: for tests and inspection.
        """
        out = {}
        for m in self._modules:
            g, i, n = m.group, m.index, m.group.n
            rows = {"U": g.U[i], "G": g.G[i], "F_A": g.F[i], "F_B": g.F[n + i], "inv_A": g.inv[i],
                    "inv_B": g.inv[n + i], "P_A": g.P[i], "P_B": g.P[n + i]}
            out[m.name] = {k: v.detach().cpu().clone() for k, v in rows.items()}  # copies, never live views
            out[m.name]["tokens"] = float(g.C[i])
        return out

    def state_dict(self) -> dict:
        self._capture.flush()
        return {"version": 2, "config": self.config.to_dict(), "adapter_name": self.adapter_name,
                "optimizer_steps": self.optimizer_steps, "preconditioned_steps": self.preconditioned_steps,
                "inversions": self.inversions, "ready": self.ready, "skipped": self._skipped.clone(),
                "nonfinite_grads": self._nonfinite_grads.clone(),
                "groups": [{"modules": [m.name for m in g.modules],
                            **{k: getattr(g, k).clone() for k in _FactorGroup.STATE}} for g in self._groups]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != 2:
            raise ValueError(f"unknown GRITManager state version {sd.get('version')!r} (this grit writes and "
                             "reads version 2)")
        self._capture.drop()  # statistics queued before the load belong to the state being replaced
        by_name = {tuple(gs["modules"]): gs for gs in sd["groups"]}
        for g in self._groups:
            names = tuple(m.name for m in g.modules)
            if names not in by_name:
                raise ValueError("the saved GRIT state was taken on other LoRA modules (first ones here: "
                                 f"{list(names[:3])}); load it into a manager built on the same model")
            for k in _FactorGroup.STATE:
                getattr(g, k).copy_(by_name[names][k])  # in place: the hooks hold the pending tensors
        self.optimizer_steps = int(sd["optimizer_steps"])
        self.preconditioned_steps = int(sd["preconditioned_steps"])
        self.inversions = int(sd["inversions"])
        self.ready = bool(sd["ready"])
        self._skipped.copy_(sd["skipped"])
        self._nonfinite_grads.copy_(sd["nonfinite_grads"])

    def close(self) -> None:
        self._capture.remove()

    def attach_grad_scaler(self, scaler) -> None:
        """Train with fp16 loss scaling: ``scaler`` (a ``torch.amp.GradScaler``, or None to detach) scales the
        loss before every backward, and ``step()`` runs before ``scaler.unscale_``/``scaler.step``.

        The loss scale changes during training (it halves on overflow and grows back), so it is read as a
        device tensor at each use (no host sync): the hooks divide it out of ĝ, ``step()`` multiplies the
        regularizer gradients by it (the raw ones are still scaled) and divides it out of the logged norms.
        Preconditioning and grafting are linear in the gradient, so the scaler's later unscale gives the
        same update as an unscaled run.
        """
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"attach_grad_scaler needs a torch.amp.GradScaler (or None), got {type(scaler).__name__}")
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._capture.loss_scale = self._loss_scale if self._scaler is not None else None

    def _loss_scale(self) -> torch.Tensor:
        # GradScaler keeps the scale as a device tensor; get_scale() would .item() it (a sync per call).
        scale = self._scaler._get_scale_async()
        if scale is None:
            raise RuntimeError("the attached GradScaler has not scaled a loss yet: call scaler.scale(loss).backward()")
        return scale.float()

    @property
    def capturing(self) -> bool:
        return self._capture.enabled

    @capturing.setter
    def capturing(self, on: bool) -> None:
        self._capture.enabled = bool(on)

    # --------------------------------------------------------------- internals
    def _update_factors(self) -> None:
        """All-reduce the pending sums (one collective), fold them into U and G, and invert when ready."""
        cfg = self.config
        if world_size() > 1:  # one collective for every pending sum
            pending = [t for g in self._groups for t in g.pending()]
            flat = maybe_all_reduce(torch.cat([t.reshape(-1) for t in pending]))
            offset = 0
            for t in pending:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        for g in self._groups:
            # A stored factor that is not finite (corrupted in place) is forgotten, so fresh statistics replace it.
            corrupt = ~(torch.isfinite(g.U).all(-1).all(-1) & torch.isfinite(g.G).all(-1).all(-1))
            self._skipped += corrupt.sum()
            g.U.masked_fill_(corrupt[:, None, None], 0.0)
            g.G.masked_fill_(corrupt[:, None, None], 0.0)
            g.C.masked_fill_(corrupt, 0.0)
            g.has_stats &= ~corrupt
            c = g.pend_C.clone()
            has_new = c > 0
            cc = c.clamp_min(1)[:, None, None]
            if cfg.stat_update == "mean":
                total = (g.C + c.double()).clamp_min(1).float()[:, None, None]
                old = g.C.float()[:, None, None]
                U_new = (g.U * old + g.pend_U) / total
                G_new = (g.G * old + g.pend_G) / total
            else:
                d = cfg.stat_ema_decay
                seen = g.has_stats[:, None, None]
                U_new = torch.where(seen, d * g.U + (1 - d) * g.pend_U / cc, g.pend_U / cc)
                G_new = torch.where(seen, d * g.G + (1 - d) * g.pend_G / cc, g.pend_G / cc)
            finite = (torch.isfinite(U_new).all(-1).all(-1) & torch.isfinite(G_new).all(-1).all(-1)
                      & torch.isfinite(c))
            accept = has_new & finite
            self._skipped += (has_new & ~finite).sum()
            g.U.copy_(torch.where(accept[:, None, None], U_new, g.U))
            g.G.copy_(torch.where(accept[:, None, None], G_new, g.G))
            g.C.copy_(torch.where(accept, g.C + c.double(), g.C))
            g.has_stats |= accept
            for t in g.pending():
                t.zero_()
        if not self.ready:
            # The one host sync outside metrics(): only at update steps before the first inversion.
            tokens = max(float(g.C.max()) for g in self._groups)
            if tokens < cfg.kfac_min_samples:
                return
        self._invert()

    def _invert(self) -> None:
        cfg = self.config
        cuda = self._groups[0].device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for g in self._groups:
            if cfg.pairing == "kfac":
                F = torch.cat([g.G, g.U])
            else:
                F = torch.cat([g.U, g.G / g.scale2()[:, None, None]])
            lam = gm.damping(F, cfg.kfac_damping, cfg.kfac_damping_mode)
            inv, evals, evecs, _ = gm.batched_damped_inverse(F, lam, cfg.inversion_method)
            ok = (gm.factor_ok(F) & g.has_stats.repeat(2) & torch.isfinite(inv).all(-1).all(-1)
                  & torch.isfinite(lam))
            k_energy = gm.energy_rank(evals, cfg.rank_adaptation_threshold, cfg.min_lora_rank)
            if cfg.enable_rank_adaptation:
                k = k_energy
            else:
                k = torch.full_like(k_energy, min(cfg.reprojection_k, g.r))
            P = gm.top_k_projector(evecs, k)
            keep = ok[:, None, None]
            g.F.copy_(torch.where(keep, F, g.F))
            g.inv.copy_(torch.where(keep, inv, g.inv))
            g.P.copy_(torch.where(keep, P, g.P))
            g.lam.copy_(torch.where(ok, lam, g.lam))
            g.cond.copy_(torch.where(ok, gm.condition_numbers(evals, lam), g.cond))
            g.k_energy.copy_(torch.where(ok, k_energy, g.k_energy))
            g.valid |= ok
        if cuda:
            end.record()
            self._inv_time = (start, end)
        else:
            self._inv_time = time.perf_counter() - t0
        self.inversions += 1
        self.ready = True

    def _apply_to_grads(self, precondition: bool, regularize: bool) -> None:
        cfg = self.config
        sq_norm, curv_total, reproj_total = None, None, None
        scale = self._loss_scale() if self._scaler is not None else None
        for pg in self._param_groups:
            params = [p for p in pg.params if p.grad is not None]
            if not params:
                continue
            index = pg.index if len(params) == len(pg.params) else torch.tensor(
                [row for row, p in zip(pg.rows, pg.params) if p.grad is not None], device=pg.fgroup.device)
            grads = [p.grad for p in params]
            G = torch.stack(grads).float()                      # (n, r, d_in) or (n, d_out, r)
            if regularize:
                W = torch.stack([p.detach() for p in params]).float()
                F, P = pg.fgroup.F[index], pg.fgroup.P[index]
                reg = regularize_A if pg.side == "A" else regularize_B
                extra, curv, reproj = reg(W, F, P, cfg.lambda_kfac, cfg.lambda_reproj)
                G = G + (extra if scale is None else extra * scale.to(extra.device))
                curv_total = curv if curv_total is None else curv_total + curv
                reproj_total = reproj if reproj_total is None else reproj_total + reproj
            if precondition:
                inv = pg.fgroup.inv[index]
                raw = G
                G = gm.precondition_A(inv, G) if pg.side == "A" else gm.precondition_B(G, inv)
                if cfg.grafting:
                    G = gm.graft_norm(G, raw)
                # A non-finite gradient (a NaN/Inf batch) would make the parameter NaN: skip that module's
                # update. The per-module squared norm is needed for ng_grad_norm anyway and is finite iff G is
                # (up to elements > 1e19, which are no usable gradient either).
                sq = G.pow(2).sum((1, 2))                       # (n,)
                bad = ~torch.isfinite(sq)
                self._nonfinite_grads += bad.sum()
                if scale is None:  # under a GradScaler the overflow must reach it, so that it skips the step
                    G.masked_fill_(bad[:, None, None], 0.0)
                s = torch.where(bad, 0.0, sq).sum()
                sq_norm = s if sq_norm is None else sq_norm + s
            torch._foreach_copy_(grads, list(G.unbind(0)))
        if precondition and sq_norm is not None:
            self._ng_norm = sq_norm.sqrt() if scale is None else sq_norm.sqrt() / scale.to(sq_norm.device)
        if regularize:
            self._reg = {"kfac": curv_total, "reproj": reproj_total}

    def _reproject(self) -> None:
        two_sided = self.config.use_two_sided_reprojection
        for pg in self._param_groups:
            W = torch.stack([p.detach() for p in pg.params])
            if pg.side == "A":
                new = reproject_A(W.float(), pg.fgroup.P[pg.index])
            else:
                rows = pg.index if two_sided else pg.index - pg.fgroup.n  # one-sided: B uses P_A
                new = reproject_B(W.float(), pg.fgroup.P[rows])
            torch._foreach_copy_([p.data for p in pg.params], list(new.unbind(0)))
