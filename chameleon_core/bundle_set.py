"""A bundle set: a base model with its static-LoRA and ChameleonLLM bundles answering the same prompts.

A *bundle set* is a folder holding a ``lora/`` and a ``chameleon/`` bundle trained on the same data.
This module finds the set for a model (by its weights' fingerprint), builds a small one, opens it,
and compares the three models on new prompts through :mod:`.inference`: one request, or several
merged into one mixed batch (:class:`~.inference.MixedRows`), each answered exactly as it would be
alone. The app (through the scheduler in :mod:`.serving`) and the ``generate`` command's bundle-set
form use it. Serving a set never imports training; only :func:`build_bundle_set` does, when it trains.
"""

from __future__ import annotations

import copy
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .bundle import Bundle, BundleError, Points, fetch_bundle, load_bundle, read_bundle_config
from .clustering import Clusters
from .hyper_head import hyper_head
from .inference import (
    AdapterView,
    Assignment,
    FittedPrompts,
    MixedRows,
    Request,
    adapter_summary,
    answer_stops,
    fit_prompts,
)
from .models import load_model, model_fingerprint
from .regimes import STATIC

COMPARED = {"base": "Base", "lora": "Static LoRA", "chameleon": "ChameleonLLM"}  # regime -> display name
# A demo set built on first start: one epoch of static LoRA and of ChameleonLLM, small enough to
# train in about half an hour on 2 CPU cores with SmolLM2 (rows of up to 128 tokens, 63 steps).
DEMO_SETTINGS = {"epochs": 1, "max_train_rows": 1000, "max_eval_rows": 200, "max_length": 128, "batch_size": 16,
                 "lr": 1e-3}
# What the two bundles of a set must share for their columns to answer one question (the base model is
# checked by its weights' fingerprint): label -> where config.json's metadata records it.
SHARED_SETTINGS = {"dataset": "dataset", "protocol": "protocol", "prompt format": "prompt_template",
                   "data source": "train.data_dir", "data split seed": "train.data_seed",
                   "held-out rows": "train.max_eval_rows"}
TRAINING_SETTINGS = ("rank", "epochs", "lr", "batch_size", "max_length")  # may differ per column; shown per column

Progress = Callable[[float, str], None]


def _silent(fraction: float, message: str) -> None:
    pass


Report = Callable[[int, "Comparison"], None]  # (request's index in the batch, its comparison so far)


def _unreported(index: int, comparison: Comparison) -> None:
    pass


def _never(index: int) -> bool:
    return False


# ---------------------------------------------------------------- bundle sets
def check_bundle_set(path: Path, fingerprint: str) -> None:
    """Raise a :class:`BundleError` saying why ``path`` is not a lora/ + chameleon/ set for this model
    (missing, corrupt, trained on other weights, or the two trained on different data)."""
    configs = {}
    for name in ("lora", "chameleon"):
        config = configs[name] = read_bundle_config(path / name)  # names a missing, corrupt or changed file itself
        if config["base_fingerprint"] != fingerprint:
            raise BundleError(f"{path / name} was trained on other base weights ({config['base_model']!r}, fingerprint "
                              f"{config['base_fingerprint']}; this model's is {fingerprint})")
    for label, where in SHARED_SETTINGS.items():
        lora, chameleon = (_recorded(configs[name], where) for name in ("lora", "chameleon"))
        if lora != chameleon:
            raise BundleError(
                f"{path} mixes bundles trained on different data: its {label} (metadata.{where}) is {lora!r} for lora/ "
                f"and {chameleon!r} for chameleon/; a set compares two adapters trained on the same data, split and "
                "prompt format, so retrain one of them"
            )


