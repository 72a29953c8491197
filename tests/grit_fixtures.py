"""Tiny PEFT models and batches for the grit core tests (no hub, built in well under a second).

The adapter scale is never 1: lora_alpha != r, and an rsLoRA variant, so a missing or doubled s
shows up in every comparison. ``GRIT_TEST_DEVICE=cuda`` puts the tiny models and batches on a GPU
(references are always computed on the CPU in float64), to check the manager's device code paths.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("GRIT_TEST_DEVICE", "cpu"))

VOCAB = 96


def tiny_lora_model(seed: int = 0, r: int = 4, alpha: int = 12, rslora: bool = False, dtype=torch.float64,
                    adapter: str = "default", targets=("q_proj", "v_proj", "down_proj"), layers: int = 2,
                    hidden: int = 32, init_b: bool = True, meta: bool = False):
    """A 2-layer random Llama (hidden 32) with LoRA on ``targets``. B is randomised (init_b) so ĝ != 0 at once.

    ``meta=True``: built on the ``meta`` device (no storage, B not randomised; the caller materialises it with
    ``to_empty`` and loads weights)."""
    if meta:
        with torch.device("meta"):
            return _tiny_lora_model(seed, r, alpha, rslora, dtype, adapter, targets, layers, hidden, init_b=False)
    return _tiny_lora_model(seed, r, alpha, rslora, dtype, adapter, targets, layers, hidden, init_b).to(DEVICE)


def _tiny_lora_model(seed, r, alpha, rslora, dtype, adapter, targets, layers, hidden, init_b):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=rslora,
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora, adapter_name=adapter)
    if init_b:
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return model


def batch(seed: int, bsz: int = 3, seq: int = 10, pad_lengths=(0, 3, 6)):
    """input_ids, attention_mask (right padding: row i loses pad_lengths[i] positions), labels (-100 on padding)."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(1, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    for i, p in enumerate(pad_lengths[:bsz]):
        if p:
            mask[i, seq - p:] = 0
            ids[i, seq - p:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "labels": labels.to(DEVICE)}


