"""The K-FAC factor state of every LoRA module, with one owner: ``FactorState``.

Per module (rank r, math and names: ``grit.kfac_math``) it holds

* the pending sums: Σuuᵀ, Σĝĝᵀ over kept positions and their token count, which the statistics
  capture (``grit.hooks``) hands over with :meth:`FactorState.accumulate`;
* the running estimates U, G, the tokens folded into them and whether any were
  (:meth:`FactorState.fold`, after :meth:`FactorState.all_reduce` under data parallelism);
* per side, A (the factor F_A applied to ∇A from the left) and B (F_B, applied to ∇B from the
  right), the last valid factor, its damped inverse, its top-k projector, λ, cond(F + λI) and the
  energy rank (:meth:`FactorState.invert`).

What the estimates average over (``GRITConfig.stat_update``). Let S_j = Σ_t u_t u_tᵀ over the kept
positions of optimizer step j (all micro-batches, all ranks) and N_j their count; at step n

* ``"mean"``:  U_n = Σ_{j<=n} S_j / Σ_{j<=n} N_j, every statistics token since the start of the run
  weighted alike. u = A x, so early tokens were computed with an early A: the mean mixes the
  statistics of old and new weights (as the published code did).
* ``"ema"``:   U_n = Σ_{j<=n} d^(n-j) S_j / Σ_{j<=n} d^(n-j) N_j, with d = ``stat_ema_decay`` per
  optimizer step: a token-weighted mean in which a step k steps old weighs d^k (horizon about
  1/(1-d) steps), whatever ``kfac_update_freq`` is; ``"mean"`` is its d = 1 case. No initialisation
  bias (the first step's mean is the first estimate), no extra communication: between updates the
  decayed sums Σ d^(n-j) S_j, Σ d^(n-j) N_j of the pending steps are kept (:meth:`FactorState.end_step`
  decays them at every step boundary), and an update folds them into the estimate decayed by d^k for
  the k steps since the previous update. Both are linear in the sums, so one all-reduce at the update
  still makes them exact under data parallelism.

G likewise with ĝ. The estimate is read (inverted) only at factor updates, so U_n is the estimate
at the update steps n.

Modules with the same (device, r) share a :class:`FactorGroup`: their tensors are stacked (n, r, r),
so one batched kernel serves them all. A group keeps its A side and its B side in one 2n-row stack
(one eigendecomposition for both); :attr:`FactorGroup.A` and :attr:`FactorGroup.B` are named views of
the two halves, and nothing outside this module depends on the layout.

Where the state lives: the groups are allocated at the state's first use (the first statistics
handed over, or the first read), on the device each module's LoRA weight is on *then*, not when the
state is built. So a model built (even on the ``meta`` device) and moved, re-typed or re-loaded
after ``GRITManager(model)`` is followed, as in README's order (manager, then a Trainer that moves
the model). Moving the model after that first use is refused where it shows (statistics arriving
on another device). Counters are kept per group and summed on the host (:func:`to_host`), so
groups on several devices (a multi-GPU ``device_map``) never meet in one kernel; that layout cannot
be tested on this project's CPU machines.

When to update and invert is ``grit.schedule``'s business, what to do with the inverses ``grit.apply``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from . import kfac_math as km
from .config import GRITConfig
from .distributed import maybe_all_reduce, world_size


@dataclass(frozen=True)
class ModuleSpec:
    """What the factor state needs to know about one LoRA module."""

    name: str
    rank: int
    # Where its statistics arrive: a device, or a callable returning the module's current device, read
    # when the state is first used (GRITManager passes its lora_A weight's, so the state follows the model).
    device: Union[torch.device, Callable[[], torch.device]]
    scale: Callable[[], float]  # the adapter scale s, read at each inversion (PEFT can change it)

    def current_device(self) -> torch.device:
        return torch.device(self.device()) if callable(self.device) else torch.device(self.device)


@dataclass(frozen=True)
class FactorSide:
    """One side (A or B) of a factor group: views of the group's stacked tensors, one row per module."""

    F: torch.Tensor          # (n, r, r) last valid factor (zeros until one is valid); the regularizers use it
    inv: torch.Tensor        # (n, r, r) last valid (F + λI)^-1; identity until one exists
    P: torch.Tensor          # (n, r, r) projector on F's top-k eigenvectors; identity until one exists
    valid: torch.Tensor      # (n,) bool, a valid inverse exists
    lam: torch.Tensor        # (n,) λ of the last valid inversion
    cond: torch.Tensor       # (n,) cond(F + λI) of the last valid inversion
    k_energy: torch.Tensor   # (n,) long, energy rank of the last valid inversion


