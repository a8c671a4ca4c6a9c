"""Inference with a bundle set: the base model, static LoRA and ChameleonLLM answering the same prompts.

A *bundle set* is a folder holding a ``lora/`` and a ``chameleon/`` bundle trained on the same data.
New prompts are embedded exactly as training conditioned (the bundle's ``metadata["embedding"]``),
assigned to the trained centroids (or clustered among themselves), and every cluster's prompts
run through ChameleonLLM with the adapter generated for that cluster, a mixed batch in one pass.
The demo app and the ``generate`` command both go through this module.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import pickle
import re
import shutil
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .bundle import Bundle, BundleError, Points, load_bundle, read_bundle_config
from .clustering import Clusters, fit_clusters
from .embeddings import default_cache_dir, embed_texts
from .hyper_head import conditioned, hyper_head
from .models import load_model, model_fingerprint

MAX_PROMPTS = 32
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 128
CLUSTER_MODES = ("centroids", "batch")  # assign to the trained centroids, or k-means on the prompts themselves
COMPARED = {"base": "Base", "lora": "Static LoRA", "chameleon": "ChameleonLLM"}  # regime -> display name
MIN_UMAP_POINTS = 30  # fewer training points than this are projected with PCA
DEMO_TRAIN_ROWS = 2000  # training rows of a demo set built on first start
_MARKUP = re.compile(r"<[A-Za-z!/?][^<>]*>|&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")

Progress = Callable[[float, str], None]


def _silent(fraction: float, message: str) -> None:
    pass


# ---------------------------------------------------------------- prompts
def validate_prompts(text: str | None) -> list[str]:
    """One prompt per line, stripped, blank lines dropped; a ``ValueError`` says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("Enter at least one prompt (one per line); the input is empty.")
    lines = re.split(r"\r\n|\r|\n", text)
    for number, line in enumerate((line for line in lines if line.strip()), start=1):
        bad = next((c for c in line if c != "\t" and unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise ValueError(
                f"Prompt {number} contains the control character U+{ord(bad):04X}; remove it "
                "(only tabs and line breaks are allowed)."
            )
    prompts = [line.strip() for line in lines if line.strip()]
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{len(prompts)} prompts given; at most {MAX_PROMPTS} fit in one batch (one per line).")
    for number, prompt in enumerate(prompts, start=1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"Prompt {number} is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}.")
    return prompts


def markup_prompts(prompts: list[str]) -> list[int]:
    """1-based numbers of the prompts that look like HTML/XML (they are still used as plain text)."""
    return [number for number, prompt in enumerate(prompts, start=1) if _MARKUP.search(prompt)]


def check_settings(mode: str, k: int, max_new_tokens: int) -> None:
    if mode not in CLUSTER_MODES:
        raise ValueError(f"unknown cluster mode {mode!r}; choose from {CLUSTER_MODES}")
    if not 1 <= k <= MAX_PROMPTS:
        raise ValueError(f"k must be between 1 and {MAX_PROMPTS}, got {k}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")


# ---------------------------------------------------------------- embedding, clusters, generation
def embed_prompts(bundle: Bundle, prompts: list[str]) -> torch.Tensor:
    """(N, d) conditioning embeddings, made with the settings the bundle was trained with."""
    return embed_texts(bundle.model, bundle.tokenizer, prompts, **bundle.metadata.get("embedding", {}))


@dataclass
class Assignment:
    labels: torch.Tensor  # (N,) cluster of each prompt
    distances: torch.Tensor  # (N,) Euclidean distance to that cluster's centroid
    centroids: torch.Tensor  # (k, d) the centroids ``labels`` index; they condition the hyper-network
    mode: str


def assign(bundle: Bundle, embeddings: torch.Tensor, mode: str = "centroids", k: int = 3, seed: int = 0) -> Assignment:
    """Nearest trained centroid, or seeded k-means among the prompts (``k`` capped at their number)."""
    if mode == "centroids":
        if bundle.clusters is None:
            raise BundleError("this bundle holds no trained clusters; use cluster mode 'batch'")
        clusters = bundle.clusters
    elif mode == "batch":
        clusters, _ = fit_clusters(embeddings, k=min(k, len(embeddings)), seed=seed)
    else:
        raise ValueError(f"unknown cluster mode {mode!r}; choose from {CLUSTER_MODES}")
    labels, distances = clusters.assign(embeddings)
    return Assignment(labels, distances, clusters.centroids, mode)


def _context_limit(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    positions = getattr(model.config, "max_position_embeddings", None)
    return None if positions is None else positions - max_new_tokens


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    embeddings: torch.Tensor | None = None,
    cluster_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    seed: int = 0,
) -> list[str]:
    """Continuations of ``prompts`` in one left-padded batch; a hyper head gets each row's cluster adapter.

    Prompts longer than the context allows keep their end. Sampling is seeded, so every model
    compared under one seed draws from the same random stream.
    """
    if hyper_head(model) is not None and (embeddings is None or cluster_ids is None):
        raise ValueError("a ChameleonLLM model needs the prompts' embeddings and cluster ids to generate")
    left = copy.copy(tokenizer)
    left.padding_side, left.truncation_side = "left", "left"
    limit = _context_limit(model, max_new_tokens)
    device = model.get_input_embeddings().weight.device
    batch = left(prompts, return_tensors="pt", padding=True, truncation=limit is not None, max_length=limit).to(device)
    torch.manual_seed(seed)
    with conditioned(model, embeddings, "cluster", cluster_ids, centroids):
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    return left.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class AdapterView:
    """The head update ChameleonLLM generated for one cluster."""

    cluster: int
    prompts: int  # how many of the prompts fell in it
    norm: float  # ||scale * B A||_F
    boosted: list[tuple[str, float]]  # tokens whose logits the update raises most, for the prompts' mean state


@torch.no_grad()
def adapter_summary(
    bundle: Bundle, prompts: list[str], assignment: Assignment, top_k: int = 6
) -> list[AdapterView]:
    """Per cluster: the size of its generated head update and the tokens ``scale * B (A h)`` boosts most.

    ``h`` is the mean final hidden state over the cluster's prompt tokens, so the boost equals
    the mean logit change the adapter makes on those prompts. ``||BA||_F`` comes from two r x r
    Gram matrices; no vocabulary-sized matrix is built.
    """
    head = hyper_head(bundle.model)
    if head is None:
        raise BundleError(f"a {bundle.adapter.regime!r} bundle has no generated adapter to summarise")
    clusters = torch.unique(assignment.labels)
    A, B = head.hyper(assignment.centroids[clusters].to(head.base.weight))  # (G, r, d), (G, V, r)
    gram = (B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))
    norms = head.scale * gram.sum((1, 2)).clamp(min=0).sqrt()
    device = head.base.weight.device
    batch = bundle.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    hidden = bundle.model.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    states = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N, d) per prompt
    views = []
    for g, cluster in enumerate(clusters.tolist()):
        members = assignment.labels.to(device) == cluster
        boost = head.scale * (B[g] @ (A[g] @ states[members].mean(0)))
        top = boost.topk(min(top_k, boost.numel()))
        tokens = [(bundle.tokenizer.decode([i]), float(v)) for i, v in zip(top.indices.tolist(), top.values)]
        views.append(AdapterView(cluster, int(members.sum()), float(norms[g]), tokens))
    return views


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
        if file.is_file():
            projection = pickle.loads(file.read_bytes())
        else:
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