def _recorded(config: dict, where: str) -> object:
    """The value at ``where`` (dotted) in a bundle config's metadata, None when it is not recorded."""
    value = config.get("metadata")
    for key in where.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def find_bundle_set(root: str | Path, model: PreTrainedModel) -> Path | None:
    """The first bundle set under ``root`` (by name) trained on ``model``, or None.

    Sets for other models are skipped quietly; a set that names this model's fingerprint but
    fails its checks (a corrupt file, a missing half) raises, so it is never rebuilt over.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    fingerprint = model_fingerprint(model)
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        if _claims(path, fingerprint):
            check_bundle_set(path, fingerprint)  # a damaged set for this model is reported, never rebuilt over
            return path
    return None


def _claims(path: Path, fingerprint: str) -> bool:
    """Whether a bundle config under ``path`` names ``fingerprint`` (read without its checksum)."""
    for name in ("lora", "chameleon"):
        try:
            if read_bundle_config(path / name, verify=False)["base_fingerprint"] == fingerprint:
                return True
        except BundleError:
            continue
    return False


def infer_dataset(data_dir: str | Path | None) -> str:
    """``synthetic`` without data; a local folder is WikiText-2 if it holds ``wiki.valid.raw``, else Alpaca."""
    if data_dir is None:
        return "synthetic"
    return "wikitext" if (Path(data_dir) / "wiki.valid.raw").is_file() else "alpaca"


def demo_set_name(model_name: str, dataset: str) -> str:
    """``gpt2-synthetic``, ``stories260K-hf-wikitext``, ``random-tiny-gpt2-synthetic``..."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{Path(model_name).name}-{dataset}").strip("-")