def lora_pairs(model, adapter: str = "default"):
    """[(name, layer)] of LoRA Linear layers in module order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


class BruteForce:
    """Collects per-token u (lora_B's input) and ĝ = dL/du explicitly, independently of grit's hooks.

    A forward pre-hook on every lora_B keeps its input and calls ``retain_grad()``; after backward
    ``u.grad`` is ĝ. Only forwards with grad enabled are kept (use it on a model without gradient
    checkpointing: it is the reference). ``factors()`` returns float64 U, G as grit defines them:
    the sum over kept (mask 1) positions of all recorded micro-batches over their count.
    """

    def __init__(self, model, adapter: str = "default"):
        self.records = {name: [] for name, _ in lora_pairs(model, adapter)}
        self.handles = []
        self.mask = None
        for name, layer in lora_pairs(model, adapter):
            self.handles.append(layer.lora_B[adapter].register_forward_pre_hook(self._make(name)))

    def _make(self, name):
        def pre_hook(module, args):
            u = args[0]
            if torch.is_grad_enabled() and u.requires_grad:
                u.retain_grad()
                self.records[name].append((u, self.mask))
        return pre_hook

    def factors(self):
        out = {}
        for name, recs in self.records.items():
            U = G = 0.0
            n = 0
            for u, mask in recs:
                n_pos = u.shape[0] * u.shape[1]
                keep = (mask.cpu().reshape(-1) != 0) if mask is not None else torch.ones(n_pos, dtype=torch.bool)
                uu = u.detach().cpu().reshape(-1, u.shape[-1]).double()[keep]
                gg = u.grad.cpu().reshape(-1, u.shape[-1]).double()[keep]
                U = U + uu.T @ uu
                G = G + gg.T @ gg
                n += int(keep.sum())
            out[name] = {"U": U / n, "G": G / n, "tokens": n}
        return out

    def clear(self):
        for k in self.records:
            self.records[k] = []

    def close(self):
        for h in self.handles:
            h.remove()


def damped(F, value, mode="relative"):
    """F + λI with GRITConfig's damping rule: relative λ = value·tr(F)/r, absolute λ = value."""
    lam = value * torch.trace(F) / F.shape[0] if mode == "relative" else torch.tensor(value, dtype=F.dtype)
    return F + lam * torch.eye(F.shape[0], dtype=F.dtype)


def dense_natural_gradient(raw, factors, model, pairing="kfac", damping=0.1, mode="relative", adapter="default",
                           swap=False, grafting=False):
    """{name: (∇A', ∇B')} by float64 linear solves: ∇A' = (F_A + λI)^-1 ∇A, ∇B' = ∇B (F_B + λI)^-1.

    raw: {name: (∇A, ∇B)}; factors: {name: {"U", "G"}} (e.g. ``BruteForce.factors()``). Pairing "kfac":
    F_A = G, F_B = U; "reference": F_A = U, F_B = G/s². ``swap`` exchanges F_A and F_B (the wrong pairing,
    for tests that must tell them apart); ``grafting`` rescales each solve to the Frobenius norm of the
    raw gradient it came from.
    """
    out = {}
    for name, layer in lora_pairs(model, adapter):
        U, G = factors[name]["U"], factors[name]["G"]
        s = float(layer.scaling[adapter])
        F_A, F_B = (G, U) if pairing == "kfac" else (U, G / s**2)
        if swap:
            F_A, F_B = F_B, F_A
        gA, gB = raw[name]
        nA = torch.linalg.solve(damped(F_A, damping, mode), gA)
        nB = torch.linalg.solve(damped(F_B, damping, mode), gB.T).T
        if grafting:
            nA, nB = nA * (gA.norm() / nA.norm()), nB * (gB.norm() / nB.norm())
        out[name] = (nA, nB)
    return out


def host(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy (never an alias: on the CPU .cpu()/.double() may return the tensor itself)."""
    return t.detach().cpu().double().clone()


def energy_k(F, threshold, min_rank):
    w = sorted(torch.linalg.eigvalsh(F).clamp_min(0).tolist(), reverse=True)
    total, acc = sum(w), 0.0
    for k, x in enumerate(w, 1):
        acc += x
        if acc / total >= threshold:
            break
    return min(max(k, min_rank), len(w))


def projector(F, k):
    _, V = torch.linalg.eigh(F)
    Vk = V[:, -k:]
    return Vk @ Vk.T


def reference_terms(model, factors, cfg):
    """The regularizers, per module, by autograd from float64 ``factors`` ({name: {"U", "G"}}): the two terms'
    totals and each module's gradients w.r.t. A and B (the projectors from eigh, k by a plain loop).

    The documented formula: λ_k (tr(B F̂_B Bᵀ) + tr(Aᵀ F̂_A A)) + λ_r (||(I-P_A)A||² + ||B(I-P_B)||²),
    where the factor built from G (F_A = G under "kfac", F_B = G/s² under "reference") enters as r·F/tr(F)."""
    total_k = total_r = 0.0
    grads = {}
    r = None
    for name, layer in lora_pairs(model):
        A = layer.lora_A["default"].weight.detach().cpu().double().requires_grad_(True)
        B = layer.lora_B["default"].weight.detach().cpu().double().requires_grad_(True)
        r = A.shape[0]
        U, G = factors[name]["U"], factors[name]["G"]
        s = float(layer.scaling["default"])
        F_A, F_B = (G, U) if cfg.pairing == "kfac" else (U, G / s**2)
        if cfg.enable_rank_adaptation:
            kA = energy_k(F_A, cfg.rank_adaptation_threshold, cfg.min_lora_rank)
            kB = energy_k(F_B, cfg.rank_adaptation_threshold, cfg.min_lora_rank)
        else:
            kA = kB = min(cfg.reprojection_k, r)
        P_A, P_B = projector(F_A, kA), projector(F_B, kB)
        I = torch.eye(r, dtype=torch.float64)
        # The curvature term sees the factor built from G at mean eigenvalue 1 (grit.regularizers).
        if cfg.pairing == "kfac":
            F_A = F_A * r / torch.trace(F_A)
        else:
            F_B = F_B * r / torch.trace(F_B)
        curv = cfg.lambda_kfac * (torch.trace(B @ F_B @ B.T) + torch.trace(A.T @ F_A @ A))
        reproj = cfg.lambda_reproj * ((I - P_A) @ A).pow(2).sum() + cfg.lambda_reproj * (B @ (I - P_B)).pow(2).sum()
        gA, gB = torch.autograd.grad(curv + reproj, (A, B))
        grads[name] = (gA, gB)
        total_k += float(curv.detach())
        total_r += float(reproj.detach())
    return total_k, total_r, grads
