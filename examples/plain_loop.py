"""GRIT in a plain PyTorch loop: torch + peft only, a tiny model, a task it can learn, one CPU minute.

    python examples/plain_loop.py

The model reads a token and predicts the next one of a fixed cycle (token t is followed by (t * 7 + 3) mod V);
LoRA adapters on its two hidden Linear layers learn the map. The one GRIT line is ``manager.step()``,
between ``backward()`` and ``optimizer.step()`` (the kfac-pytorch convention): it preconditions the LoRA
gradients with the rank-space K-FAC Fisher once the factors have been inverted (every
``kfac_update_freq`` steps).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from grit import GRITConfig, GRITManager

VOCAB, WIDTH = 32, 64


class NextToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, labels=None):
        h = torch.relu(self.fc1(self.embed(input_ids)))      # (B, T, WIDTH)
        logits = self.head(torch.relu(self.fc2(h)))           # (B, T, VOCAB)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def batch(generator: torch.Generator, size: int = 16, length: int = 8) -> dict:
    ids = torch.randint(0, VOCAB, (size, length), generator=generator)
    return {"input_ids": ids, "labels": (ids * 7 + 3) % VOCAB}


def main(steps: int = 60, micro_batches: int = 2, seed: int = 0) -> tuple[GRITManager, list[float]]:
    torch.manual_seed(seed)
    # lora_alpha != r, so the adapter scale s = alpha / r is not 1 (GRIT's factors carry it).
    model = get_peft_model(NextToken(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    config = GRITConfig(kfac_update_freq=10, kfac_min_samples=64)
    # max_steps lets the manager refuse, up front, a schedule that could never precondition.
    manager = GRITManager(model, config, max_steps=steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        total = 0.0
        for _ in range(micro_batches):
            loss = model(**batch(generator)) / micro_batches
            loss.backward()
            total += loss.item()
        manager.step()          # regularize, precondition and graft the LoRA gradients (changes .grad only)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    manager.close()
    return manager, losses


if __name__ == "__main__":
    manager, losses = main()
    print(manager)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; preconditioned {manager.preconditioned_steps} of "
          f"{manager.optimizer_steps} optimizer steps")
