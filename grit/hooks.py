"""Capturing the LoRA layers' statistics (U and G sums, padding excluded) for ``grit.factors``.

One forward hook per lora_A[adapter] sees u (lora_A's output, (B, T, r)) and, when the forward
builds a graph that a backward will run through (grad enabled and u requires grad), registers a
tensor hook on u. That hook receives ĝ = dL/du (which already holds the adapter scale s) and
queues (u, ĝ). So a position counts exactly when its backward runs:

* reentrant gradient checkpointing: the first forward runs without grad (nothing registered),
  the recomputation in backward registers and fires once;
* non-reentrant checkpointing: only the original graph's hooks fire (the recomputed tensors are
  never backpropagated through);
* evaluation / generation under no_grad: nothing is recorded;
* gradient accumulation: every micro-batch's backward adds (with ``stride`` k > 1 only every k-th
  micro-batch of an optimizer step: the forward hooks of the others register nothing).

The queue is flushed at the start of the model's next forward, by ``manager.step()``, and whenever
the factor state reads its pending sums (``grit.factors.FactorState`` flushes its sources): modules
of one factor bucket with the same shapes are stacked, their Σuuᵀ, Σĝĝᵀ and token counts computed
with one batched matmul each and handed to ``FactorState.accumulate``. Per-module work in the hooks
themselves is only Python bookkeeping: hundreds of tiny Gram kernels per micro-batch are what made
the statistics launch-bound at short sequences.
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

from .kfac_math import rank_space_grams


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
    """Hooks every module's lora_A and hands its statistics to ``sink`` (a ``grit.factors.FactorState``).

    Module i is ``lora_As[i]``; at a flush its Σuuᵀ, Σĝĝᵀ and token count go to
    ``sink.accumulate([i, ...], UU, GG, count)``, batched over the modules of one ``sink.bucket(i)``
    with the same shapes. The capture registers itself with the sink, which flushes it before reading.
    """

    # Largest stacked (k, N, r) block a flush materialises in fp32, in elements (16 MiB).
    CHUNK_ELEMENTS = 1 << 22

    def __init__(self, model: torch.nn.Module, lora_As: list, sink, stride: int = 1):
        self.masks = MaskTracker(model, on_forward=self._on_model_forward)
        # Micro-batches (training forwards of the model) since the last new_step(); with stride k only those
        # with index % k == 0 are captured. A backward's recomputed forwards (reentrant checkpointing) run
        # after their own model forward and before the next, so they follow its decision.
        self.stride = int(stride)
        self._micro = 0
        self._skip = False
        # fp16 loss scaling: a callable returning the current scale (a device tensor), or None. The
        # backward then carries ĝ times the scale, which is divided out before it enters G.
        self.loss_scale = None
        self.sink = sink
        self._n_modules = len(lora_As)
        self._bucket = None  # asked at the first flush: the sink lays out its state at first use, not now
        self._queue: list = []
        self.handles = [self.masks.handle]
        for i, lora_A in enumerate(lora_As):
            self.handles.append(lora_A.register_forward_hook(self._make_forward_hook(i)))
        sink.add_source(self)

    def _on_model_forward(self) -> None:
        self.flush()
        if torch.is_grad_enabled():  # a training micro-batch (evaluation under no_grad is not counted)
            self._skip = self._micro % self.stride != 0
            self._micro += 1

    def new_step(self) -> None:
        """An optimizer step ended: the next micro-batch is the first of a step again."""
        self._micro = 0

    def _make_forward_hook(self, i: int):
        def forward_hook(module, inputs, u):
            if self._skip or not (torch.is_grad_enabled() and isinstance(u, torch.Tensor) and u.requires_grad):
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
        """Hand every queued (u, ĝ) over to the sink: one batched Gram per group of same-shaped modules."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        if self._bucket is None:
            self._bucket = [self.sink.bucket(i) for i in range(self._n_modules)]
        buckets: dict = {}
        for i, u, g, keep in queue:
            key = (self._bucket[i], u.shape, u.dtype, g.dtype, None if keep is None else id(keep))
            buckets.setdefault(key, []).append((i, u, g, keep))
        scale = self.loss_scale() if self.loss_scale is not None else None
        for items in buckets.values():
            r = items[0][1].shape[-1]
            n_tokens = items[0][1].numel() // r
            step = max(1, self.CHUNK_ELEMENTS // max(1, n_tokens * r))
            for start in range(0, len(items), step):
                chunk = items[start:start + step]
                u = torch.stack([x[1].reshape(n_tokens, r) for x in chunk])
                g = torch.stack([x[2].reshape(n_tokens, r) for x in chunk])
                if scale is not None:
                    g = g.float() / scale
                UU, GG, count = rank_space_grams(u, g, chunk[0][3])
                self.sink.accumulate([x[0] for x in chunk], UU, GG, count)

    def drop(self) -> None:
        """Forget the queued statistics (a loaded state replaces the pending sums)."""
        self._queue = []

    def remove(self) -> None:
        self.flush()
        for h in self.handles:
            h.remove()
        self.handles = []
