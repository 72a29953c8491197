"""Per-optimizer-step cost of GRIT against the same stack without it: time inside GRIT, step time, peak memory.

    # CPU (default): the study's smollm2-135m preset, 4-bit NF4, LoRA r=16 on 7 projections, 2 x 4 micro-batches,
    # 100 interleaved pairs of steps
    python benchmarks/step_overhead.py
    # GPU: a random Llama-3-8B-shaped model quantized to NF4 on the card, seq 512 and 2048 (no hub access)
    python benchmarks/step_overhead.py --model llama3-8b-shaped
    # smoke run (seconds): the tiny preset, 3 pairs
    python benchmarks/step_overhead.py --preset tiny --steps 3 --warmup 1 --mem-steps 2

Primary figure: the time spent inside GRIT itself per optimizer step, measured directly (``GritClock``):
``time.perf_counter`` around every call into GRIT, split into "hooks" (the model pre-forward hook, the
lora_A forward hooks and the tensor hooks on u, all of which run inside forward/backward), "flush"
(the batched Gram computation, wherever it is triggered), "step" (``manager.step()`` without its flush)
and "metrics" (``manager.metrics()``/``counters()`` without their flush). Nested calls are attributed to
the innermost one, so the parts add up. On the CPU every op runs on the calling thread, so the clock
runs during the timed pairs (it costs two perf_counter calls per hook, well under 0.1% of a step).
On CUDA the host returns before the kernels finish: the clock synchronises around every call, which
would slow the timed pairs, so it runs only in a separate measurement pass of ``--clock-steps`` GRIT-only
steps after them ("measurement mode"; those steps are not in the ratio).

Secondary figure: the ratio of mean step times GRIT / control over the interleaved pairs, with a
bootstrap 95% interval (pairs resampled by step, ``--bootstrap`` resamples, seeded): on the shared
machine, step times drift, and the interval says how far the mean ratio can be trusted.

Arms. "control": PEFT model + optimizer, no GRIT object at all. "grit": an identical model (same
weights, same LoRA init) with a ``GRITManager`` as the study runs it: natural gradient on, both
regularizers on (GRITConfig defaults: lambda_kfac 1e-5, lambda_reproj 1e-4), factors updated and
inverted every ``--kfac-update-freq`` steps (default 5, more often than the study's setting, so
the timed window holds 4 inversion steps and the mean includes them).

One optimizer step is what the HF Trainer does (transformers 5.17 ``_run_epoch``): forward + backward
of each micro-batch with the loss normalised by the step's label-token count, [grit:
``manager.step()``], clip to max_grad_norm 1.0, optimizer step, zero_grad, and at logging steps
(``--logging-steps``, the presets log every step) the loss ``.item()`` plus, in the grit arm,
``manager.metrics()`` (GritTrainer logs them there; with ``--metrics-every N`` only every N-th log
step, ``manager.counters()`` at the others, as ``GritTrainer(grit_metrics_every=N)`` does). The loop
is written out instead of running two ``Trainer.train()`` so that the arms can alternate step by
step; the Trainer's own per-step work (callbacks, ...) is the same in both arms and left out, which
makes the ratio slightly pessimistic.

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
memory, GRIT/control ratios), the mean ratio with its bootstrap interval, the time inside GRIT per
step by part with its bootstrap interval, and ``--json PATH`` for the numbers (per-step clocks included).
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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CLOCK_PARTS = ("hooks", "flush", "step", "metrics")


# ----------------------------------------------------------------------------- models and data

def build_smollm2(args):
    """The study's CPU stack for ``args.preset``: load_peft_model (NF4, fp32 compute, checkpointing) + study data."""
    from grit_study import PadCollator, build_study_data, load_peft_model, load_tokenizer, resolve_preset

    preset = resolve_preset(args.preset)
    model = load_peft_model(preset)
    tok = load_tokenizer(preset.model_id)
    need = (args.warmup + args.steps) * args.batch * args.accum
    data = build_study_data(tok, source=preset.data, template=preset.template,
                            max_seq_length=preset.max_seq_length, val_size=preset.val_size,
                            num_examples=max(preset.num_examples, need + preset.val_size), data_seed=preset.data_seed)
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
                      lambda_kfac=args.lambda_kfac, lambda_reproj=args.lambda_reproj,
                      stat_micro_batch_stride=args.stat_stride)


