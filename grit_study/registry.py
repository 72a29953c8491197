"""Every arm of the study, defined once: ``make study``, ``make ablations``, ``make sweep``, notebook
02's ``ARM`` parameter and ``03_compare`` all read this table, and every run records its arm's full
definition (``ArmSpec.to_dict()``) in ``run_summary.json``.

    from grit_study.registry import ARMS, get_arm
    spec = get_arm("grit_sgd")   # SGD with momentum 0.9 + GRIT (grafting kept)

What an arm may differ in: the stack (Unsloth + TRL, or HF + PEFT), the optimizer family (the
preset's AdamW, or SGD with momentum), GRIT's settings (None: no GRIT object is built at all), a peer
optimizer from PEFT itself, and the published padding artifact. Everything else (data, batches,
LoRA init, schedule, precision, evaluation) is the preset's and the same for every arm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STACKS = ("unsloth+trl", "hf+peft")
OPTIMIZERS = ("adamw", "sgd")
PEERS = ("riemannian", "loraplus")

# K-FAC is built for SGD with momentum (kfac-pytorch's examples; tensorflow/kfac issue 25 on Adam).
SGD_MOMENTUM = 0.9

# The published GRIT code's own settings that our GRITConfig departs from by default.
PUBLISHED_GRIT = {"pairing": "reference", "grafting": False, "kfac_damping": 1e-3, "kfac_damping_mode": "absolute"}
PUBLISHED_LAMBDAS = {"lambda_kfac": 1e-5, "lambda_reproj": 1e-4}
# Issue 12's regularizer ablation: do the terms act at all at 100 and 10,000 times their published weights?
REG_SCALES = (100, 10_000)


@dataclass(frozen=True)
class ArmSpec:
    name: str = field(metadata={"help": "The arm's name: the run directory prefix and the comparison's key."})
    description: str = field(metadata={"help": "One line for tables and notebooks."})
    stack: str = field(default="hf+peft", metadata={"help": f"One of {STACKS}."})
    notebook: str = field(default="02_pure_grit", metadata={"help": "The notebook that runs this arm."})
    optimizer: str = field(
        default="adamw",
        metadata={"help": "'adamw': the preset's optimizer (fused AdamW on CPU, bnb 8-bit AdamW on CUDA); 'sgd': "
                  f"torch SGD with momentum {SGD_MOMENTUM} (HF optim 'sgd', optim_args)."})
    grit: dict | None = field(
        default=None,
        metadata={"help": "GRITConfig fields over its defaults; None builds no GRIT object at all. lora_rank and "
                  "kfac_update_freq come from the preset; an arm that reprojects does so every max_steps // 4 "
                  "steps (grit_study.arms.grit_config): GRIT's frequencies belong to the run length."})
    peer: str | None = field(
        default=None,
        metadata={"help": f"A PEFT optimizer factory ({PEERS}) wrapped around the control's exact optimizer class."})
    peer_args: dict = field(default_factory=dict, metadata={"help": "Keyword arguments of the peer factory."})
    loss_on_padding: bool = field(default=False, metadata={"help": "The published padding artifact (never a default)."})
    group: str = field(default="study", metadata={"help": "'study' (make study), 'sweep', 'ablation', or 'claims' "
                                                          "(issue 12: GRIT's parameter and drift claims)."})

    def __post_init__(self):
        if self.stack not in STACKS:
            raise ValueError(f"arm {self.name}: stack must be one of {STACKS}, got {self.stack!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"arm {self.name}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.peer is not None and self.peer not in PEERS:
            raise ValueError(f"arm {self.name}: peer must be None or one of {PEERS}, got {self.peer!r}")
        if self.peer is not None and self.grit is not None:
            raise ValueError(f"arm {self.name}: a peer optimizer arm runs without GRIT (grit=None)")
        if self.stack == "unsloth+trl" and (self.grit is not None or self.peer is not None or self.optimizer != "adamw"):
            raise ValueError(f"arm {self.name}: the Unsloth baseline runs the preset's AdamW, without GRIT or a peer")

    @property
    def lr_family(self) -> str:
        """Arms whose learning rates live on one scale: 'adamw' (AdamW and the AdamW-based peers) or 'sgd'."""
        return self.optimizer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ARMS = [
    ArmSpec("baseline", "Unsloth FastLanguageModel + TRL SFTTrainer (the seed protocol)", stack="unsloth+trl",
            notebook="01_baseline_qlora_unsloth"),
    ArmSpec("control", "HF + PEFT QLoRA, GRIT off: GRIT's exact stack"),
    ArmSpec("grit", "rank-space K-FAC natural gradient (our pairing, relative damping, grafting) + both "
            "regularizers at the published weights", grit={}),
    ArmSpec("grit_published", "the authors' recipe as far as our code has it: published pairing, no grafting, "
            "absolute damping 1e-3", grit=dict(PUBLISHED_GRIT), group="sweep"),
    ArmSpec("control_sgd", f"the control under SGD with momentum {SGD_MOMENTUM}", optimizer="sgd", group="sweep"),
    ArmSpec("grit_sgd", f"GRIT under SGD with momentum {SGD_MOMENTUM} (grafting kept)", optimizer="sgd", grit={},
            group="sweep"),
    ArmSpec("riemannian", "PEFT's Riemannian preconditioned LoRA (scaled AdamW, Zhang & Pilanci 2024); it "
            "preconditions inside optimizer.step(), after the Trainer's clip (GRIT: before)", peer="riemannian",
            peer_args={"reg": 1e-2}, group="sweep"),
    ArmSpec("loraplus", "PEFT's LoRA+ (lora_B learning rate x16)", peer="loraplus", peer_args={"loraplus_lr_ratio": 16},
            group="sweep"),
    ArmSpec("ng_only", "GRIT's natural gradient without the regularizers", grit={"lambda_kfac": 0.0,
            "lambda_reproj": 0.0}, group="ablation"),
    ArmSpec("reg_only", "GRIT's regularizers without the natural gradient",
            grit={"precondition": False, **PUBLISHED_LAMBDAS}, group="ablation"),
    ArmSpec("reference", "GRIT with the published pairing (otherwise our defaults)", grit={"pairing": "reference"},
            group="ablation"),
    ArmSpec("padding_artifact", "GRIT trained as the published pipeline padded (EOS to max length, labels = "
            "input_ids)", grit={}, loss_on_padding=True, group="ablation"),
    ArmSpec("grit_no_grafting", "GRIT without grafting (the published scale)", grit={"grafting": False},
            group="ablation"),
    ArmSpec("padding_artifact_baseline", "the baseline trained as the published GRIT pipeline padded",
            stack="unsloth+trl", notebook="01_baseline_qlora_unsloth", loss_on_padding=True, group="ablation"),
    # control_rk (LoRA trained with rank_pattern = grit_full's k) is not static: its ranks come from a
    # trained grit_full run, so it is built from that run, not listed here.
    ArmSpec("grit_full", "the grit arm plus the published reprojection A <- P_A A, B <- B P_B every "
            "max_steps // 4 steps, the published 50 of 200 (rank adaptation on: energy-rank projectors)",
            grit={"enable_reprojection": True}, group="claims"),
    ArmSpec("grit_ema", "the grit arm with stat_update='ema' (per-step decay) instead of the running mean",
            grit={"stat_update": "ema"}, group="claims"),
    *(ArmSpec(f"grit_reg_x{scale}", f"the grit arm with both regularizer weights x{scale:,} the published ones",
              grit={k: v * scale for k, v in PUBLISHED_LAMBDAS.items()}, group="claims") for scale in REG_SCALES),
]
ARMS: dict[str, ArmSpec] = {a.name: a for a in _ARMS}


def get_arm(name: str) -> ArmSpec:
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; the registry (grit_study.registry.ARMS) has {sorted(ARMS)}")
    return ARMS[name]


def arms_in(group: str) -> list[ArmSpec]:
    return [a for a in _ARMS if a.group == group]
