"""Ollama deployment (grit_study.export.deploy_ollama, arms.deploy) against a stand-in ``ollama``.

No real Ollama can be installed here, so a small Python script named ``ollama`` on a temporary PATH plays it:
every call appends its argv to a log; ``serve`` runs an HTTP server at ``OLLAMA_HOST`` (which Ollama itself
honours) answering /api/tags, /api/create, /api/generate and /api/chat as Ollama does; ``create`` fails
like Ollama's when no server answers. A stand-in ``curl`` serves the install script, which puts the
stand-in ``ollama`` on PATH, as ``curl -fsSL https://ollama.com/install.sh | sh`` would in Colab.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

from grit_study import arms
from grit_study.export import ExportError, ExportResult, deploy_ollama

OLLAMA = r'''#!PYTHON
import json, os, sys, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

with open(os.environ["FAKE_OLLAMA_LOG"], "a") as f:
    f.write(json.dumps(["ollama", *sys.argv[1:]]) + "\n")
raw = os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
parts = urlsplit(raw if "://" in raw else "http://" + raw)
host, port = parts.hostname, parts.port or 11434
command = sys.argv[1] if len(sys.argv) > 1 else ""

if command == "serve":
    models = set()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/api/tags":
                return self.reply(200, {"models": [{"name": m, "model": m} for m in sorted(models)]})
            self.reply(404, {"error": "404 page not found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/api/create":
                models.add(body["model"])
                return self.reply(200, {"status": "success"})
            if self.path in ("/api/generate", "/api/chat"):
                if body.get("model") not in models:
                    return self.reply(404, {"error": f"model '{body.get('model')}' not found"})
                reason = os.environ.get("FAKE_OLLAMA_DONE_REASON", "stop")
                limit = body.get("options", {}).get("num_predict", 128)
                text = "OK" if reason == "stop" else " ".join(["word"] * limit)
                out = {"model": body["model"], "created_at": "2026-01-01T00:00:00Z", "done": True,
                       "done_reason": reason, "eval_count": 2 if reason == "stop" else limit}
                if self.path == "/api/generate":
                    out["response"] = text
                else:
                    out["message"] = {"role": "assistant", "content": text}
                return self.reply(200, out)
            self.reply(404, {"error": "404 page not found"})

    with open(os.environ["FAKE_OLLAMA_LOG"] + ".serve.pid", "w") as f:
        f.write(str(os.getpid()))
    ThreadingHTTPServer((host, port), Handler).serve_forever()
elif command == "create":
    name, modelfile = sys.argv[2], sys.argv[sys.argv.index("-f") + 1]
    if not os.path.isfile(modelfile):
        sys.exit(f"Error: open {modelfile}: no such file or directory")
    request = urllib.request.Request(f"http://{host}:{port}/api/create", data=json.dumps({"model": name}).encode())
    try:
        urllib.request.urlopen(request, timeout=5).read()
    except OSError:
        sys.exit("Error: could not connect to ollama app, is it running?")
    print("success")
else:
    sys.exit(f"Error: unknown command {command!r}")
'''

CURL = r'''#!PYTHON
import json, os, shlex, sys
with open(os.environ["FAKE_OLLAMA_LOG"], "a") as f:
    f.write(json.dumps(["curl", *sys.argv[1:]]) + "\n")
if sys.argv[1:] != ["-fsSL", "https://ollama.com/install.sh"]:
    sys.exit("curl stand-in: unexpected arguments")
src, dst = os.environ["FAKE_OLLAMA_SRC"], os.path.join(os.environ["FAKE_BIN"], "ollama")
print(f"cp {shlex.quote(src)} {shlex.quote(dst)} && chmod +x {shlex.quote(dst)}")
'''


def _script(path: Path, text: str) -> Path:
    path.write_text(text.replace("PYTHON", sys.executable, 1))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """PATH = a bin folder (with ``curl``; ``ollama`` only when a test puts it there) + the system's; a free port."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    source = _script(tmp_path / "ollama-standin", OLLAMA)
    _script(bin_dir / "curl", CURL)
    port = _free_port()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("FAKE_OLLAMA_LOG", str(log))
    monkeypatch.setenv("FAKE_OLLAMA_SRC", str(source))
    monkeypatch.setenv("FAKE_BIN", str(bin_dir))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    out = tmp_path / "export"
    out.mkdir()
    (out / "Modelfile").write_text('FROM ./m.q8_0.gguf\nPARAMETER stop "<|im_end|>"\n')
    result = ExportResult(out, out / "merged", out / "m.q8_0.gguf", out / "Modelfile", "q8_0", "alpaca", ["<|im_end|>"])

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def serve_pid() -> int:
        return int(Path(str(log) + ".serve.pid").read_text())

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tags", timeout=2):
                return True
        except OSError:
            return False

    return types.SimpleNamespace(bin=bin_dir, source=source, port=port, result=result, calls=calls,
                                 serve_pid=serve_pid, answers=answers)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _install_binary(fake) -> None:
    (fake.bin / "ollama").write_bytes(fake.source.read_bytes())
    (fake.bin / "ollama").chmod(0o755)


