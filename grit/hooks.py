"""Finding the PEFT LoRA layers, and capturing their statistics (U and G sums, padding excluded).

One forward hook per lora_A[adapter] sees u (lora_A's output, (B, T, r)) and, when the forward
builds a graph that a backward will run through (grad enabled and u requires grad), registers a
tensor hook on u. That hook receives ĝ = dL/du (which already holds the adapter scale s) and adds
the Gram matrix of v = [u, ĝ, 1] (N, 2r+1) over the kept positions to the module's pending sum:
its blocks are Σuuᵀ, Σĝĝᵀ and the token count, all from one matmul. So a position counts
exactly when its backward runs:

* reentrant gradient checkpointing: the first forward runs without grad (nothing registered),
  the recomputation in backward registers and fires once;
* non-reentrant checkpointing: only the original graph's hooks fire (the recomputed tensors are
  never backpropagated through);
* evaluation / generation under no_grad: nothing is recorded;
* gradient accumulation: every micro-batch's backward adds.

fp16 loss scaling (GradScaler): the backward carries ĝ times the loss scale; with ``loss_scale`` set
(``GRITManager.attach_grad_scaler``) it is divided out first, so G does not depend on the scale.

Padding: a forward pre-hook on the model records its ``attention_mask`` (B, T); positions with
mask 0 are excluded with ``torch.where`` (NaN-safe). Without a mask (packed sequences) every
position counts. Cost per module and micro-batch: one concat, one masked (2r+1)^2 Gram matmul
accumulated in place (a dtype cast first if the LoRA runs in 16 bit), no host sync.
"""

from __future__ import annotations

import torch
from torch import nn

from .math import accumulate_gram_


def _active_adapter(model: nn.Module, layers: list, wanted: str | None) -> str:
    if wanted is not None:
        return wanted
    active = getattr(model, "active_adapter", None)
    if active is None and layers:
        active = layers[0].active_adapters
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"the model has active adapters {list(active)}; set GRITConfig.adapter_name to the "
                             "one GRIT should precondition")
        active = active[0]
    return active


def find_lora_layers(model: nn.Module, adapter_name: str | None = None):
    """[(name, layer)] of PEFT LoRA layers with a Linear adapter ``adapter`` (plain or bnb base), and the adapter."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]
    adapter = _active_adapter(model, [m for _, m in layers], adapter_name)
    found = []
    for name, mod in layers:
        if adapter not in mod.lora_A:
            continue
        if not isinstance(mod.lora_A[adapter], nn.Linear) or not isinstance(mod.lora_B[adapter], nn.Linear):
            continue  # conv / embedding LoRA: no rank-space Linear pair to precondition
        if adapter in getattr(mod, "lora_variant", {}):
            raise ValueError(f"{name}: adapter {adapter!r} uses a LoRA variant (DoRA, ...); GRIT supports vanilla "
                             "LoRA only")
        found.append((name, mod))
    if not found:
        names = sorted({a for _, m in layers for a in m.lora_A})
        raise ValueError(f"no PEFT LoRA Linear layer with adapter {adapter!r} in the model (adapters found: "
                         f"{names}); wrap it with peft.get_peft_model or set GRITConfig.adapter_name")
    return found, adapter


class MaskTracker:
    """Remembers the attention mask of the model's latest forward; hands out (keep (N, 1), ones (N, 1)) per device."""

    def __init__(self, model: torch.nn.Module):
        self.mask: torch.Tensor | None = None
        self.mismatches = 0  # lora outputs whose shape did not match the mask (then all positions count)
        self._cache: dict = {}
        self.handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _pre_forward(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # forward(input_ids, attention_mask, ...) called positionally
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._cache = {}

    def keep_for(self, u: torch.Tensor):
        """(keep, ones) for a lora output u (B, T, r): keep bool (B*T, 1) or None (all positions); ones (B*T, 1)."""
        mask = self.mask
        shape = tuple(u.shape[:-1])
        if mask is not None and shape != tuple(mask.shape):
            self.mismatches += 1
            mask = None
        key = (u.device, u.dtype, shape, mask is None)
        cached = self._cache.get(key)
        if cached is None:
            keep = None if mask is None else mask.to(u.device, non_blocking=True).reshape(-1, 1) != 0
            cached = (keep, torch.ones(u.numel() // u.shape[-1], 1, device=u.device, dtype=u.dtype))
            self._cache[key] = cached
        return cached


class StatCapture:
    """Hooks every module's lora_A; ``slots[i]`` is a (2r+1, 2r+1) fp32 view the module's Grams are added to."""

    def __init__(self, model: torch.nn.Module, lora_As: list, slots: list):
        self.masks = MaskTracker(model)
        self.enabled = True
        # fp16 loss scaling: a callable returning the current scale (a device tensor), or None. The
        # backward then carries ĝ times the scale, which is divided out before it enters G.
        self.loss_scale = None
        self.slots = slots
        self.handles = [self.masks.handle]
        for i, lora_A in enumerate(lora_As):
            self.handles.append(lora_A.register_forward_hook(self._make_forward_hook(i)))

    def _make_forward_hook(self, i: int):
        def forward_hook(module, inputs, u):
            if not (self.enabled and torch.is_grad_enabled() and isinstance(u, torch.Tensor) and u.requires_grad):
                return
            keep, ones = self.masks.keep_for(u)
            u_saved = u.detach()  # no reference cycle through u's own hook
            pending = self.slots[i]
            r = u.shape[-1]

            def on_grad(g_hat):
                with torch.no_grad():
                    if self.loss_scale is not None:
                        g_hat = g_hat.float() / self.loss_scale()
                    v = torch.cat([u_saved.reshape(-1, r), g_hat.reshape(-1, r).to(u_saved.dtype), ones], dim=1)
                    accumulate_gram_(pending, v, keep)

            u.register_hook(on_grad)
        return forward_hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
