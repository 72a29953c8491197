"""Per-optimizer-step cost of GRIT against the same stack without it: time and peak memory.

    # CPU (default): the study's smollm2-135m preset, 4-bit NF4, LoRA r=16 on 7 projections, 2 x 4 micro-batches
    python benchmarks/step_overhead.py
    # GPU: a random Llama-3-8B-shaped model quantized to NF4 on the card, seq 512 and 2048 (no hub access)
    python benchmarks/step_overhead.py --model llama3-8b-shaped

Arms. "control": PEFT model + optimizer, no GRIT object at all. "grit": an identical model (same
weights, same LoRA init) with a ``GRITManager`` as the study runs it: natural gradient on, both
regularizers on (GRITConfig defaults: lambda_kfac 1e-5, lambda_reproj 1e-4), factors updated and
inverted every ``--kfac-update-freq`` steps (default 5, more often than the study's setting, so
the timed window holds 4 inversion steps and the mean includes them).

One optimizer step is what the HF Trainer does (transformers 5.17 ``_run_epoch``): forward + backward
of each micro-batch with the loss normalised by the step's label-token count, [grit:
``manager.step()``], clip to max_grad_norm 1.0, optimizer step, zero_grad, and at logging steps
(``--logging-steps``, the presets log every step) the loss ``.item()`` plus, in the grit arm,
``manager.metrics()`` (GritTrainer logs them there). The loop is written out instead of running two
``Trainer.train()`` so that the arms can alternate step by step; the Trainer's own per-step work
(callbacks, ...) is the same in both arms and left out, which makes the ratio slightly pessimistic.

Why both arms live in one process for timing: the 2-core CPU machine is shared and its speed drifts
by tens of percent over minutes (and GPU clocks drift with temperature). Alternating the arms step
by step (control, grit, grit, control, ...) on the same batches exposes both to the same drift;
running them one after the other would put the drift into the ratio. Both models fit easily
(smollm2: 2 x ~0.2 GB; 8B NF4: 2 x ~8 GB on an 80 GB card).

Why memory is measured differently: on CPU the only peak counter is the process's peak RSS, so each
arm runs alone in its own subprocess (same load, same warm-up), the peak counter is reset after the
first step (``/proc/self/clear_refs`` = 5 resets VmHWM) and read after ``--mem-steps`` steps that
include an inversion. Load-time peaks are thereby excluded (they are identical and would dilute the
ratio). On the GPU ``torch.cuda.max_memory_allocated`` is exact per allocation, so the timing
process measures it: the peak of each of the arm's steps minus the bytes the other (idle) arm holds.

Output: a compact table per sequence length (median and mean s/step, p10-p90, min-max, peak
memory, GRIT/control ratios, time inside ``manager.step()``), and ``--json PATH`` for the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- models and data

def build_smollm2(args):
    """The study's CPU stack for ``args.preset``: load_peft_model (NF4, fp32 compute, checkpointing) + study data."""
    from grit.study import PadCollator, build_study_data, load_peft_model, load_tokenizer, resolve_preset

    preset = resolve_preset(args.preset)
    model = load_peft_model(preset)
    tok = load_tokenizer(preset.model_id)
    need = (args.warmup + args.steps) * args.batch * args.accum
    data = build_study_data(tok, source=preset.data, template=preset.template,
                            max_seq_length=preset.max_seq_length, val_size=preset.val_size,
                            num_examples=max(preset.num_examples, need + preset.val_size), seed=preset.seed)
    collate = PadCollator(pad_token_id=tok.pad_token_id)
    examples = data.train[:need] if len(data.train) >= need else (data.train * (need // len(data.train) + 1))[:need]
    batches = [collate(examples[i:i + args.batch]) for i in range(0, need, args.batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=preset.learning_rate,
                                  weight_decay=preset.weight_decay, fused=True)
    return model, optimizer, batches, preset


def quantize_llama_nf4(model, compute_dtype, device: str = "cuda"):
    """Replace every decoder nn.Linear by a bitsandbytes NF4 Linear4bit (double quant), quantized on ``device``."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                q = q.to(device)  # quantizes here
                setattr(parent, name, q)
                del lin
    model.is_loaded_in_4bit = True  # PEFT then picks its bnb LoRA layer
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def build_llama8b_shaped(args):
    """A random Llama-3-8B-shaped model built on the GPU in bf16, NF4-quantized, prepared and wrapped like the study."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_id=128001)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = quantize_llama_nf4(model, torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(3407)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, bias="none",
                                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    return model, optimizer


def random_batches(n: int, batch: int, seq: int, vocab: int = 128256, seed: int = 0) -> list[dict]:
    """Full-length random sequences on the GPU (every position real: the most statistics work per step)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        out.append({"input_ids": ids.cuda(), "labels": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda()})
    return out


def grit_config(args, r: int):
    from grit import GRITConfig

    return GRITConfig(lora_rank=r, kfac_update_freq=args.kfac_update_freq, precondition=True,
                      lambda_kfac=args.lambda_kfac, lambda_reproj=args.lambda_reproj)


# ----------------------------------------------------------------------------- one optimizer step

@dataclass
class Arm:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    manager: object = None
    times: list = field(default_factory=list)
    grit_times: list = field(default_factory=list)
    peaks: list = field(default_factory=list)

    def step(self, batches: list[dict], log: bool, cuda: bool) -> tuple[float, float]:
        """One optimizer step over ``batches``; returns (wall seconds, seconds inside manager.step())."""
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # Trainer: num_items_in_batch
        tr_loss = None
        for b in batches:
            loss = self.model(**b, num_items_in_batch=n_items).loss
            loss.backward()
            tr_loss = loss.detach() if tr_loss is None else tr_loss + loss.detach()
        t_grit = 0.0
        if self.manager is not None:
            sync()
            t1 = time.perf_counter()
            self.manager.step()
            sync()
            t_grit = time.perf_counter() - t1
        params = [p for p in self.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if log:
            tr_loss.item()
            if self.manager is not None:
                self.manager.metrics()
        sync()
        return time.perf_counter() - t0, t_grit


def build_cpu_arms(args):
    """(control, grit, batches, description) on CPU: two identical study models, one with a GRITManager."""
    from grit import GRITManager

    arms, batches, preset = [], None, None
    for name in ("control", "grit"):
        model, opt, batches, preset = build_smollm2(args)
        arms.append(Arm(name, model, opt, GRITManager(model, grit_config(args, preset.lora_r))
                        if name == "grit" else None))
    ckpt = "gradient checkpointing" if preset.gradient_checkpointing else "no checkpointing"
    quant = "NF4 double quant" if preset.load_in_4bit else "no quantization"
    desc = (f"preset {args.preset} (study stack: {quant}, {preset.compute_dtype} compute, {ckpt}), LoRA r={preset.lora_r} "
            f"on {len(arms[1].manager.lora_modules)} modules, fused AdamW, batch {args.batch} x accum {args.accum}, "
            "study data")
    return arms[0], arms[1], batches, desc


# ----------------------------------------------------------------------------- measurement

def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then includes loading (the same in both arms)
        pass


def memory_child(args) -> None:
    """Subprocess body: one arm alone, peak RSS over --mem-steps steps after one warm-up step; prints JSON."""
    from grit import GRITManager

    model, opt, batches, preset = build_smollm2(args)
    arm = Arm(args.memory_arm, model, opt, GRITManager(model, grit_config(args, preset.lora_r))
              if args.memory_arm == "grit" else None)
    steps = [batches[i * args.accum:(i + 1) * args.accum] for i in range(len(batches) // args.accum)]
    arm.step(steps[0], log=True, cuda=False)
    gc.collect()
    reset_peak_rss()
    for i in range(1, args.mem_steps + 1):
        arm.step(steps[i % len(steps)], log=(i % args.logging_steps == 0), cuda=False)
    out = {"arm": args.memory_arm, "peak_rss_mib": peak_rss_mib(),
           "inversions": getattr(arm.manager, "inversions", 0)}
    print("MEMORY_JSON " + json.dumps(out), flush=True)


def memory_subprocesses(args) -> dict:
    out = {}
    for arm in ("control", "grit"):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--memory-arm", arm, "--mem-steps",
               str(args.mem_steps), "--kfac-update-freq", str(args.kfac_update_freq), "--batch", str(args.batch),
               "--accum", str(args.accum), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--lambda-kfac", str(args.lambda_kfac), "--lambda-reproj", str(args.lambda_reproj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in res.stdout.splitlines() if x.startswith("MEMORY_JSON ")), None)
        if res.returncode != 0 or line is None:
            raise RuntimeError(f"memory subprocess for {arm} failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
        out[arm] = json.loads(line[len("MEMORY_JSON "):])
        print(f"  memory[{arm}]: peak RSS {out[arm]['peak_rss_mib']:.0f} MiB over {args.mem_steps} steps "
              f"({out[arm]['inversions']} inversions)", flush=True)
    return out


def summarize(xs: list[float]) -> dict:
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, max(0, round(f * (len(s) - 1))))]  # noqa: E731
    return {"median": statistics.median(s), "mean": statistics.fmean(s), "p10": q(0.1), "p90": q(0.9),
            "min": s[0], "max": s[-1], "n": len(s)}


def run_interleaved(control: Arm, grit: Arm, step_batches, args, cuda: bool, resident: dict | None = None) -> dict:
    """Warm-up then timed steps, alternating control/grit (ABBA order) on the same batches.

    GPU: ``resident[arm]`` = bytes that arm holds while idle; an arm's peak is the max_memory_allocated of
    its own step minus the other arm's resident bytes.
    """
    for arm in (control, grit):
        arm.times, arm.grit_times, arm.peaks = [], [], []
    inv0 = pre0 = None
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        if i == args.warmup:
            inv0, pre0 = grit.manager.inversions, grit.manager.preconditioned_steps
        order = (control, grit) if i % 2 == 0 else (grit, control)
        batches = step_batches(i)
        for arm in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            dt, dg = arm.step(batches, (i + 1) % args.logging_steps == 0, cuda)
            if timed:
                arm.times.append(dt)
                arm.grit_times.append(dg)
                if cuda:
                    other = grit if arm is control else control
                    arm.peaks.append(torch.cuda.max_memory_allocated() - resident[other.name])
        if timed:
            print(f"  step {i - args.warmup + 1}/{args.steps}: control {control.times[-1]:.3f}s "
                  f"grit {grit.times[-1]:.3f}s (manager.step {grit.grit_times[-1] * 1e3:.1f} ms)", flush=True)
        else:
            print(f"  warm-up step {i + 1}/{args.warmup} done", flush=True)
    return {"control": summarize(control.times), "grit": summarize(grit.times),
            "grit_step_s": summarize(grit.grit_times),
            "peak_bytes": {a.name: max(a.peaks) for a in (control, grit)} if cuda else None,
            "timed_inversions": grit.manager.inversions - inv0,
            "timed_preconditioned": grit.manager.preconditioned_steps - pre0}


def print_table(label: str, res: dict, mem: dict | None) -> None:
    c, g = res["control"], res["grit"]
    print(f"\n{label}")
    print(f"{'arm':8} {'median s':>9} {'mean s':>8} {'p10-p90 s':>15} {'min-max s':>15} {'peak MiB':>9}")
    for name, s in (("control", c), ("grit", g)):
        m = f"{mem[name]:9.0f}" if mem else f"{'-':>9}"
        print(f"{name:8} {s['median']:9.3f} {s['mean']:8.3f} {s['p10']:7.3f}-{s['p90']:<7.3f} "
              f"{s['min']:7.3f}-{s['max']:<7.3f} {m}")
    mem_ratio = f"{mem['grit'] / mem['control']:9.3f}" if mem else f"{'-':>9}"
    print(f"{'ratio':8} {g['median'] / c['median']:9.3f} {g['mean'] / c['mean']:8.3f} {'':15} {'':15} {mem_ratio}")
    gs = res["grit_step_s"]
    print(f"grit: {res['timed_preconditioned']}/{g['n']} timed steps preconditioned, {res['timed_inversions']} "
          f"inversions in the window; manager.step() mean {gs['mean'] * 1e3:.1f} ms, max {gs['max'] * 1e3:.1f} ms "
          f"({gs['mean'] / g['mean'] * 100:.1f}% of a GRIT step); rest of the overhead (hooks, metrics): "
          f"{(g['mean'] - c['mean'] - gs['mean']) * 1e3:.1f} ms/step")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, choices=["llama3-8b-shaped"],
                   help="GPU mode: random Llama-3-8B-shaped NF4 model (needs CUDA + bitsandbytes)")
    p.add_argument("--preset", default="smollm2-135m", help="CPU mode: study preset (default smollm2-135m)")
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="GPU mode: sequence lengths")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm (>= 20 for reported figures)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per arm first (the first inversion is in "
                   "them when --kfac-update-freq <= --warmup)")
    p.add_argument("--kfac-update-freq", type=int, default=5)
    p.add_argument("--lambda-kfac", type=float, default=1e-5)
    p.add_argument("--lambda-reproj", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16, help="GPU mode: LoRA rank (CPU mode: the preset's)")
    p.add_argument("--logging-steps", type=int, default=1, help="loss .item() and manager.metrics() every N steps")
    p.add_argument("--mem-steps", type=int, default=6, help="CPU memory subprocesses: steps after the first")
    p.add_argument("--no-memory", action="store_true", help="CPU mode: skip the memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="CPU mode: only the memory subprocesses")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--memory-arm", default=None, choices=["control", "grit"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_arm:
        memory_child(args)
        return
    torch.manual_seed(0)
    t_start = time.perf_counter()
    results = {"args": vars(args), "torch": torch.__version__, "runs": []}
    if args.model is None:
        print(f"CPU mode, preset {args.preset}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        mem = None
        if not args.no_memory:
            mem = {k: v["peak_rss_mib"] for k, v in memory_subprocesses(args).items()}
            print(f"peak RSS during training: control {mem['control']:.0f} MiB, grit {mem['grit']:.0f} MiB, "
                  f"ratio {mem['grit'] / mem['control']:.3f}", flush=True)
            results["peak_mib"] = mem
            if args.memory_only:
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
                return
        control, grit, batches, desc = build_cpu_arms(args)
        step_batches = lambda i: batches[(i * args.accum) % len(batches):][:args.accum]  # noqa: E731
        res = run_interleaved(control, grit, step_batches, args, cuda=False)
        seq = max(int(b["input_ids"].shape[1]) for b in batches)
        label = (f"{desc}; padded length <= {seq}; {args.steps} timed steps per arm after {args.warmup} warm-up, "
                 f"interleaved; kfac_update_freq {args.kfac_update_freq}; peak = RSS high-water mark during "
                 f"training, one subprocess per arm")
        print_table(label, res, mem)
        results["runs"].append({"desc": label, **res, "peak_mib": mem})
    else:
        run_gpu(args, results, t_start)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


def run_gpu(args, results: dict, t_start: float) -> None:
    """Both 8B-shaped arms on one GPU, every --seq on the same two models."""
    if not torch.cuda.is_available():
        raise SystemExit("--model llama3-8b-shaped needs a CUDA GPU (and bitsandbytes)")
    from grit import GRITManager

    gpu = torch.cuda.get_device_name(0)
    print(f"GPU mode on {gpu}, torch {torch.__version__}", flush=True)

    def idle_bytes() -> int:
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    # cuBLAS workspaces come from the caching allocator on first use: allocate them before measuring anything.
    x = torch.ones(256, 256, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    base = idle_bytes()
    first = random_batches(args.accum, args.batch, args.seq[0])
    resident = {}
    arms = []
    for name in ("control", "grit"):  # built one after the other; each takes its first (untimed) step alone
        model, opt = build_llama8b_shaped(args)
        arm = Arm(name, model, opt, GRITManager(model, grit_config(args, args.lora_r)) if name == "grit" else None)
        arm.step(first, log=True, cuda=True)  # allocates the optimizer state
        resident[name] = idle_bytes() - base - sum(resident.values())
        arms.append(arm)
    control, grit = arms
    del first
    desc = (f"random Llama-3-8B-shaped on {gpu}, NF4 double quant, bf16 compute, LoRA r={args.lora_r} on "
            f"{len(grit.manager.lora_modules)} modules, reentrant gradient checkpointing, AdamW8bit, "
            f"batch {args.batch} x accum {args.accum}")
    print(f"built both arms in {time.perf_counter() - t_start:.0f}s; idle GiB: control "
          f"{resident['control'] / 2**30:.2f}, grit {resident['grit'] / 2**30:.2f}", flush=True)
    for seq in args.seq:
        batches = random_batches(args.accum * 2, args.batch, seq)
        step_batches = lambda i, b=batches: b[(i % 2) * args.accum:][:args.accum]  # noqa: E731
        res = run_interleaved(control, grit, step_batches, args, cuda=True, resident=resident)
        mib = {k: v / 2**20 for k, v in res["peak_bytes"].items()}
        label = (f"{desc}; seq {seq}; {args.steps} timed steps per arm after {args.warmup} warm-up, interleaved; "
                 f"kfac_update_freq {args.kfac_update_freq}; peak = max_memory_allocated of the arm's steps minus "
                 f"the other arm's idle bytes")
        print_table(label, res, mib)
        results["runs"].append({"desc": label, "seq": seq, **res, "peak_mib": mib})
        print(f"elapsed {time.perf_counter() - t_start:.0f}s", flush=True)
        del batches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
