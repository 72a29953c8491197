"""Finding the PEFT LoRA layers GRIT preconditions (discovery only; capturing their statistics is ``grit.hooks``)."""

from __future__ import annotations

from torch import nn


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
