"""The demo's backend: a bundle set, its base model, static LoRA and ChameleonLLM answering the same prompts.

A *bundle set* is a folder holding a ``lora/`` and a ``chameleon/`` bundle trained on the same data.
This module finds the set for a model (by its weights' fingerprint) or builds a small one, maps the
training points in 2-D, and compares the three models on new prompts through :mod:`.inference`:
one request, or several merged into one mixed batch, each answered exactly as it would be alone.
The app (through the scheduler in :mod:`.serving`) and the ``generate`` command's bundle-set form
use it. Serving a set never imports training; only :func:`build_bundle_set` does, when it trains.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import pickle
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .bundle import Bundle, BundleError, Points, fetch_bundle, load_bundle, read_bundle_config
from .clustering import Clusters
from .hyper_head import condition_groups, hyper_head
from .inference import (
    AdapterView,
    Assignment,
    FittedPrompts,
    InputError,
    Settings,
    Stream,
    adapter_summary,
    answer_stops,
    assign,
    check_settings,
    embed_prompts,
    fit_prompts,
    generate_rows,
    row_seeds,
)
from .models import default_cache_dir, load_model, model_fingerprint
from .regimes import STATIC

COMPARED = {"base": "Base", "lora": "Static LoRA", "chameleon": "ChameleonLLM"}  # regime -> display name
MIN_UMAP_POINTS = 30  # fewer training points than this are projected with PCA
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
# An absolute path (the server's layout) in a message a client sees: kept to its last two parts.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])/(?:[^/\s'\"`]+/)*([^/\s'\"`]+/[^/\s'\"`]+)")
_MARKUP = re.compile(r"<[A-Za-z!/?][^<>]*>|&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")

Progress = Callable[[float, str], None]


def _silent(fraction: float, message: str) -> None:
    pass


Report = Callable[[int, "Comparison"], None]  # (request's index in the batch, its comparison so far)


def _unreported(index: int, comparison: Comparison) -> None:
    pass


def _never(index: int) -> bool:
    return False


def markup_prompts(prompts: list[str]) -> list[int]:
    """1-based numbers of the prompts that look like HTML/XML (they are still used as plain text)."""
    return [number for number, prompt in enumerate(prompts, start=1) if _MARKUP.search(prompt)]


# ---------------------------------------------------------------- 2-D map of the training points
@dataclass
class Projection:
    """A 2-D map fitted once on training embeddings; ``transform`` places new prompts on it."""

    method: str  # "umap" or "pca"
    reducer: object
    coords: np.ndarray  # (n, 2) the training points

    def transform(self, embeddings: torch.Tensor) -> np.ndarray:
        return np.asarray(self.reducer.transform(embeddings.float().cpu().numpy()))


_PROJECTIONS: dict[str, Projection] = {}
_PROJECTION_LOCK = threading.Lock()


def fit_projection(embeddings: torch.Tensor, seed: int = 0, cache_dir: str | Path | None = None) -> Projection:
    """UMAP (PCA below ``MIN_UMAP_POINTS`` points), cached in memory and on disk by content.

    The disk cache lives in the user's cache folder, never in a bundle: it is a pickle, and a
    bundle is data that may come from anyone.
    """
    points = embeddings.float().cpu().numpy()
    method = "umap" if len(points) >= MIN_UMAP_POINTS else "pca"
    key = hashlib.blake2b(f"{method}:{seed}:{points.shape}".encode() + points.tobytes(), digest_size=16).hexdigest()
    file = Path(cache_dir or default_cache_dir()) / "projections" / f"{key}.pkl"
    with _PROJECTION_LOCK:
        if key in _PROJECTIONS:
            return _PROJECTIONS[key]
        projection = _cached_projection(file)
        if projection is None:
            if method == "umap":
                import umap

                reducer = umap.UMAP(n_neighbors=15, random_state=seed, n_jobs=1)
            else:
                from sklearn.decomposition import PCA

                reducer = PCA(n_components=min(2, *points.shape), random_state=seed)
            coords = reducer.fit_transform(points)
            projection = Projection(method, reducer, np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))))
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(projection))
            tmp.replace(file)
        _PROJECTIONS[key] = projection
        return projection


def _cached_projection(file: Path) -> Projection | None:
    """The projection pickled in ``file``, or None when it is absent or unreadable: written by another
    version of this code (a class that moved), by other library versions, or cut short."""
    try:
        projection = pickle.loads(file.read_bytes())
    except Exception:  # noqa: BLE001 (absent, or any unpickling failure: a cache miss, the map is refitted)
        return None
    return projection if isinstance(projection, Projection) else None


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


def client_message(message: str, sets: str | Path | None = None) -> str:
    """``message`` as a client may see it: the folder holding the bundle sets is left out (a bundle is
    named by its set-relative name, ``trunc/chameleon``) and any other absolute path is cut to its last
    two parts, so no client learns the server's layout. The server's log keeps the full message."""
    if sets is not None:
        message = message.replace(f"{str(sets).rstrip('/')}/", "")
    return _ABSOLUTE_PATH.sub(r"\1", message)


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
    Another guards the map's projection, so placing prompts on it never waits for a generation.
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
        self._map_lock = threading.Lock()

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

    @functools.cached_property
    def projection(self) -> Projection:
        """The 2-D map of the training points, fitted on first use."""
        projection = fit_projection(self.points.embeddings)
        projection.transform(self.points.embeddings[:1])  # compiles UMAP's transform now, not on a first request
        return projection

    def place(self, embeddings: torch.Tensor) -> np.ndarray:
        """(N, 2) map coordinates of new inputs, next to the training points' ``projection.coords``."""
        with self._map_lock:
            return self.projection.transform(embeddings)

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

    def compare(
        self, prompts: list[str], clusters: str = "trained", k: int = 3, max_new_tokens: int = 32,
        do_sample: bool = False, seed: int = 0,
    ) -> Comparison:
        """One request alone: cut, embed, assign, generate with all three models and summarise the generated adapters.

        Every step reads the same cut prompts (:func:`fit_prompts`); an :class:`InputError` says
        what to change when a setting is out of range or the request exceeds its token budget. It
        runs as a batch of one through :meth:`compare_batch`, the path a scheduler's merged batches
        take, so a request answers the same alone and merged.
        """
        [result] = self.compare_batch([make_request(prompts, clusters, k, max_new_tokens, do_sample, seed)])
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
        runs all the rows as one mixed-cluster batch per :func:`length_buckets` bucket, every answer
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
                rows = self._mix([requests[i] for i in live], [fitted[i] for i in live])
                owner = [i for i, span in zip(live, rows.spans) for _ in range(span.start, span.stop)]  # row -> request
                for i, comparison in zip(live, rows.comparisons):
                    advance(i, comparison)
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
            return fit_prompts(self.model, self.tokenizer, list(request.prompts), request.settings.max_new_tokens,
                               self.template)
        except Exception as err:  # noqa: BLE001 (handed to the request it belongs to, never to its batch mates)
            return err

    def _mix(self, requests: list[Request], fitted: list[FittedPrompts]) -> MixedRows:
        """Every request's rows side by side: embedded at once, then assigned and conditioned request by request."""
        sizes = [len(f.texts) for f in fitted]
        embeddings = embed_prompts(self.chameleon, [condition for f in fitted for condition in f.conditions])
        conditioning = self.chameleon.adapter.conditioning
        comparisons, conditions, groups = [], [], []
        for request, f, own in zip(requests, fitted, embeddings.split(sizes)):
            settings = request.settings
            assignment = assign(self.chameleon, own, settings.clusters, settings.k, settings.seed)
            comparisons.append(Comparison(list(request.prompts), f, own, assignment, {}))
            vectors, group = condition_groups(own, conditioning, assignment.labels, assignment.centroids)
            groups.append(group + sum(map(len, conditions)))  # ids unique to this request
            conditions.append(vectors)
        seeds = [seed for r, size in zip(requests, sizes) for seed in row_seeds(size, r.settings.do_sample, r.settings.seed)]
        ends = np.cumsum(sizes).tolist()
        return MixedRows(comparisons, [slice(end - size, end) for end, size in zip(ends, sizes)],
                         [text for f in fitted for text in f.texts], [n for f in fitted for n in f.lengths],
                         [f.max_new_tokens for f in fitted for _ in f.texts], seeds, embeddings, torch.cat(groups),
                         torch.cat(conditions))


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