# ---------------------------------------------------------------- bundle sets
def bundle_set_fits(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` holds a lora/ and a chameleon/ bundle trained on the model with ``fingerprint``."""
    try:
        configs = [read_bundle_config(path / name) for name in ("lora", "chameleon")]
    except BundleError:
        return False
    return all(config["base_fingerprint"] == fingerprint for config in configs)


def find_bundle_set(root: str | Path, model: PreTrainedModel) -> Path | None:
    """The first bundle set under ``root`` (by name) trained on ``model``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    fingerprint = model_fingerprint(model)
    return next((path for path in sorted(root.iterdir()) if path.is_dir() and bundle_set_fits(path, fingerprint)), None)


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
    max_train_rows: int | None = DEMO_TRAIN_ROWS, progress: Progress = _silent,
) -> Path:
    """Train a small static-LoRA and ChameleonLLM pair on the same data (one epoch each).

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

        train_bundle(model_name, dataset, regime, partial / regime, data_dir=data_dir, seed=seed,
                     max_train_rows=max_train_rows, progress=report)
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
        if lora.adapter.regime not in ("lora", "lora-head", "lora-matched"):
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
        with self.lock:
            return self.projection.transform(embeddings)

    def describe(self) -> dict:
        """What the set was trained on, for a status line."""
        meta = self.chameleon.metadata
        return {"path": str(self.path), "base_model": self.chameleon.base_model, "dataset": meta.get("dataset", "?"),
                "k": self.clusters.k, "points": len(self.points.texts),
                "metrics": {regime: bundle.metadata.get("metrics", {}) for regime, bundle in (("lora", self.lora), ("chameleon", self.chameleon))}}

    def compare(
        self, prompts: list[str], mode: str = "centroids", k: int = 3, max_new_tokens: int = 32,
        do_sample: bool = False, seed: int = 0, progress: Progress = _silent,
    ) -> Comparison:
        """Embed, assign, generate with all three models and summarise the generated adapters."""
        check_settings(mode, k, max_new_tokens)
        with self.lock:
            progress(0.0, "embedding the prompts")
            embeddings = embed_prompts(self.chameleon, prompts)
            assignment = assign(self.chameleon, embeddings, mode, k, seed)
            texts = [self.template.format(prompt=p) for p in prompts]
            settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed)
            generations = {}
            for step, (regime, model, tokenizer) in enumerate(
                (("base", self.model, self.tokenizer), ("lora", self.lora.model, self.lora.tokenizer),
                 ("chameleon", self.chameleon.model, self.chameleon.tokenizer))
            ):
                progress(0.1 + 0.28 * step, f"generating with {COMPARED[regime]}")
                generations[regime] = generate(model, tokenizer, texts, embeddings, assignment.labels, assignment.centroids, **settings)
            progress(0.95, "summarising the adapters")
            adapters = adapter_summary(self.chameleon, texts, assignment)
        return Comparison(prompts, embeddings, assignment, generations, adapters)


@dataclass
class Comparison:
    prompts: list[str]
    embeddings: torch.Tensor  # (N, d) as they conditioned the hyper-network
    assignment: Assignment
    generations: dict[str, list[str]]  # regime -> one continuation per prompt
    adapters: list[AdapterView]

    def rows(self) -> list[dict]:
        """One record per prompt: its cluster, distance and the three continuations."""
        return [
            {"prompt": prompt, "cluster": int(self.assignment.labels[i]), "distance": float(self.assignment.distances[i]),
             **{regime: self.generations[regime][i] for regime in COMPARED}}
            for i, prompt in enumerate(self.prompts)
        ]


def open_bundle_set(
    model_name: str, bundle: str | Path | None = None, root: str | Path | None = None, dataset: str | None = None,
    data_dir: str | None = None, build: bool = True, max_train_rows: int | None = DEMO_TRAIN_ROWS,
    progress: Progress = _silent,
) -> BundleSet:
    """Load ``model_name`` and the bundle set for it: ``bundle`` if given, else the first fitting set
    under ``root``, else (``build``) a demo set trained now and kept under ``root``."""
    progress(0.0, f"loading {model_name}")
    model, tokenizer = load_model(model_name)
    if bundle is not None:
        path = Path(bundle)
        if not bundle_set_fits(path, model_fingerprint(model)):
            raise BundleError(
                f"{path} is not a bundle set for {model_name}: it needs lora/ and chameleon/ bundles trained on that model"
            )
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
            path = build_bundle_set(model_name, out, dataset, data_dir, max_train_rows=max_train_rows,
                                    progress=lambda f, m: progress(0.05 + 0.85 * f, m))
    progress(0.9, f"loading the bundle set {path.name}")
    return BundleSet.load(path, model, tokenizer)


# ---------------------------------------------------------------- command line
def _generate_command(args: argparse.Namespace) -> dict:
    text = Path(args.prompts_file).read_text(encoding="utf-8") if args.prompts_file else "\n".join(args.prompt or [])
    prompts = validate_prompts(text)
    check_settings(args.mode, args.k, args.max_new_tokens)
    path = Path(args.bundle)
    if (path / "config.json").is_file():  # a single bundle
        model = load_model(args.model)[0] if args.model else None
        bundle = load_bundle(path, model)
        embeddings = embed_prompts(bundle, prompts)
        assignment = assign(bundle, embeddings, args.mode, args.k, args.seed)
        template = bundle.metadata.get("prompt_template", "{prompt}")
        texts = generate(bundle.model, bundle.tokenizer, [template.format(prompt=p) for p in prompts], embeddings,
                         assignment.labels, assignment.centroids, args.max_new_tokens, args.sample, args.seed)
        return {"bundle": str(path), "regime": bundle.adapter.regime, "mode": args.mode, "prompts": [
            {"prompt": p, "cluster": int(assignment.labels[i]), "distance": float(assignment.distances[i]), "generation": texts[i]}
            for i, p in enumerate(prompts)]}
    model_name = args.model or read_bundle_config(path / "chameleon")["base_model"]
    bundle_set = open_bundle_set(model_name, path, build=False)
    result = bundle_set.compare(prompts, args.mode, args.k, args.max_new_tokens, args.sample, args.seed)
    return {"bundle_set": bundle_set.describe(), "mode": args.mode, "prompts": result.rows(),
            "adapters": [asdict(view) for view in result.adapters]}


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="answer prompts with base, static LoRA and ChameleonLLM; print JSON")
    p.add_argument("--bundle", required=True, help="a bundle, or a bundle set folder holding lora/ and chameleon/")
    p.add_argument("--model", default=None, help="base model (default: the one the bundles name)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--mode", default="centroids", choices=CLUSTER_MODES)
    p.add_argument("--k", type=int, default=3, help="clusters among the prompts in --mode batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_generate_command)
