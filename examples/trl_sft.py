"""GRIT with TRL's ``SFTTrainer``: a trainer you do not subclass gets ``GritCallback``.

    python examples/trl_sft.py

A tiny random Llama (no download) and a character-level tokenizer built in memory learn to answer
"reverse: abc" with "cba". SFTTrainer tokenizes the prompt-completion rows itself and computes the loss
on the completion only; ``GritCallback(manager).install(trainer)`` preconditions in
``on_pre_optimizer_step`` and re-clips (the Trainer clipped the raw gradient before the callback runs).

TRL 1.15's SFTTrainer computes its loss with a Triton kernel (a fused, chunked LM head). Without a CUDA GPU,
Triton's interpreter (``TRITON_INTERPRET=1``) runs that kernel on the CPU, slowly, which is why this example
keeps to a dozen short steps there.
"""

from __future__ import annotations

import os
import random
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before trl imports triton
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from grit import GRITConfig, GRITManager, GritCallback

LETTERS = "abcdefgh"


def char_tokenizer() -> PreTrainedTokenizerFast:
    symbols = ["<pad>", "<eos>"] + sorted(set(LETTERS + "reverse: "))
    core = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def reverse_rows(n: int = 256, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(n)]
    return Dataset.from_list([{"prompt": f"reverse: {w} ", "completion": w[::-1]} for w in words])


def main(steps: int = 12, output_dir: str | None = None):
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      task_type="CAUSAL_LM"))
    manager = GRITManager(model, GRITConfig(kfac_update_freq=4), max_steps=steps)
    args = SFTConfig(output_dir=output_dir or tempfile.mkdtemp(), max_steps=steps, learning_rate=1e-2,
                     per_device_train_batch_size=8, gradient_accumulation_steps=2, logging_steps=1,
                     report_to="none", save_strategy="no", use_cpu=True, max_length=32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=reverse_rows(), processing_class=tokenizer)
    GritCallback(manager).install(trainer)  # first in the callback list, so loggers see the grit/ metrics
    trainer.train()
    return trainer, manager


if __name__ == "__main__":
    trainer, manager = main()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    print(manager)
    print(f"loss {logged[0]['loss']:.3f} -> {logged[-1]['loss']:.3f}; preconditioned "
          f"{manager.preconditioned_steps} of {manager.optimizer_steps} optimizer steps")