class Request(NamedTuple):
    """One client's prompts and checked settings (:func:`make_request`): what a mixed batch answers."""

    prompts: tuple[str, ...]
    settings: Settings


def make_request(
    prompts: list[str], clusters: str = "trained", k: int = 3, max_new_tokens: int = 32, do_sample: bool = False,
    seed: int = 0,
) -> Request:
    """A request with its settings checked: an :class:`InputError` says what to change."""
    if not prompts:
        raise InputError("Enter at least one prompt; the request has none.")
    return Request(tuple(prompts), check_settings(clusters, k, max_new_tokens, seed, "sample" if do_sample else "greedy"))


def length_buckets(lengths: Sequence[int], new_tokens: Sequence[int]) -> list[list[int]]:
    """Row indices grouped into the batches they are generated in: one per number of new tokens,
    split further by prompt length only where that pays.

    Every decoding step costs a batch about the same whatever its prompts' lengths, and a second
    batch repeats every step, so rows stay together unless padding them to the longest would make
    more than half of the batch's prompt tokens padding. Rows keep their order within a batch.
    """
    by_tokens: dict[int, list[int]] = {}
    for row, tokens in enumerate(new_tokens):
        by_tokens.setdefault(tokens, []).append(row)
    buckets = []
    for rows in by_tokens.values():
        bucket, real = [], 0
        for row in sorted(rows, key=lengths.__getitem__):
            if bucket and (len(bucket) + 1) * lengths[row] > 2 * (real + lengths[row]):
                buckets.append(sorted(bucket))
                bucket, real = [], 0
            bucket.append(row)
            real += lengths[row]
        buckets.append(sorted(bucket))
    return buckets