def to_host(tensors: Sequence[torch.Tensor]) -> list:
    """float64 CPU copies of ``tensors`` (any devices), one device-to-host copy per device.

    The values are converted to float64 on their device first (exact for fp32 and integer counters),
    so host-side sums over devices never mix devices in a kernel.
    """
    out: list = [None] * len(tensors)
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for ids in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).to(torch.float64) for i in ids]).cpu()
        offset = 0
        for i in ids:
            numel = tensors[i].numel()
            out[i] = flat[offset:offset + numel].view(tensors[i].shape)
            offset += numel
    return out


class FactorGroup:
    """All modules with the same rank r on one device; their statistics stacked as (n, r, r)."""

    # Saved by state(): the format of the "groups" entries of GRITManager.state_dict() version 3.
    STATE = ("pend_U", "pend_G", "pend_C", "acc_U", "acc_G", "acc_C", "acc_T", "U", "G", "C", "W", "has_stats",
             "F", "inv", "P", "valid", "lam", "cond", "k_energy", "skipped")

    def __init__(self, specs: Sequence[ModuleSpec], device: torch.device, r: int):
        n = len(specs)
        self.specs, self.device, self.r, self.n = list(specs), device, r, n
        self.names = [s.name for s in specs]
        z = dict(device=device, dtype=torch.float32)
        eye = torch.eye(r, **z).expand(2 * n, r, r).contiguous()
        self.pend_U = torch.zeros(n, r, r, **z)     # Σuuᵀ of the current step ("mean": since the last update)
        self.pend_G = torch.zeros(n, r, r, **z)     # Σĝĝᵀ
        self.pend_C = torch.zeros(n, **z)           # tokens
        # "ema" only: the closed steps since the last update, decayed to the latest one (module docstring).
        self.acc_U = torch.zeros(n, r, r, **z)      # Σ_j d^(n-j) S_j
        self.acc_G = torch.zeros(n, r, r, **z)
        self.acc_C = torch.zeros(n, **z)            # Σ_j d^(n-j) N_j, the weight they carry
        self.acc_T = torch.zeros(n, **z)            # Σ_j N_j, tokens (undecayed, for counting)
        self.U = torch.zeros(n, r, r, **z)          # current estimates
        self.G = torch.zeros(n, r, r, **z)
        self.C = torch.zeros(n, device=device, dtype=torch.float64)  # tokens folded in so far
        self.W = torch.zeros(n, device=device, dtype=torch.float64)  # "ema": the estimate's decayed token weight
        self.has_stats = torch.zeros(n, device=device, dtype=torch.bool)
        # Both sides in one 2n-row stack, A rows first: one batched eigendecomposition inverts both.
        self.F = torch.zeros(2 * n, r, r, **z)
        self.inv = eye.clone()
        self.P = eye.clone()
        self.valid = torch.zeros(2 * n, device=device, dtype=torch.bool)
        self.lam = torch.zeros(2 * n, **z)
        self.cond = torch.ones(2 * n, **z)
        self.k_energy = torch.full((2 * n,), r, device=device, dtype=torch.long)
        self.skipped = torch.zeros((), device=device, dtype=torch.long)  # rejected (module, step/update) pairs
        self.step_start: list | None = None  # "mean": the pending sums as the current step began (None: zeros)
        # Views stay valid: the stacks are only ever written in place.
        self.A = self._side(slice(0, n))
        self.B = self._side(slice(n, 2 * n))

    def _side(self, rows: slice) -> FactorSide:
        return FactorSide(self.F[rows], self.inv[rows], self.P[rows], self.valid[rows], self.lam[rows],
                          self.cond[rows], self.k_energy[rows])

    def pending(self, cfg: GRITConfig) -> list:
        """The sums an update all-reduces: "mean" the pending sums, "ema" the closed steps' decayed sums."""
        if cfg.stat_update == "mean":
            return self.pending_step()
        return [self.acc_U, self.acc_G, self.acc_C, self.acc_T]

    def pending_step(self) -> list:
        return [self.pend_U, self.pend_G, self.pend_C]

    def tokens(self) -> torch.Tensor:
        """(n,) float64: tokens each module has seen, pending included."""
        return self.C + self.pend_C.double() + self.acc_T.double()

    def scale2(self) -> torch.Tensor:
        s = [float(spec.scale()) for spec in self.specs]
        return torch.tensor(s, dtype=torch.float32).to(self.device, non_blocking=True) ** 2

    def drop_nonfinite_step(self) -> None:
        """Forget the current step's statistics of every module where they are not finite, counting them in
        ``skipped``: the pending sums go back to what they held when the step began.

        An fp16 GradScaler overflow (or a NaN batch) makes one step's ĝ non-finite; the scaler skips that
        optimizer step, and so do the statistics. Kept, they would make the whole window non-finite and the
        fold would reject it all, putting off the first inversion by kfac_update_freq steps. Where the step
        is finite ``torch.where`` returns its sums exactly, so finite runs are unchanged bit for bit.
        """
        U, G, C = self.pending_step()
        ok = torch.isfinite(U).all(-1).all(-1) & torch.isfinite(G).all(-1).all(-1) & torch.isfinite(C)  # (n,)
        self.skipped += (~ok).sum()
        start = self.step_start or (0.0, 0.0, 0.0)
        for t, before in zip((U, G, C), start):
            t.copy_(torch.where(ok.view(-1, *[1] * (t.dim() - 1)), t, before))

    def mark_step_start(self, cfg: GRITConfig) -> None:
        """Remember the pending sums a new step starts from ("mean" keeps accumulating them across steps;
        "ema" starts every step from zero)."""
        self.step_start = [t.clone() for t in self.pending_step()] if cfg.stat_update == "mean" else None

    def close_step(self, d: float) -> None:
        """"ema": the current step's sums join the decayed sums of the pending steps: acc <- d·acc + pend."""
        for acc, pend in ((self.acc_U, self.pend_U), (self.acc_G, self.pend_G), (self.acc_C, self.pend_C)):
            acc.mul_(d).add_(pend)
        self.acc_T.add_(self.pend_C)
        for t in self.pending_step():
            t.zero_()

    def fold(self, cfg: GRITConfig, steps: int) -> None:
        """Fold the pending statistics into U, G (``cfg.stat_update``; ``steps``: optimizer steps since the last
        fold, the "ema" decay of the old estimate) and zero them; rejections are added to ``skipped``.

        Rejected: a stored estimate that is not finite (corrupted in place; it is forgotten, so fresh
        statistics replace it) and new statistics that would make it non-finite (they are dropped).
        """
        corrupt = ~(torch.isfinite(self.U).all(-1).all(-1) & torch.isfinite(self.G).all(-1).all(-1))
        rejected = corrupt.sum()
        self.U.masked_fill_(corrupt[:, None, None], 0.0)
        self.G.masked_fill_(corrupt[:, None, None], 0.0)
        self.C.masked_fill_(corrupt, 0.0)
        self.W.masked_fill_(corrupt, 0.0)
        self.has_stats &= ~corrupt
        if cfg.stat_update == "mean":
            c = self.pend_C.clone()
            total = (self.C + c.double()).clamp_min(1).float()[:, None, None]
            old = self.C.float()[:, None, None]
            U_new = (self.U * old + self.pend_U) / total
            G_new = (self.G * old + self.pend_G) / total
            tokens = c.double()
            W_new = W_kept = None
        else:
            c = self.acc_C.clone()
            W_kept = self.W * cfg.stat_ema_decay ** steps     # the old estimate's weight, decayed to now
            total = (W_kept + c.double()).float()[:, None, None]
            old = W_kept.float()[:, None, None]
            safe = torch.where(total > 0, total, 1.0)
            U_new = (self.U * old + self.acc_U) / safe
            G_new = (self.G * old + self.acc_G) / safe
            tokens = self.acc_T.double()
            W_new = W_kept + c.double()
        has_new = c > 0
        finite = (torch.isfinite(U_new).all(-1).all(-1) & torch.isfinite(G_new).all(-1).all(-1)
                  & torch.isfinite(c))
        accept = has_new & finite
        rejected = rejected + (has_new & ~finite).sum()
        self.U.copy_(torch.where(accept[:, None, None], U_new, self.U))
        self.G.copy_(torch.where(accept[:, None, None], G_new, self.G))
        self.C.copy_(torch.where(accept, self.C + tokens, self.C))
        if W_new is not None:
            self.W.copy_(torch.where(accept, W_new, W_kept))
        self.has_stats |= accept
        self.skipped += rejected
        for t in self.pending(cfg) if cfg.stat_update == "mean" else self.pending(cfg) + self.pending_step():
            t.zero_()
        self.step_start = None

    def invert(self, cfg: GRITConfig) -> None:
        """Pair U, G with the sides (``cfg.pairing``), invert both sides at once, keep what is valid."""
        if cfg.pairing == "kfac":
            F_A, F_B = self.G, self.U
        else:
            F_A, F_B = self.U, self.G / self.scale2()[:, None, None]
        F = torch.cat([F_A, F_B])
        lam = km.damping(F, cfg.kfac_damping, cfg.kfac_damping_mode)
        inv, evals, evecs, _ = km.batched_damped_inverse(F, lam, cfg.inversion_method)
        ok = (km.factor_ok(F) & self.has_stats.repeat(2) & torch.isfinite(inv).all(-1).all(-1)
              & torch.isfinite(lam))
        k_energy = km.energy_rank(evals, cfg.rank_adaptation_threshold, cfg.min_lora_rank)
        if cfg.enable_rank_adaptation:
            k = k_energy
        else:
            k = torch.full_like(k_energy, min(cfg.reprojection_k, self.r))
        P = km.top_k_projector(evecs, k)
        keep = ok[:, None, None]
        self.F.copy_(torch.where(keep, F, self.F))
        self.inv.copy_(torch.where(keep, inv, self.inv))
        self.P.copy_(torch.where(keep, P, self.P))
        self.lam.copy_(torch.where(ok, lam, self.lam))
        self.cond.copy_(torch.where(ok, km.condition_numbers(evals, lam), self.cond))
        self.k_energy.copy_(torch.where(ok, k_energy, self.k_energy))
        self.valid |= ok

    def state(self) -> dict:
        return {"modules": list(self.names), **{k: getattr(self, k).clone() for k in self.STATE}}

    def load(self, state: dict, cfg: GRITConfig) -> None:
        for k in self.STATE:
            getattr(self, k).copy_(state[k])  # in place: the side views alias these tensors
        self.mark_step_start(cfg)


