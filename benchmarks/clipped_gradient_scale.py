"""How large are the LoRA gradients AdamW receives once GRIT preconditions and the Trainer clips?

    python benchmarks/clipped_gradient_scale.py              # smollm2-135m, 6 steps, factors inverted every 2
    python benchmarks/clipped_gradient_scale.py --grafting   # the same with GRITConfig(grafting=True)

Prints, per optimizer step, the median |grad| of the lora_A and lora_B weights as the optimizer sees
them (after GritTrainer's preconditioning and the Trainer's global clip to max_grad_norm=1). The
factors come from the gradient of the mean loss, so G is N^2 smaller than the per-token Fisher and the
preconditioned dA dwarfs dB; after the global clip lora_B's gradients fall below AdamW's eps (1e-8),
which is why the study's GRIT arm stalls without grafting (README, "What these numbers say"). With
``--grafting`` each module's preconditioned gradient keeps its raw gradient's norm, and lora_B's
gradients stay where they were before the first inversion.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from grit import GRITConfig, GRITManager, GritTrainer  # noqa: E402
from grit_study import arms  # noqa: E402
from grit_study.data import PadCollator, as_hf_dataset  # noqa: E402
from grit_study.models import load_peft_model, load_tokenizer  # noqa: E402


def median_abs_grad(model, key: str) -> float:
    values = [p.grad.abs().median() for n, p in model.named_parameters() if p.grad is not None and key in n]
    return float(torch.stack(values).median())


def main(preset_name: str = "smollm2-135m", steps: int = 6, grafting: bool = False) -> None:
    preset = arms.study_preset(preset_name, max_steps=steps)
    tok = load_tokenizer(preset.model_id)
    data = arms.study_data(preset, tok)
    model = load_peft_model(preset)
    manager = GRITManager(model, GRITConfig(kfac_update_freq=2, grafting=grafting))
    rows = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            rows.append((manager.preconditioned_steps, median_abs_grad(model, "lora_A"), median_abs_grad(model, "lora_B")))
            return super().step(closure)

    optimizer = RecordingAdamW([p for p in model.parameters() if p.requires_grad], lr=preset.learning_rate,
                               weight_decay=preset.weight_decay)
    args = TrainingArguments(output_dir="outputs/clipped_gradient_scale", max_steps=steps, report_to="none",
                             per_device_train_batch_size=preset.per_device_train_batch_size,
                             gradient_accumulation_steps=preset.gradient_accumulation_steps,
                             learning_rate=preset.learning_rate, save_strategy="no", seed=preset.seed,
                             use_cpu=preset.device == "cpu", max_grad_norm=preset.max_grad_norm)
    GritTrainer(model=model, args=args, train_dataset=as_hf_dataset(data.train), grit_manager=manager,
                data_collator=PadCollator(tok.pad_token_id), optimizers=(optimizer, None)).train()
    print(f"step  preconditioned_so_far  median|grad lora_A|  median|grad lora_B|   (AdamW eps = {optimizer.defaults['eps']:g})")
    for i, (pre, a, b) in enumerate(rows, 1):
        print(f"{i:4d}  {pre:21d}  {a:19.3e}  {b:19.3e}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--grafting", action="store_true", help="GRITConfig(grafting=True)")
    cli = parser.parse_args()
    main(cli.preset, cli.steps, cli.grafting)