@dataclass
class MixedRows:
    """The rows of several requests side by side, with what each model needs to generate them together."""

    comparisons: list[Comparison]  # each request's, assigned, no generations yet
    spans: list[slice]  # each request's rows
    texts: list[str]
    lengths: list[int]  # tokens of each text
    new_tokens: list[int]
    seeds: list[int | None]  # each row's sampling seed (None: greedy), from its request's seed and its row there
    embeddings: torch.Tensor  # (N, d)
    groups: torch.Tensor  # (N,) each row's group: one per (request, cluster)
    conditions: torch.Tensor  # (G, d) each group's conditioning vector, made from its own request's rows

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = (),
                 stream: Stream | None = None, cancelled: Callable[[int], bool] | None = None) -> list[str]:
        """Every row's continuation, a batch per length bucket; ``stops``, ``stream`` and ``cancelled``
        as :func:`~.inference.generate_rows`'s, with the rows numbered as here.

        Each group's vector is handed to the head as its ``centroid``, so a bucket holding part of
        a group is conditioned on the whole group, exactly as the request alone would be.
        """
        texts = [""] * len(self.texts)
        for bucket in length_buckets(self.lengths, self.new_tokens):
            generated = generate_rows(
                model, tokenizer, [self.texts[i] for i in bucket], [self.seeds[i] for i in bucket], self.embeddings[bucket],
                self.groups[bucket], self.conditions, self.new_tokens[bucket[0]], "centroid", stops,
                stream and (lambda grew, bucket=bucket: stream({bucket[row]: text for row, text in grew.items()})),
                cancelled and (lambda row, bucket=bucket: cancelled(bucket[row])),
            )
            for row, text in zip(bucket, generated):
                texts[row] = text
        return texts


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