class FactorState:
    """Owns the factor state of all modules (module i = ``specs[i]``); see the module docstring.

    Statistics sources (``grit.hooks.StatCapture``) that queue statistics before handing them over
    register with :meth:`add_source`; every read of the pending sums flushes them first, and a load
    drops what they queued. The groups are allocated at first use (module docstring): ``groups`` and
    ``slots`` build them when first read.

    Per optimizer step: statistics arrive (:meth:`accumulate`), the step ends (:meth:`end_step`), and at
    an update the pending sums are all-reduced (:meth:`all_reduce`), folded (:meth:`fold`) and inverted
    (:meth:`invert`). A :meth:`fold` of a step that was not ended ends it first.
    """

    def __init__(self, specs: Sequence[ModuleSpec], config: GRITConfig):
        self.config = config
        self.specs = list(specs)
        self._groups: list | None = None
        self._slots: list | None = None
        self.version = 0              # bumped whenever the inverses / projectors may have changed
        self.steps_since_fold = 0     # optimizer steps ended since the last fold (the "ema" decay's clock)
        self._step_open = False       # statistics arrived since the last end_step
        self._sources: list = []
        self._index_cache: dict = {}

    # ------------------------------------------------------------ layout (first use)
    @property
    def materialized(self) -> bool:
        """Whether the groups exist yet (they are allocated at first use)."""
        return self._groups is not None

    @property
    def groups(self) -> list:
        if self._groups is None:
            self._materialize()
        return self._groups

    @property
    def slots(self) -> list:
        """slots[i] = (module i's group position in ``groups``, its row in that group)."""
        if self._slots is None:
            self._materialize()
        return self._slots

    def _materialize(self) -> None:
        keyed: dict = {}
        for i, spec in enumerate(self.specs):
            keyed.setdefault((spec.current_device(), spec.rank), []).append(i)
        self._groups = [FactorGroup([self.specs[i] for i in ids], dev, r) for (dev, r), ids in keyed.items()]
        self._slots = [None] * len(self.specs)
        for gi, ids in enumerate(keyed.values()):
            for row, i in enumerate(ids):
                self._slots[i] = (gi, row)

    # ------------------------------------------------------------ statistics in
    def add_source(self, source) -> None:
        """``source`` has ``flush()`` (hand over what it queued) and ``drop()`` (forget it)."""
        self._sources.append(source)

    def flush_sources(self) -> None:
        for source in self._sources:
            source.flush()

    def bucket(self, module: int) -> int:
        """Modules with the same bucket can be handed over together in one :meth:`accumulate` call."""
        return self.slots[module][0]

    def accumulate(self, modules: Sequence[int], UU: torch.Tensor, GG: torch.Tensor, count: torch.Tensor) -> None:
        """Add Σuuᵀ (k, r, r), Σĝĝᵀ (k, r, r) and the token count (0-dim, the same for all k) of ``modules``
        (k module indices of one bucket) to their pending sums."""
        gi = self.slots[modules[0]][0]
        group = self.groups[gi]
        if UU.device != group.device:
            raise RuntimeError(
                f"GRIT: statistics of {self.specs[modules[0]].name} arrive on {UU.device}, but its factor state was "
                f"allocated on {group.device} at its first use (the first forward/backward or manager call). Move "
                "the model to its training device before training with GRIT starts, not after.")
        index = self._index(gi, modules)
        group.pend_U.index_add_(0, index, UU)
        group.pend_G.index_add_(0, index, GG)
        group.pend_C.index_add_(0, index, count.expand(len(modules)))
        self._step_open = True

    def _index(self, gi: int, modules: Sequence[int]) -> torch.Tensor:
        # The same modules come in the same order every micro-batch: build each index tensor once.
        key = tuple(modules)
        index = self._index_cache.get(key)
        if index is None:
            rows = []
            for i in modules:
                g, row = self.slots[i]
                if g != gi:
                    raise ValueError(f"accumulate: modules {list(modules)} span factor groups {gi} and {g}; hand "
                                     "over one bucket (FactorState.bucket) per call")
                rows.append(row)
            index = torch.tensor(rows, dtype=torch.long, device=self.groups[gi].device)
            self._index_cache[key] = index
        return index

    # ------------------------------------------------------------ updates
    def end_step(self) -> None:
        """Mark the end of an optimizer step: under "ema" its sums join the decayed pending steps (no kernels
        under "mean", whose pending sums simply keep accumulating)."""
        self.flush_sources()
        for g in self.groups:
            g.drop_nonfinite_step()
            if self.config.stat_update == "ema":
                g.close_step(self.config.stat_ema_decay)
            else:
                g.mark_step_start(self.config)
        self.steps_since_fold += 1
        self._step_open = False

    def all_reduce(self, extra: Sequence[torch.Tensor] = ()) -> None:
        """Sum every group's pending sums (and ``extra`` tensors, in place) over the data-parallel ranks: one
        collective for all of them. Under "ema" an open step is ended first (its sums must be in the decayed ones)."""
        self.flush_sources()
        if self.config.stat_update == "ema" and self._step_open:
            self.end_step()
        if world_size() == 1:
            return
        pending = [t for g in self.groups for t in g.pending(self.config)] + list(extra)
        device = pending[0].device
        flat = maybe_all_reduce(torch.cat([t.reshape(-1).to(device) for t in pending]))
        offset = 0
        for t in pending:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def fold(self) -> None:
        """Fold the pending statistics into the running estimates (``GRITConfig.stat_update``) and zero them."""
        self.flush_sources()
        if self._step_open:
            self.end_step()
        for g in self.groups:
            g.fold(self.config, self.steps_since_fold)
        self.steps_since_fold = 0

    def invert(self) -> None:
        """Invert every group's factors; rows without a valid inverse keep their last one."""
        for g in self.groups:
            g.invert(self.config)
        self.version += 1

    # ------------------------------------------------------------ reads
    def folded_tokens(self) -> float:
        """Most tokens folded into any module's estimate (a host sync)."""
        return max(float(t.max()) for t in to_host([g.C for g in self.groups]))

    def module_tokens(self) -> list:
        """Per module (``specs`` order), tokens seen, pending included, as host floats (a host sync)."""
        per_group = to_host([g.tokens() for g in self.groups])
        return [float(per_group[gi][row]) for gi, row in self.slots]

    def missing_statistics(self, has_grad: Sequence[bool]) -> Optional[list]:
        """Per module (``specs`` order): it has a gradient but no statistics tokens, decided on the flags
        ``has_grad`` and the token counts (pending included) summed over the data-parallel ranks (one small
        collective; every rank gets the same answer). None where no module has a gradient on any rank.
        A host sync."""
        n = len(self.specs)
        counts = torch.tensor([float(g) for g in has_grad] + self.module_tokens(), dtype=torch.float64)
        counts = maybe_all_reduce(counts.to(self.groups[0].device)).cpu().tolist()
        if not any(counts[:n]):
            return None
        return [g > 0 and t == 0 for g, t in zip(counts[:n], counts[n:])]

    def module_factors(self) -> dict:
        """{module name: {"U", "G", "F_A", "F_B", "inv_A", "inv_B", "P_A", "P_B" (r, r), "tokens"}}, CPU copies."""
        out = {}
        for g in self.groups:
            for i, name in enumerate(g.names):
                rows = {"U": g.U[i], "G": g.G[i], "F_A": g.A.F[i], "F_B": g.B.F[i], "inv_A": g.A.inv[i],
                        "inv_B": g.B.inv[i], "P_A": g.A.P[i], "P_B": g.B.P[i]}
                out[name] = {k: v.detach().cpu().clone() for k, v in rows.items()}  # copies, never live views
                out[name]["tokens"] = float(g.C[i])
        return out

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        self.flush_sources()
        return {"steps_since_fold": self.steps_since_fold, "step_open": self._step_open,
                "groups": [g.state() for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        for source in self._sources:
            source.drop()  # statistics queued before the load belong to the state being replaced
        by_name = {tuple(gs["modules"]): gs for gs in state["groups"]}
        for g in self.groups:
            names = tuple(g.names)
            if names not in by_name:
                raise ValueError("the saved GRIT state was taken on other LoRA modules (first ones here: "
                                 f"{list(names[:3])}); load it into a manager built on the same model")
        for g in self.groups:
            g.load(by_name[tuple(g.names)], self.config)
        self.steps_since_fold = int(state["steps_since_fold"])
        self._step_open = bool(state["step_open"])
        self.version += 1