def build_bundle_set(
    model_name: str, out: str | Path, dataset: str = "synthetic", data_dir: str | None = None, seed: int = 0,
    settings: dict | None = None, progress: Progress = _silent,
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> Path:
    """Train a static-LoRA and ChameleonLLM pair on the same data (``settings``: default :data:`DEMO_SETTINGS`).

    ``base``: ``model_name`` already loaded; each bundle trains a copy, so it stays the base model.

    Training happens in ``<out>.partial`` (an interrupted build resumes there) and the folder is
    renamed when both bundles are done, so ``out`` is never half written.
    """
    from .train import train_bundle

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    bar = tqdm(total=100, desc=f"building {out.name}", unit="%")
    for step, regime in enumerate(("lora", "chameleon")):

        def report(fraction: float, message: str, step: int = step, regime: str = regime) -> None:
            done = (step + fraction) / 2
            bar.update(round(100 * done) - bar.n)
            progress(done, f"training {COMPARED[regime]}: {message}")

        copied = None if base is None else (copy.deepcopy(base[0]), base[1])
        train_bundle(model_name, dataset, regime, partial / regime, data_dir=data_dir, seed=seed, progress=report,
                     base=copied, **(DEMO_SETTINGS if settings is None else settings))
    bar.close()
    shutil.move(partial, out)
    return out


class BundleSet:
    """A base model with its static-LoRA and ChameleonLLM bundles, ready to compare on new prompts.

    One lock serialises the models: the hyper head holds its conditioning while it generates.
    """

    def __init__(self, path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: Bundle, chameleon: Bundle):
        if chameleon.adapter.regime != "chameleon" or hyper_head(chameleon.model) is None:
            raise BundleError(f"{path}/chameleon holds a {chameleon.adapter.regime!r} bundle, not a ChameleonLLM one")
        if lora.adapter.regime not in STATIC:
            raise BundleError(f"{path}/lora holds a {lora.adapter.regime!r} bundle, not a static LoRA one")
        if chameleon.clusters is None:
            raise BundleError(f"{path}/chameleon holds no trained clusters (clusters.safetensors)")
        self.path, self.model, self.tokenizer, self.lora, self.chameleon = path, model, tokenizer, lora, chameleon
        clusters = chameleon.clusters
        self.points = chameleon.points or Points(clusters.centroids, torch.arange(clusters.k), [f"centroid {c}" for c in range(clusters.k)])
        self.template = chameleon.metadata.get("prompt_template", "{prompt}")
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> BundleSet:
        """Each bundle gets its own copy of ``model``; ``model`` itself stays the unadapted base."""
        path = Path(path)
        check_bundle_set(path, model_fingerprint(model))
        lora, chameleon = (load_bundle(path / name, copy.deepcopy(model)) for name in ("lora", "chameleon"))
        return cls(path, model, tokenizer, lora, chameleon)

    @property
    def clusters(self) -> Clusters:
        return self.chameleon.clusters

    def describe(self) -> dict:
        """What the set was trained on, for a status line: the data the two share, the training settings of each."""
        meta = self.chameleon.metadata
        bundles = {"lora": self.lora, "chameleon": self.chameleon}
        return {"path": str(self.path), "base_model": self.chameleon.base_model, "dataset": meta.get("dataset", "?"),
                "train": {regime: _training(bundle) for regime, bundle in bundles.items()},
                "prompt_format": "the Alpaca template" if "### Instruction" in self.template else "plain text",
                "k": self.clusters.k, "points": len(self.points.texts),
                "metrics": {regime: bundle.metadata.get("metrics", {}) for regime, bundle in bundles.items()}}

    def training_summary(self) -> str:
        """How the adapters were trained, in words: once when both columns share the settings, else per column."""
        info = self.describe()
        texts = {regime: _trained_text(train, info["dataset"]) for regime, train in info["train"].items()}
        if texts["lora"] == texts["chameleon"]:
            return texts["chameleon"]
        return "; ".join(f"{COMPARED[regime]}: {text}" for regime, text in texts.items())

    def compare(self, request: Request) -> Comparison:
        """One request alone: cut, embed, assign, generate with all three models and summarise the generated adapters.

        Every step reads the same cut prompts (:func:`fit_prompts`); an :class:`InputError` says
        what to change when the request exceeds its token budget. It runs as a batch of one through
        :meth:`compare_batch`, the path a scheduler's merged batches take, so a request answers the
        same alone and merged.
        """
        [result] = self.compare_batch([request])
        if isinstance(result, Exception):
            raise result
        return result

    def compare_batch(self, requests: Sequence[Request], report: Report = _unreported,
                      cancelled: Callable[[int], bool] = _never) -> list[Comparison | Exception]:
        """Several requests answered together, each exactly as it would be alone; a failed request's entry is its error.

        All prompts are embedded together (padding is masked, so each embedding is its own row's);
        each request is cut, assigned and conditioned on its own: k-means among the prompts is the
        request's, and its groups (one per cluster, conditioned as the bundle was trained) take ids
        no other request shares, so no request's adapter reads another's prompts. Each model then
        runs all the rows as one mixed-cluster batch per :func:`~.inference.length_buckets` bucket, every answer
        ending where the prompt template's answer ends (:func:`~.inference.answer_stops`).
        ``report(i, comparison)`` hands over request ``i``'s comparison once it is assigned, after
        every decoding step that lengthens one of its answers (the model at work is its
        ``running``), after each model, and complete. Once ``cancelled(i)``, request ``i``'s rows
        end at the next step, no later model runs them, and its comparison completes as ``stopped``.
        """
        with self.lock:  # the tokenizer too: a fast tokenizer is not safe to call from two threads at once
            fitted = [self._fit(request) for request in requests]
            live = [i for i, f in enumerate(fitted) if isinstance(f, FittedPrompts)]
            comparisons: dict[int, Comparison] = {}

            def advance(i: int, comparison: Comparison) -> None:
                comparisons[i] = comparison
                report(i, comparison)

            if live:
                rows = MixedRows.mix(self.chameleon, [requests[i] for i in live], [fitted[i] for i in live])
                owner = [i for i, span in zip(live, rows.spans) for _ in range(span.start, span.stop)]  # row -> request
                for i, span, assignment in zip(live, rows.spans, rows.assignments):
                    advance(i, Comparison(list(requests[i].prompts), fitted[i], rows.embeddings[span], assignment, {}))
                for regime, model, tokenizer in (("base", self.model, self.tokenizer), ("lora", self.lora.model, self.lora.tokenizer),
                                                 ("chameleon", self.chameleon.model, self.chameleon.tokenizer)):
                    running = [i for i in live if not cancelled(i)]
                    if not running:
                        break
                    answers = [""] * len(rows.texts)

                    def stream(grew: dict[int, str], regime: str = regime, answers: list[str] = answers) -> None:
                        for row, text in grew.items():
                            answers[row] = text
                        for i, span in zip(live, rows.spans):
                            if i in running and any(owner[row] == i for row in grew):
                                advance(i, replace(comparisons[i], generations={**comparisons[i].generations,
                                                                                regime: answers[span]}, running=regime))

                    texts = rows.generate(model, tokenizer, answer_stops(self.template), stream,
                                          lambda row: cancelled(owner[row]))
                    for i, span in zip(live, rows.spans):
                        if i in running:
                            advance(i, replace(comparisons[i], generations={**comparisons[i].generations,
                                                                            regime: texts[span]}, running=None))
                for i in live:
                    done = comparisons[i]
                    if cancelled(i):
                        advance(i, replace(done, adapters=[], stopped=True))
                    else:
                        advance(i, replace(done, adapters=adapter_summary(self.chameleon, done.fitted.texts,
                                                                          done.embeddings, done.assignment)))
        return [comparisons.get(i, f) for i, f in enumerate(fitted)]

    def _fit(self, request: Request) -> FittedPrompts | Exception:
        """The request's prompts cut to the model's positions, or why they cannot be (that request's error alone)."""
        try:
            return fit_prompts(self.model, self.tokenizer, list(request.prompts), request.max_new_tokens,
                               self.template)
        except Exception as err:  # noqa: BLE001 (handed to the request it belongs to, never to its batch mates)
            return err


def _training(bundle: Bundle) -> dict:
    """A bundle's training rows and :data:`TRAINING_SETTINGS` (None where not recorded)."""
    meta = bundle.metadata
    train = meta.get("train", {})
    return {"rows": meta.get("rows", {}).get("train", train.get("max_train_rows")), **{key: train.get(key) for key in TRAINING_SETTINGS}}


def _trained_text(train: dict, dataset: str) -> str:
    """``rank 4, 1 epoch(s) on 999 alpaca rows of up to 128 tokens``."""
    rows = f"{train['rows']:,} {dataset} rows" if train.get("rows") else dataset
    length = f" of up to {train['max_length']} tokens" if train.get("max_length") else ""
    rank, epochs = ("?" if train.get(key) is None else train[key] for key in ("rank", "epochs"))
    return f"rank {rank}, {epochs} epoch(s) on {rows}{length}"


@dataclass
class Comparison:
    prompts: list[str]  # as the user gave them
    fitted: FittedPrompts  # as the models read them (cut where they had to be)
    embeddings: torch.Tensor  # (N, d) as they conditioned the hyper-network
    assignment: Assignment
    generations: dict[str, list[str]]  # regime -> one continuation per prompt (while it runs: the models done so far)
    adapters: list[AdapterView] | None = None  # None until the comparison is complete
    running: str | None = None  # the regime whose answers in ``generations`` are still growing
    stopped: bool = False  # ended on request: the models not run are missing from ``generations``

    @property
    def complete(self) -> bool:
        return self.adapters is not None

    def rows(self) -> list[dict]:
        """One record per prompt: its cluster, distance and the three continuations (None for a model not done yet)."""
        return [
            {"prompt": prompt, "cluster": int(self.assignment.labels[i]), "distance": float(self.assignment.distances[i]),
             **{regime: self.generations[regime][i] if regime in self.generations else None for regime in COMPARED}}
            for i, prompt in enumerate(self.prompts)
        ]


def open_bundle_set(
    model_name: str, bundle: str | Path | None = None, root: str | Path | None = None, dataset: str | None = None,
    data_dir: str | None = None, build: bool = True, max_train_rows: int | None = DEMO_SETTINGS["max_train_rows"],
    progress: Progress = _silent,
) -> BundleSet:
    """Load ``model_name`` and the bundle set for it: ``bundle`` if given, else the first fitting set
    under ``root``, else (``build``) a demo set trained now and kept under ``root``."""
    progress(0.0, f"loading {model_name}")
    model, tokenizer = load_model(model_name)
    if bundle is not None:
        path = fetch_bundle(bundle)
        try:
            check_bundle_set(path, model_fingerprint(model))
        except BundleError as err:
            raise BundleError(f"{path} is not a bundle set for {model_name}: {err}") from None
    else:
        path = find_bundle_set(root, model) if root is not None else None
        if path is None:
            dataset = dataset or infer_dataset(data_dir)
            if not build or root is None:
                raise BundleError(f"no bundle set for {model_name} found under {root}; build one with "
                                  f"`python app.py --model {model_name} --build-only`")
            out = Path(root) / demo_set_name(model_name, dataset)
            if out.exists():
                raise BundleError(f"{out} exists but was not trained on {model_name}; move it away or pass --bundle")
            path = build_bundle_set(model_name, out, dataset, data_dir,
                                    settings={**DEMO_SETTINGS, "max_train_rows": max_train_rows}, progress=lambda f, m: progress(0.05 + 0.85 * f, m),
                                    base=(model, tokenizer))
    progress(0.9, f"loading the bundle set {path.name}")
    return BundleSet.load(path, model, tokenizer)