def test_binary_without_a_server_starts_one_creates_asks_and_stops_it(fake):
    _install_binary(fake)
    report = deploy_ollama(fake.result, "grit-study-grit", "Reverse the words.\napple river")
    modelfile = str(fake.result.modelfile_path)
    assert fake.calls() == [["ollama", "serve"], ["ollama", "create", "grit-study-grit", "-f", modelfile]]
    assert report["deployed"] and report["server_started"]
    assert (report["response"], report["done_reason"]) == ("OK", "stop")
    assert _gone(fake.serve_pid()) and not fake.answers()  # the server it started is stopped
    assert (fake.result.output_dir / "ollama-serve.log").is_file()


def test_a_running_server_is_used_and_left_running(fake):
    _install_binary(fake)
    server = subprocess.Popen([str(fake.bin / "ollama"), "serve"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not fake.answers():
            assert server.poll() is None and time.monotonic() < deadline, "the stand-in server did not start"
            time.sleep(0.1)
        report = deploy_ollama(fake.result, "grit-study-control", "Say OK.")
        assert report["deployed"] and not report["server_started"] and report["done_reason"] == "stop"
        assert [c[1] for c in fake.calls()] == ["serve", "create"]  # the test's own serve; none started by deploy
        assert server.poll() is None and fake.answers()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_colab_installs_ollama_with_its_script_and_deploys_through_arms(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    row = {"instruction": "Reverse the order of the words.", "input": "apple river", "output": "river apple"}
    res = types.SimpleNamespace(arm="grit_sgd", export_result=fake.result, data=types.SimpleNamespace(val_rows=[row]))
    report = arms.deploy(res)
    calls = fake.calls()
    assert calls[0] == ["curl", "-fsSL", "https://ollama.com/install.sh"]
    assert [c[:2] for c in calls[1:]] == [["ollama", "serve"], ["ollama", "create"]]
    assert calls[2][2] == "grit-study-grit-sgd"
    assert report["deployed"] and report["server_started"] and _gone(fake.serve_pid())


def test_no_binary_and_no_install_prints_the_commands(fake, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    report = deploy_ollama(fake.result, "grit-study-grit", "Say OK.", install=False)
    assert report["deployed"] is False and fake.calls() == []
    printed = capsys.readouterr().out
    assert "ollama serve" in printed and all(c in printed for c in report["commands"])


def test_an_answer_that_runs_to_the_limit_is_an_error_and_the_server_still_stops(fake, monkeypatch):
    _install_binary(fake)
    monkeypatch.setenv("FAKE_OLLAMA_DONE_REASON", "length")
    with pytest.raises(ExportError, match=r"did not stop at the stop token \(done_reason 'length'.*PARAMETER stop"):
        deploy_ollama(fake.result, "grit-study-grit", "Say OK.", num_predict=8)
    assert _gone(fake.serve_pid()) and not fake.answers()


def test_a_server_that_cannot_start_is_reported_with_its_log(fake):
    (fake.bin / "ollama").write_text("#!/bin/sh\necho 'Error: listen tcp: bind: address already in use' >&2\n"
                                     "exit 1\n")
    (fake.bin / "ollama").chmod(0o755)
    with pytest.raises(ExportError, match=r"(?s)exited with code 1:\n.*address already in use.*OLLAMA_HOST"):
        deploy_ollama(fake.result, "grit-study-grit", "Say OK.", server_timeout_s=20)
