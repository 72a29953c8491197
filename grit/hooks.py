"""Finding the PEFT LoRA layers, and capturing their statistics (U and G sums, padding excluded).

One forward hook per lora_A[adapter] sees u (lora_A's output, (B, T, r)) and, when the forward
builds a graph that a backward will run through (grad enabled and u requires grad), registers a
tensor hook on u. That hook receives ĝ = dL/du (which already holds the adapter scale s) and
queues (u, ĝ). So a position counts exactly when its backward runs:

* reentrant gradient checkpointing: the first forward runs without grad (nothing registered),
  the recomputation in backward registers and fires once;
* non-reentrant checkpointing: only the original graph's hooks fire (the recomputed tensors are
  never backpropagated through);
* evaluation / generation under no_grad: nothing is recorded;
* gradient accumulation: every micro-batch's backward adds.

The queue is flushed at the start of the model's next forward and whenever the manager reads its
statistics (``step()``, ``metrics()``, ``state_dict()``): same-shaped modules are stacked and their
Σuuᵀ, Σĝĝᵀ and token counts computed with one batched matmul each and added to the pending sums
with ``index_add_``. Per-module work in the hooks themselves is only Python bookkeeping: hundreds of
tiny Gram kernels per micro-batch are what made the statistics launch-bound at short sequences.
The price is holding one micro-batch's u and ĝ (2·N·r values per module) until the next forward.

fp16 loss scaling (GradScaler): the backward carries ĝ times the loss scale; with ``loss_scale`` set
(``GRITManager.attach_grad_scaler``) it is divided out at the flush, which happens before the
scaler's ``update()`` can change the scale (the last micro-batch is flushed by ``manager.step()``).

Padding: a forward pre-hook on the model records its ``attention_mask`` (B, T); positions with
mask 0 are excluded with ``torch.where`` (NaN-safe). Without a mask (packed sequences) every
position counts. No host sync anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from .math import rank_space_grams


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
    """Remembers the attention mask of the model's latest forward; hands out keep (N, 1) per device.

    ``on_forward`` runs at the start of every model forward, before the mask is replaced.
    """

    def __init__(self, model: torch.nn.Module, on_forward=None):
        self.mask: torch.Tensor | None = None
        self.mismatches = 0  # lora outputs whose shape did not match the mask (then all positions count)
        self._cache: dict = {}
        self._on_forward = on_forward
        self.handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _pre_forward(self, module, args, kwargs):
        if self._on_forward is not None:
            self._on_forward()
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # forward(input_ids, attention_mask, ...) called positionally
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._cache = {}

    def keep_for(self, u: torch.Tensor):
        """keep for a lora output u (B, T, r): bool (B*T, 1), or None (all positions count)."""
        mask = self.mask
        shape = tuple(u.shape[:-1])
        if mask is not None and shape != tuple(mask.shape):
            self.mismatches += 1
            mask = None
        if mask is None:
            return None
        key = (u.device, shape)
        keep = self._cache.get(key)
        if keep is None:
            keep = mask.to(u.device, non_blocking=True).reshape(-1, 1) != 0
            self._cache[key] = keep
        return keep


class StatCapture:
    """Hooks every module's lora_A and adds its statistics to the pending sums of its factor group.

    ``targets[i] = (pend_U (n, r, r), pend_G (n, r, r), pend_C (n,), row)`` for module i: fp32 tensors the
    flush adds Σuuᵀ, Σĝĝᵀ and the token count to, at index ``row``.
    """

    # Largest stacked (k, N, r) block a flush materialises in fp32, in elements (16 MiB).
    CHUNK_ELEMENTS = 1 << 22

    def __init__(self, model: torch.nn.Module, lora_As: list, targets: list):
        self.masks = MaskTracker(model, on_forward=self.flush)
        self.enabled = True
        # fp16 loss scaling: a callable returning the current scale (a device tensor), or None. The
        # backward then carries ĝ times the scale, which is divided out before it enters G.
        self.loss_scale = None
        self.targets = targets
        self._queue: list = []
        self._index_cache: dict = {}
        self.handles = [self.masks.handle]
        for i, lora_A in enumerate(lora_As):
            self.handles.append(lora_A.register_forward_hook(self._make_forward_hook(i)))

    def _make_forward_hook(self, i: int):
        def forward_hook(module, inputs, u):
            if not (self.enabled and torch.is_grad_enabled() and isinstance(u, torch.Tensor) and u.requires_grad):
                return
            keep = self.masks.keep_for(u)
            u_saved = u.detach()  # no reference cycle through u's own hook
            queue = self._queue

            def on_grad(g_hat):
                queue.append((i, u_saved, g_hat.detach(), keep))

            u.register_hook(on_grad)
        return forward_hook

    @torch.no_grad()
    def flush(self) -> None:
        """Add every queued (u, ĝ) to the pending sums: one batched Gram per group of same-shaped modules."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        buckets: dict = {}
        for i, u, g, keep in queue:
            pend_U = self.targets[i][0]
            key = (id(pend_U), u.shape, u.dtype, g.dtype, None if keep is None else id(keep))
            buckets.setdefault(key, []).append((i, u, g, keep))
        scale = self.loss_scale() if self.loss_scale is not None else None
        for items in buckets.values():
            pend_U, pend_G, pend_C, _ = self.targets[items[0][0]]
            r = items[0][1].shape[-1]
            n_tokens = items[0][1].numel() // r
            step = max(1, self.CHUNK_ELEMENTS // max(1, n_tokens * r))
            for start in range(0, len(items), step):
                chunk = items[start:start + step]
                index = self._index([self.targets[i][3] for i, *_ in chunk], pend_U.device)
                u = torch.stack([x[1].reshape(n_tokens, r) for x in chunk])
                g = torch.stack([x[2].reshape(n_tokens, r) for x in chunk])
                if scale is not None:
                    g = g.float() / scale
                UU, GG, count = rank_space_grams(u, g, chunk[0][3])
                pend_U.index_add_(0, index, UU)
                pend_G.index_add_(0, index, GG)
                pend_C.index_add_(0, index, count.expand(len(chunk)))

    def _index(self, rows: list, device: torch.device) -> torch.Tensor:
        # The same modules come in the same order every micro-batch: build each index tensor once.
        key = (tuple(rows), device)
        index = self._index_cache.get(key)
        if index is None:
            index = torch.tensor(rows, dtype=torch.long, device=device)
            self._index_cache[key] = index
        return index

    def drop(self) -> None:
        """Forget the queued statistics (a loaded state replaces the pending sums)."""
        self._queue = []

    def remove(self) -> None:
        self.flush()
        for h in self.handles:
            h.remove()
        self.handles = []
