"""GRITManager: when to update, invert and apply the rank-space K-FAC preconditioner.

Contract (what the trainer glue and the notebooks rely on; the math is in ``grit.kfac_math``, the
factor state in ``grit.factors``)::

    manager = GRITManager(model, GRITConfig(...))  # finds every PEFT LoRA Linear layer (plain or bnb 4-bit base,
                                                   # adapter cfg.adapter_name or the active one) and hooks it now;
                                                   # a forward pre-hook on `model` reads attention_mask (padding
                                                   # never enters the statistics). Nothing is allocated yet: the
                                                   # factor state goes where the statistics arrive, at first use,
                                                   # so the model may still be moved / re-typed / loaded
    loss.backward()                                # one or more micro-batches
    manager.step() -> bool                         # after the last backward, before optimizer.step():
                                                   # adds regularizer gradients, updates/inverts factors when due,
                                                   # preconditions lora_A/lora_B grads; True iff it preconditioned
    optimizer.step()

    manager.optimizer_steps        int, calls to step()
    manager.preconditioned_steps   int, steps whose gradients were preconditioned (no device sync to read)
    manager.counters()             {"grit/...": float} of host-side counters (no device read): optimizer_steps,
                                   preconditioned_steps, inversions, mask_mismatches
    manager.metrics()              {"grit/...": float}, the only method that syncs with the device (one
                                   device-to-host copy per device; per-group counters summed on the host),
                                   counters included:
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
    and inspection), manager.factor_state (the ``grit.factors.FactorState`` that owns the statistics)

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
inversion (the kfac_min_samples check) and the capture check at the first update.

Nothing silently: at the first factor update, ``step()`` raises ``RuntimeError`` if a LoRA module has
a gradient but no statistics were captured for it (decided on all-reduced per-module gradient flags
and token counts, so every data-parallel rank raises together). That is what a fused LoRA kernel
(Unsloth's on CUDA) or any forward that bypasses PEFT's lora_A/lora_B modules does: without the
error the run would silently equal its control. The Trainer glue also refuses schedules that cannot
precondition (``grit.integrations.hf``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from . import kfac_math as km
from .config import GRITConfig
from .discovery import find_lora_layers
from .factors import FactorGroup, FactorState, ModuleSpec, to_host
from .hooks import StatCapture
from .regularizers import regularize_A, regularize_B, reproject_A, reproject_B

STATE_VERSION = 3  # GRITManager.state_dict() format; load_state_dict refuses any other

NO_CAPTURE_HELP = (
    "The usual cause is a fused LoRA kernel that reads the LoRA weights directly instead of calling PEFT's "
    "lora_A/lora_B modules (Unsloth's FastLanguageModel does so on CUDA), or any custom forward that bypasses "
    "those modules (or in which lora_A's output does not require grad). GRIT would precondition and regularize "
    "nothing and the run would equal its control. Fix: train with the plain PEFT forward: load the model with "
    "transformers + peft (the HF stack, grit_study.arms.run_hf) instead of Unsloth's FastLanguageModel, or "
    "disable the fused LoRA kernels, and build the GRITManager on that model.")


@dataclass
class _Module:
    name: str
    layer: nn.Module          # the PEFT LoRA layer
    lora_A: nn.Linear         # (r, d_in) weight
    lora_B: nn.Linear         # (d_out, r) weight
    adapter: str


class _ParamGroup:
    """Same-shaped lora_A (or lora_B) weights of one factor group: grads stacked for one bmm.

    Holds the nn.Linear modules, not their weights: the weights are read at each step, so a model whose
    parameters were replaced before training (``to_empty``, ``load_state_dict(assign=True)``) is followed.
    The factors, projectors and inverses of its modules are gathered once per inversion (``gathered``),
    not at every step: they only change when the factor state is inverted or loaded.
    """

    def __init__(self, side: str, fgroup: FactorGroup, gi: int, modules: list, rows: list):
        self.side, self.fgroup, self.gi, self.modules, self.rows = side, fgroup, gi, modules, rows
        self.index = torch.tensor(rows, device=fgroup.device)
        self._gathered = None  # (factor state version, F, P, inv)

    def weights(self) -> list:
        return [m.weight for m in self.modules]

    def factor_side(self):
        return self.fgroup.A if self.side == "A" else self.fgroup.B

    def gathered(self, version: int):
        """(F, P, inv) of all its modules, (n, r, r) each, as of factor state ``version``."""
        if self._gathered is None or self._gathered[0] != version:
            side = self.factor_side()
            self._gathered = (version, side.F[self.index], side.P[self.index], side.inv[self.index])
        return self._gathered[1:]


class _GroupCounters:
    """The manager's per-factor-group counters, on that group's device (summed on the host by metrics())."""

    def __init__(self, device: torch.device):
        self.nonfinite_grads = torch.zeros((), dtype=torch.long, device=device)  # zeroed (module, step) grads
        self.ng_sq = None        # squared norm of the last preconditioned step's gradients of this group
        self.reg_kfac = None     # last regularized step's terms of this group
        self.reg_reproj = None


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
        # Devices are read when the factor state is first used, not now: the model may still be moved.
        specs = [ModuleSpec(m.name, m.lora_A.out_features, lambda a=m.lora_A: a.weight.device,
                            lambda layer=m.layer, a=adapter: layer.scaling[a]) for m in self._modules]
        self.factor_state = FactorState(specs, cfg)
        self._param_groups: list | None = None  # laid out at the first step (_layout)
        self._counters: list | None = None      # one _GroupCounters per factor group
        self._capture = StatCapture(model, [m.lora_A for m in self._modules], self.factor_state,
                                    stride=cfg.stat_micro_batch_stride)

        self.optimizer_steps = 0
        self.preconditioned_steps = 0
        self.inversions = 0
        self.ready = False                      # a first inversion happened
        self._capture_checked = False           # the first factor update checked that statistics arrive
        self._ng_scale = None                   # the loss scale of the last preconditioned step (fp16)
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
        # Hand the last micro-batch's statistics over now: under a GradScaler its loss scale is the one the
        # scaler's update() may change right after this step.
        self._capture.flush()
        self._capture.new_step()
        self.optimizer_steps += 1
        n = self.optimizer_steps
        self.factor_state.end_step()
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

    def counters(self) -> dict:
        """The host-side counters under ``grit/`` (no device read: cheap enough for every log step)."""
        return {"grit/optimizer_steps": float(self.optimizer_steps),
                "grit/preconditioned_steps": float(self.preconditioned_steps),
                "grit/inversions": float(self.inversions),
                "grit/mask_mismatches": float(self._capture.masks.mismatches)}

    def metrics(self) -> dict:
        """Scalars for logging under ``grit/``; NaN where a quantity does not exist yet (before the first inversion).

        Device values travel in one float64 device-to-host copy per device (one sync on a single GPU, not one
        per value); counters of factor groups on several devices are summed on the host. Before the factor
        state's first use nothing is allocated (its device is not known yet): the device values read 0 / NaN.
        """
        nan = float("nan")
        out = self.counters()
        fs = self.factor_state
        values: dict = {}  # name -> host values, one per factor group that has it
        if fs.materialized:
            self._layout()
            named = []
            for g, c in zip(fs.groups, self._counters):
                named += [("skipped", g.skipped), ("nonfinite", c.nonfinite_grads), ("tokens", g.tokens().max())]
                named += [(name, t) for name, t in (("ng_sq", c.ng_sq), ("reg_kfac", c.reg_kfac),
                                                    ("reg_reproj", c.reg_reproj)) if t is not None]
                named += [(key, getattr(g, key)) for key in ("valid", "cond", "lam", "k_energy")]
            if self._ng_scale is not None:
                named.append(("ng_scale", self._ng_scale))
            for (name, _), v in zip(named, to_host([t for _, t in named])):
                values.setdefault(name, []).append(v)

        def total(name):
            return sum(float(v) for v in values.get(name, []))

        ng_norm = nan
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
        out["grit/degenerate_factors"] = float((~valid).sum()) if self.ready else nan
        if self.ready and valid.any():
            # Back to the devices' dtypes (exact), so the statistics are those of the stored values.
            cond, lam, k = cond[valid].float(), lam[valid].float(), k[valid].float()
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

        U and G are the current statistics (``grit.kfac_math``); F_*, inv_*, P_* those of the last inversion
        (zeros / identity where none was valid yet). Syncs with the device: for tests and inspection.
        """
        return self.factor_state.module_factors()

    def state_dict(self) -> dict:
        fs = self.factor_state.state_dict()
        self._layout()
        nonfinite = sum(int(c.nonfinite_grads) for c in self._counters)
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "adapter_name": self.adapter_name,
                "optimizer_steps": self.optimizer_steps, "preconditioned_steps": self.preconditioned_steps,
                "inversions": self.inversions, "ready": self.ready, "capture_checked": self._capture_checked,
                "nonfinite_grads": torch.tensor(nonfinite), **fs}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"unknown GRITManager state version {sd.get('version')!r} (this grit writes and "
                             f"reads version {STATE_VERSION})")
        self.factor_state.load_state_dict(sd)
        self._layout()
        self.optimizer_steps = int(sd["optimizer_steps"])
        self.preconditioned_steps = int(sd["preconditioned_steps"])
        self.inversions = int(sd["inversions"])
        self.ready = bool(sd["ready"])
        self._capture_checked = bool(sd["capture_checked"])
        for i, c in enumerate(self._counters):  # the total goes to the first group's counter
            c.nonfinite_grads.fill_(int(sd["nonfinite_grads"]) if i == 0 else 0)

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

    # --------------------------------------------------------------- internals
    def _layout(self) -> None:
        """Group the LoRA weights by factor group, side and (shape, dtype, device), once, at first use."""
        if self._param_groups is not None:
            return
        fs = self.factor_state
        self._param_groups = []
        for gi, g in enumerate(fs.groups):
            members = [(m, row) for m, (mg, row) in zip(self._modules, fs.slots) if mg == gi]
            for side in ("A", "B"):
                by_shape: dict = {}
                for m, row in members:
                    lin = m.lora_A if side == "A" else m.lora_B
                    w = lin.weight
                    by_shape.setdefault((tuple(w.shape), w.dtype, w.device), []).append((lin, row))
                self._param_groups += [_ParamGroup(side, g, gi, [lin for lin, _ in ms], [row for _, row in ms])
                                       for ms in by_shape.values()]
        self._counters = [_GroupCounters(g.device) for g in fs.groups]

    def _update_factors(self) -> None:
        """All-reduce the pending sums (one collective), fold them into U and G, and invert when ready."""
        fs = self.factor_state
        if not self._capture_checked:
            self._check_capture()  # all-reduces, so the decision is the same on every rank
        else:
            fs.all_reduce()
        fs.fold()
        if not self.ready:
            # The one host sync outside metrics(): only at update steps before the first inversion.
            if fs.folded_tokens() < self.config.kfac_min_samples:
                return
        self._invert()

    def _check_capture(self) -> None:
        """At the first factor update: refuse a run in which LoRA modules have gradients but no statistics.

        Decided on all-reduced per-module gradient flags and token counts (one collective with the pending
        sums, which it replaces), so every data-parallel rank raises together.
        """
        fs = self.factor_state
        flags = [float(m.lora_A.weight.grad is not None or m.lora_B.weight.grad is not None) for m in self._modules]
        has_grad = torch.tensor(flags, dtype=torch.float32).to(fs.groups[0].device)
        fs.all_reduce(extra=[has_grad])
        self._capture_checked = True
        tokens = fs.module_tokens()
        missing = [m.name for m, g, t in zip(self._modules, has_grad.cpu().tolist(), tokens) if g > 0 and t == 0]
        if missing:
            raise RuntimeError(
                f"GRIT captured no statistics for {len(missing)} of the {len(self._modules)} LoRA modules that have "
                f"gradients (first: {missing[:3]}) by its first factor update (optimizer step "
                f"{self.optimizer_steps}): their lora_A module was never called in a forward that was "
                f"backpropagated. {NO_CAPTURE_HELP}")

    def _invert(self) -> None:
        cuda = self.factor_state.groups[0].device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        self.factor_state.invert()
        if cuda:
            end.record()
            self._inv_time = (start, end)
        else:
            self._inv_time = time.perf_counter() - t0
        self.inversions += 1
        self.ready = True

    def _apply_to_grads(self, precondition: bool, regularize: bool) -> None:
        cfg = self.config
        self._layout()
        version = self.factor_state.version
        # Per factor group (its device), summed on the host by metrics(): groups may live on several devices.
        sq_norm = [None] * len(self._counters)
        curv_total = [None] * len(self._counters)
        reproj_total = [None] * len(self._counters)
        scale = self._loss_scale() if self._scaler is not None else None
        for pg in self._param_groups:
            weights = pg.weights()
            params = [p for p in weights if p.grad is not None]
            if not params:
                continue
            if len(params) == len(weights):
                F, P, inv = pg.gathered(version)
            else:  # some modules got no gradient this step: gather the rows of those that did
                index = torch.tensor([row for row, p in zip(pg.rows, weights) if p.grad is not None],
                                     device=pg.fgroup.device)
                side = pg.factor_side()
                F, P, inv = side.F[index], side.P[index], side.inv[index]
            grads = [p.grad for p in params]
            G = torch.stack(grads).float()                      # (n, r, d_in) or (n, d_out, r)
            gi = pg.gi
            if regularize:
                W = torch.stack([p.detach() for p in params]).float()
                reg = regularize_A if pg.side == "A" else regularize_B
                # The factor built from G is normalised inside the regularizer (grit.regularizers).
                g_side = (pg.side == "A") == (cfg.pairing == "kfac")
                extra, curv, reproj = reg(W, F, P, cfg.lambda_kfac, cfg.lambda_reproj, normalize=g_side)
                G = G + (extra if scale is None else extra * scale.to(extra.device))
                curv_total[gi] = curv if curv_total[gi] is None else curv_total[gi] + curv
                reproj_total[gi] = reproj if reproj_total[gi] is None else reproj_total[gi] + reproj
            if precondition:
                raw = G
                G = km.precondition_A(inv, G) if pg.side == "A" else km.precondition_B(G, inv)
                if cfg.grafting:
                    G = km.graft_norm(G, raw)
                # A non-finite gradient (a NaN/Inf batch) would make the parameter NaN: skip that module's
                # update. The per-module squared norm is needed for ng_grad_norm anyway and is finite iff G is
                # (up to elements > 1e19, which are no usable gradient either).
                sq = G.pow(2).sum((1, 2))                       # (n,)
                bad = ~torch.isfinite(sq)
                self._counters[gi].nonfinite_grads += bad.sum()
                if scale is None:  # under a GradScaler the overflow must reach it, so that it skips the step
                    G.masked_fill_(bad[:, None, None], 0.0)
                s = torch.where(bad, 0.0, sq).sum()
                sq_norm[gi] = s if sq_norm[gi] is None else sq_norm[gi] + s
            torch._foreach_copy_(grads, list(G.unbind(0)))
        if precondition and any(s is not None for s in sq_norm):
            for c, s in zip(self._counters, sq_norm):
                c.ng_sq = s
            # The loss scale is the same for every group; metrics() divides it out of the total norm. A copy:
            # the scaler updates its scale tensor in place.
            self._ng_scale = None if scale is None else scale.clone()
        if regularize:
            for c, k, r in zip(self._counters, curv_total, reproj_total):
                c.reg_kfac, c.reg_reproj = k, r

    def _reproject(self) -> None:
        self._layout()
        two_sided = self.config.use_two_sided_reprojection
        for pg in self._param_groups:
            weights = pg.weights()
            W = torch.stack([p.detach() for p in weights])
            if pg.side == "A" or two_sided:
                P = pg.factor_side().P[pg.index]
            else:
                P = pg.fgroup.A.P[pg.index]  # one-sided: B uses P_A
            new = reproject_A(W.float(), P) if pg.side == "A" else reproject_B(W.float(), P)
            torch._foreach_copy_([p.data for p in weights], list(new.unbind(0)))
