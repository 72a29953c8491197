"""GRIT with the HF ``Trainer``: ``GritTrainer`` is a Trainer that runs ``manager.step()`` before it clips.

    python examples/hf_trainer.py

A tiny random Llama built from a config (no download) learns a fixed next-token cycle through LoRA
adapters on its attention and MLP projections. Everything else is a normal Trainer run; the GRIT
scalars are logged as ``grit/...`` next to ``loss``.
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from grit import GRITConfig, GRITManager, GritTrainer

VOCAB = 64


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(LlamaForCausalLM(config), lora)


def cycle_dataset(rows: int = 256, length: int = 16, seed: int = 0) -> list[dict]:
    """Each row walks the cycle t -> (t * 5 + 1) mod VOCAB from a random start: learnable next tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in torch.randint(0, VOCAB, (rows,), generator=g).tolist():
        ids = [start]
        for _ in range(length - 1):
            ids.append((ids[-1] * 5 + 1) % VOCAB)
        out.append({"input_ids": ids, "labels": ids})
    return out


def collate(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}


def main(steps: int = 40, output_dir: str | None = None):
    model = tiny_llama()
    manager = GRITManager(model, GRITConfig(kfac_update_freq=10), max_steps=steps)
    args = TrainingArguments(output_dir=output_dir or tempfile.mkdtemp(), max_steps=steps, learning_rate=2e-2,
                             per_device_train_batch_size=8, gradient_accumulation_steps=2, logging_steps=10,
                             report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False)
    trainer = GritTrainer(model=model, args=args, train_dataset=cycle_dataset(), data_collator=collate,
                          grit_manager=manager)
    trainer.train()
    return trainer, manager


if __name__ == "__main__":
    trainer, manager = main()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    print(manager)
    print(f"loss {logged[0]['loss']:.3f} -> {logged[-1]['loss']:.3f}; preconditioned "
          f"{manager.preconditioned_steps} of {manager.optimizer_steps} optimizer steps")