# ----------------------------------------------------------------------------- the clock inside GRIT

class GritClock:
    """Wall time inside one manager's GRIT calls, per part (``CLOCK_PARTS``); see the module docstring.

    Installed by wrapping, without touching grit's code: the hook functions registered on the model
    (through their handles), the tensor hooks the lora_A forward hooks register on u (``register_hook``
    is wrapped for the duration of each forward hook), the statistics flush (on the capture and as the
    mask tracker's pre-forward callback), ``manager.step``, ``manager.metrics`` and ``manager.counters``.
    ``sync`` (CUDA measurement mode) synchronises the device around every timed call.
    """

    def __init__(self, manager):
        self.totals = defaultdict(float)
        self.sync = False
        self._stack: list = []  # [part, start, time of nested calls]
        capture = manager._capture
        for handle in capture.handles:
            hooks = handle.hooks_dict_ref()
            fn = hooks[handle.id]
            hooks[handle.id] = self._with_tensor_hooks(self._timed("hooks", fn)) if handle is not capture.masks.handle \
                else self._timed("hooks", fn)
        # The mask tracker's pre-forward callback (StatCapture._on_model_forward: micro-batch count for
        # stat_micro_batch_stride, then self.flush()) looks flush up on the instance: it now gets the timed one.
        capture.flush = self._timed("flush", capture.flush)
        manager.step = self._timed("step", manager.step)
        manager.metrics = self._timed("metrics", manager.metrics)
        manager.counters = self._timed("metrics", manager.counters)

    def _timed(self, part: str, fn):
        def timed(*args, **kwargs):
            if self.sync:
                torch.cuda.synchronize()
            self._stack.append([part, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync:
                    torch.cuda.synchronize()
                part_, start, nested = self._stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[part_] += elapsed - nested
                if self._stack:
                    self._stack[-1][2] += elapsed
        return timed

    def _with_tensor_hooks(self, forward_hook):
        clock, original = self, torch.Tensor.register_hook

        def register_timed(tensor, hook):
            return original(tensor, clock._timed("hooks", hook))

        def hook(*args, **kwargs):
            torch.Tensor.register_hook = register_timed
            try:
                return forward_hook(*args, **kwargs)
            finally:
                torch.Tensor.register_hook = original
        return hook

    def take(self) -> dict:
        """The parts' seconds since the last take(), and their total."""
        out = {p: self.totals.get(p, 0.0) for p in CLOCK_PARTS}
        out["total"] = sum(out.values())
        self.totals.clear()
        return out


# ----------------------------------------------------------------------------- one optimizer step

@dataclass
class Arm:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    manager: object = None
    metrics_every: int = 1     # as GritTrainer(grit_metrics_every=...): full metrics every N-th log step
    clock: GritClock = None
    times: list = field(default_factory=list)
    grit_times: list = field(default_factory=list)   # GritClock.take() per timed step
    peaks: list = field(default_factory=list)
    logged: int = 0

    def __post_init__(self):
        if self.manager is not None:
            self.clock = GritClock(self.manager)

    def step(self, batches: list[dict], log: bool, cuda: bool) -> tuple[float, dict | None]:
        """One optimizer step over ``batches``; returns (wall seconds, GritClock parts or None for the control)."""
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        if self.clock is not None:
            self.clock.take()  # drop what ran between steps
        t0 = time.perf_counter()
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # Trainer: num_items_in_batch
        tr_loss = None
        for b in batches:
            loss = self.model(**b, num_items_in_batch=n_items).loss
            loss.backward()
            tr_loss = loss.detach() if tr_loss is None else tr_loss + loss.detach()
        if self.manager is not None:
            self.manager.step()
        params = [p for p in self.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if log:
            tr_loss.item()
            if self.manager is not None:
                self.logged += 1
                if self.logged % self.metrics_every == 0:
                    self.manager.metrics()
                else:
                    self.manager.counters()
        sync()
        return time.perf_counter() - t0, (self.clock.take() if self.clock is not None else None)


def build_cpu_arms(args):
    """(control, grit, batches, description) on CPU: two identical study models, one with a GRITManager."""
    from grit import GRITManager

    arms, batches, preset = [], None, None
    for name in ("control", "grit"):
        model, opt, batches, preset = build_smollm2(args)
        arms.append(Arm(name, model, opt, GRITManager(model, grit_config(args, preset.lora_r))
                        if name == "grit" else None, metrics_every=args.metrics_every))
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
              if args.memory_arm == "grit" else None, metrics_every=args.metrics_every)
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
               "--lambda-kfac", str(args.lambda_kfac), "--lambda-reproj", str(args.lambda_reproj),
               "--logging-steps", str(args.logging_steps), "--metrics-every", str(args.metrics_every)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
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


def bootstrap_ratio(control: list[float], grit: list[float], resamples: int, seed: int = 0) -> dict:
    """Mean(grit) / mean(control) and its bootstrap 95% percentile interval, pairs resampled by step."""
    c, g = torch.tensor(control, dtype=torch.float64), torch.tensor(grit, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(c), (resamples, len(c)), generator=gen)
    ratios = g[idx].sum(1) / c[idx].sum(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean_ratio": float(g.sum() / c.sum()), "ci95": [lo, hi], "resamples": resamples, "pairs": len(c)}


def bootstrap_mean(xs: list[float], resamples: int, seed: int = 0) -> dict:
    x = torch.tensor(xs, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (resamples, len(x)), generator=gen)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(x.mean()), "ci95": [lo, hi]}


def clock_summary(parts: list[dict], resamples: int) -> dict:
    """Per part: mean seconds per step with a bootstrap 95% interval (over steps)."""
    return {p: bootstrap_mean([x[p] for x in parts], resamples) for p in (*CLOCK_PARTS, "total")}


def clock_pass(grit: Arm, step_batches, args) -> list[dict]:
    """CUDA measurement mode: ``--clock-steps`` GRIT-only steps with the device synchronised around every GRIT call."""
    grit.clock.sync = True
    parts = []
    try:
        for i in range(args.clock_steps):
            _, clock = grit.step(step_batches(args.warmup + args.steps + i),
                                 (args.warmup + args.steps + i + 1) % args.logging_steps == 0, cuda=True)
            parts.append(clock)
    finally:
        grit.clock.sync = False
    return parts


def run_interleaved(control: Arm, grit: Arm, step_batches, args, cuda: bool, resident: dict | None = None) -> dict:
    """Warm-up then timed steps, alternating control/grit (ABBA order) on the same batches.

    GPU: ``resident[arm]`` = bytes that arm holds while idle; an arm's peak is the max_memory_allocated of
    its own step minus the other arm's resident bytes. The GRIT clock of the timed pairs is the primary
    figure on the CPU; on CUDA the clock pass after them is (module docstring).
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
            dt, clock = arm.step(batches, (i + 1) % args.logging_steps == 0, cuda)
            if timed:
                arm.times.append(dt)
                if clock is not None:
                    arm.grit_times.append(clock)
                if cuda:
                    other = grit if arm is control else control
                    arm.peaks.append(torch.cuda.max_memory_allocated() - resident[other.name])
        if timed:
            k = i - args.warmup + 1
            if k % args.print_every == 0 or k == args.steps:
                print(f"  pair {k}/{args.steps}: control {control.times[-1]:.3f}s grit {grit.times[-1]:.3f}s "
                      f"(inside GRIT {grit.grit_times[-1]['total'] * 1e3:.1f} ms host-side)", flush=True)
        else:
            print(f"  warm-up step {i + 1}/{args.warmup} done", flush=True)
    out = {"control": summarize(control.times), "grit": summarize(grit.times),
           "ratio": bootstrap_ratio(control.times, grit.times, args.bootstrap),
           "peak_bytes": {a.name: max(a.peaks) for a in (control, grit)} if cuda else None,
           "timed_inversions": grit.manager.inversions - inv0,
           "timed_preconditioned": grit.manager.preconditioned_steps - pre0,
           # A check that the statistics are what the config asks for: with stride k about 1/k of the tokens.
           "stat_tokens_per_step": float(grit.manager.metrics()["grit/stat_tokens"]) / grit.manager.optimizer_steps,
           "stat_stride": grit.manager.config.stat_micro_batch_stride,
           "grit_clock_pairs_s": clock_summary(grit.grit_times, args.bootstrap),
           "grit_clock_per_step_s": grit.grit_times}
    if cuda and args.clock_steps > 0:
        parts = clock_pass(grit, step_batches, args)
        out["grit_clock_synced_s"] = clock_summary(parts, args.bootstrap)
        out["grit_clock_synced_per_step_s"] = parts
    out["grit_time_s"] = out["grit_clock_synced_s" if "grit_clock_synced_s" in out else "grit_clock_pairs_s"]
    return out


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
    r = res["ratio"]
    print(f"mean ratio GRIT/control {r['mean_ratio']:.4f}, bootstrap 95% interval [{r['ci95'][0]:.4f}, "
          f"{r['ci95'][1]:.4f}] ({r['pairs']} pairs, {r['resamples']} resamples)")
    t = res["grit_time_s"]
    how = "device synchronised, separate pass" if "grit_clock_synced_s" in res else "during the timed pairs"
    parts = ", ".join(f"{p} {t[p]['mean'] * 1e3:.2f}" for p in CLOCK_PARTS)
    print(f"time inside GRIT per step ({how}): {t['total']['mean'] * 1e3:.2f} ms [{t['total']['ci95'][0] * 1e3:.2f}, "
          f"{t['total']['ci95'][1] * 1e3:.2f}] = {t['total']['mean'] / c['mean'] * 100:.2f}% of a control step "
          f"({parts} ms)")
    print(f"grit: statistics tokens per step {res['stat_tokens_per_step']:.1f} (stat_micro_batch_stride "
          f"{res['stat_stride']})")
    print(f"grit: {res['timed_preconditioned']}/{g['n']} timed steps preconditioned, {res['timed_inversions']} "
          f"inversions in the window")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, choices=["llama3-8b-shaped"],
                   help="GPU mode: random Llama-3-8B-shaped NF4 model (needs CUDA + bitsandbytes)")
    p.add_argument("--preset", default="smollm2-135m", help="CPU mode: study preset (default smollm2-135m)")
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="GPU mode: sequence lengths")
    p.add_argument("--steps", type=int, default=100, help="timed interleaved pairs of steps (>= 100 for reported "
                   "figures: 20 pairs left the mean ratio's interval at about +-3%%)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per arm first (the first inversion is in "
                   "them when --kfac-update-freq <= --warmup)")
    p.add_argument("--kfac-update-freq", type=int, default=5)
    p.add_argument("--lambda-kfac", type=float, default=1e-5)
    p.add_argument("--lambda-reproj", type=float, default=1e-4)
    p.add_argument("--stat-stride", type=int, default=1, help="GRITConfig.stat_micro_batch_stride: statistics from "
                   "every k-th micro-batch of a step (1 = every micro-batch, the default behaviour)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16, help="GPU mode: LoRA rank (CPU mode: the preset's)")
    p.add_argument("--logging-steps", type=int, default=1, help="loss .item() and GRIT metrics every N steps")
    p.add_argument("--metrics-every", type=int, default=1, help="at every N-th log step manager.metrics(), at the "
                   "others manager.counters() (GritTrainer's grit_metrics_every; 1 = metrics at every log step)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--clock-steps", type=int, default=10, help="GPU mode: GRIT-only steps of the synchronised clock "
                   "pass (measurement mode) after the timed pairs; 0 skips it")
    p.add_argument("--print-every", type=int, default=10, help="print every N-th timed pair")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's). On a shared, "
                   "oversubscribed CPU, OpenMP ops with more threads than free cores stall for ~0.1 s each")
    p.add_argument("--mem-steps", type=int, default=6, help="CPU memory subprocesses: steps after the first")
    p.add_argument("--no-memory", action="store_true", help="CPU mode: skip the memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="CPU mode: only the memory subprocesses")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--memory-arm", default=None, choices=["control", "grit"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
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
        arm = Arm(name, model, opt, GRITManager(model, grit_config(args, args.lora_r)) if name == "grit" else None,
                  metrics_every=args.metrics_every)
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
