"""Training and evaluation of one regime under one protocol, with checkpoints and resume.

``train`` reads as its steps: set up the model and data, resume from a checkpoint, train epoch by
epoch (a checkpoint after each), then finish: the final evaluation, the bundle and the metrics.
A run folder is also a bundle: after the last epoch it holds the adapters (``load_bundle`` reads
it), ``metrics.json`` and ``metrics.csv``; while training it holds ``checkpoint.pt``, from which
``resume=True`` continues to the same final metrics as an uninterrupted run. ``runs`` says what a
folder holds and writes its records. With ``selection_rows`` the epochs are validated (and stopped early) on
rows carved from the training rows, and the reported split is scored once, at the end.
Multi-GPU: ``accelerate launch -m chameleon_core train ...``; each process takes every
``num_processes``-th cluster-homogeneous batch.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .bundle import Points, load_bundle, read_bundle_config, save_bundle
from .clustering import ClusterBatchSampler, Clusters, RandomBatchSampler, fit_clusters
from .data import INSTRUCTION_DATASETS, Record, load_dataset_splits
from .embeddings import CONDITION_SOURCES
from .features import Features, cached_features
from .features import packed_row_terms, row_terms as feature_row_terms
from .hyper_head import ConditionedHead, adapter_diversity, conditioned, conditioned_head
from .models import load_model, resolve_device
from .protocols import Encoded, Protocol, get_protocol
from .regimes import CONDITIONED, HEAD_ONLY, ROUTED, AdapterConfig, adapter_state, apply_regime, trainable_parameters
from .runs import clear_run, config_dict, finished_run, run_folder, save_checkpoint, write_finished_run

SAMPLERS = ("cluster", "random")
POINTS_IN_BUNDLE = 2000

MAX_SEED = 2**32 - 1  # NumPy takes 32-bit seeds


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: the run stops there instead of saving adapters that are noise."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The adapter settings (regime through ``hyper_dropout``) form :attr:`adapter`."""

    model: str = "random:tiny-gpt2"
    dataset: str = "synthetic"
    data_dir: str | None = None
    regime: str = "chameleon"
    protocol: str = "causal"
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 32
    rank: int = 4
    alpha: float = 4.0
    seed: int = 0
    data_seed: int = 0  # the split stays fixed while the training seed varies
    max_length: int = 256
    context_tokens: int = 32
    sampler: str = "cluster"
    conditioning: str = "batch"  # see hyper_head.CONDITIONING
    init: str = "peft"
    targets: tuple[str, ...] = ()  # empty: the architecture's defaults
    hyper_hidden: tuple[int, ...] = (64, 32)
    hyper_dropout: float = 0.5
    hyper_init: str = "paper"  # the hyper-network's output layer at the start: hyper_head.HYPER_INITS
    condition_source: str = "embeddings"  # what a condition's vector averages: embeddings.CONDITION_SOURCES
    k: int | None = None  # number of clusters; default N // batch_size (the paper)
    transductive: bool | None = None  # cluster the eval split itself; default: the protocol's (paper: yes)
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    # rows carved from the training rows (seeded by data_seed) that every epoch's validation and early stopping read,
    # so that the reported splits are scored once, at the end; unset: the validation split
    selection_rows: int | None = None
    patience: int | None = None  # stop once validation loss has not improved for this many epochs; keep the best
    cached_features: bool = False  # head-only regimes: train the head on the frozen transformer's cached states
    device: str = "auto"

    def __post_init__(self):
        get_protocol(self.protocol)  # a ValueError naming the choices
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {SAMPLERS}")
        if self.condition_source not in CONDITION_SOURCES:
            raise ValueError(f"unknown condition source {self.condition_source!r} (--condition-source); choose from "
                             f"{', '.join(CONDITION_SOURCES)}")
        object.__setattr__(self, "targets", tuple(self.targets))  # lists from JSON or a command line
        object.__setattr__(self, "hyper_hidden", tuple(self.hyper_hidden))
        limits = (  # (field, whether its value is usable, what is allowed)
            ("epochs", self.epochs >= 0, "an integer >= 0"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("max_length", self.max_length >= 2, "an integer >= 2"),
            ("context_tokens", self.context_tokens >= 1, "an integer >= 1"),
            ("k", self.k is None or self.k >= 1, "an integer >= 1, or unset (rows // batch size)"),
            ("max_train_rows", self.max_train_rows is None or self.max_train_rows >= 1, "an integer >= 1, or unset (all)"),
            ("max_eval_rows", self.max_eval_rows is None or self.max_eval_rows >= 1, "an integer >= 1, or unset (all)"),
            ("selection_rows", self.selection_rows is None or self.selection_rows >= 1,
             "an integer >= 1, or unset (epochs are validated on the validation split)"),
            ("seed", 0 <= self.seed <= MAX_SEED, "an integer from 0 to 2**32 - 1"),
            ("data_seed", 0 <= self.data_seed <= MAX_SEED, "an integer from 0 to 2**32 - 1"),
            ("patience", self.patience is None or self.patience >= 1, "an integer >= 1 epoch, or unset (every epoch)"),
        )
        for name, usable, allowed in limits:
            if not usable:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {allowed}, got {getattr(self, name)!r}")
        if self.selection_rows is not None and self.max_train_rows is not None:
            _check_selection(self.selection_rows, self.max_train_rows)
        self.adapter  # a ValueError naming a bad adapter setting

    @property
    def adapter(self) -> AdapterConfig:
        """The adapter this run trains (its cluster count is set once k-means has run)."""
        return AdapterConfig(
            regime=self.regime, rank=self.rank, alpha=self.alpha, init=self.init, targets=self.targets,
            hyper_hidden=self.hyper_hidden, hyper_dropout=self.hyper_dropout, hyper_init=self.hyper_init,
            conditioning=self.conditioning,
        )

    @property
    def is_transductive(self) -> bool:
        return get_protocol(self.protocol).transductive if self.transductive is None else self.transductive


@dataclass
class Split:
    """An encoded split with its cluster labels."""

    name: str
    encoded: Encoded
    labels: torch.Tensor
    features: Features | None = None  # the frozen transformer's hidden states (head-only regimes, cached_features)


def _check_selection(selection_rows: int, train_rows: int) -> None:
    if selection_rows >= train_rows:
        raise ValueError(f"selection_rows (--selection-rows) {selection_rows} leaves {train_rows - selection_rows} of "
                         f"the {train_rows} training rows to train on; it must leave at least one")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _subsample(records: list, limit: int | None, seed: int) -> list:
    if limit is None or len(records) <= limit:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def batches(split: Split, config: TrainConfig, seed: int, epoch: int = 0, rank: int = 0, replicas: int = 1) -> list[list[int]]:
    """Cluster-homogeneous batches (or random ones for the ablation), sharded across processes."""
    if config.sampler == "random":
        sampler = RandomBatchSampler(len(split.encoded), config.batch_size, seed, num_replicas=replicas, rank=rank)
    else:
        sampler = ClusterBatchSampler(split.labels, config.batch_size, seed, num_replicas=replicas, rank=rank)
    sampler.set_epoch(epoch)
    return list(sampler)


def _conditioned(model, split: Split, idx: list[int], config: TrainConfig, clusters: Clusters, embeddings: torch.Tensor | None = None):
    """The conditioning context of one batch: the paper's batch mean, a centroid, or per example.

    ``lora-per-cluster`` always routes each row to its nearest training centroid's adapter: in
    training that is the row's own k-means cluster, so a cluster-homogeneous batch uses one adapter.
    """
    device = next(model.parameters()).device
    emb = (split.encoded.embeddings[idx] if embeddings is None else embeddings).to(device)
    routed = config.regime in ROUTED or config.conditioning == "centroid"
    # "batch" reads the whole batch's mean: the batch is one cluster, or (random batches) the ablation's mix
    ids = clusters.assign(emb)[0] if routed else None
    return conditioned(model, emb, config.conditioning, ids, clusters.centroids)


@torch.no_grad()
def evaluate(
    model, split: Split, config: TrainConfig, clusters: Clusters, pad_id: int, shuffle_condition: bool = False,
    progress: bool = False,
) -> dict:
    """Loss and perplexity of ``split``, aggregated over its batches as the protocol says, and under
    ``"per_row"`` each row's summed loss and scored targets (row order of ``split``), for paired comparisons.

    ``shuffle_condition`` conditions every batch on a *different* cluster's centroid (ablation).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    protocol = get_protocol(config.protocol)
    rng = np.random.default_rng(config.seed)
    sums, counts = [], []
    row_loss, row_targets = np.zeros(len(split.encoded)), np.zeros(len(split.encoded), dtype=int)
    for idx in tqdm(batches(split, config, seed=0), desc=f"eval {split.name}", disable=not progress, leave=False):
        embeddings = None  # the rows' own
        if shuffle_condition:
            own = int(clusters.assign(split.encoded.embeddings[idx].mean(0, keepdim=True))[0])
            other = (own + 1 + int(rng.integers(clusters.k - 1))) % clusters.k if clusters.k > 1 else own
            embeddings = clusters.centroids[other].expand(len(idx), -1)
        with _conditioned(model, split, idx, config, clusters, embeddings):
            row_sums, row_counts = _row_terms(model, split, idx, protocol, pad_id, device)
        row_loss[idx], row_targets[idx] = row_sums.cpu().double().numpy(), row_counts.cpu().numpy()
        if n := int(row_counts.sum()):
            sums.append(float(row_sums.sum()))
            counts.append(n)
    model.train(was_training)
    loss = protocol.split_loss(sums, counts)
    per_row = {"keys": row_keys(split.encoded.texts), "loss": row_loss.tolist(), "targets": row_targets.tolist()}
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "targets": sum(counts), "rows": len(split.encoded), "per_row": per_row}


def _row_terms(model, split: Split, idx: list[int], protocol: Protocol, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed loss and (B,) scored targets of the rows ``idx``: through the whole model, or, where the split
    carries cached features, through the model's output head alone (the same numbers for a head-only regime)."""
    if split.features is not None:
        head = model.get_output_embeddings()
        if not isinstance(head, ConditionedHead) or head.shared:  # each position's logits depend on it alone
            hidden, targets, rows = split.features.pack(idx)
            logits = head(hidden.to(device))  # (1, N, V): every scored position of the batch, no padding
            return packed_row_terms(logits, targets.to(device), rows.to(device), len(idx))
        hidden, targets = split.features.collate(idx)
        logits = head(hidden.to(device))  # (B, T, V) at the scored positions
        return feature_row_terms(logits, targets.to(device))
    batch = {k: v.to(device) for k, v in protocol.collate(split.encoded, idx, pad_id).items()}
    return protocol.row_terms(protocol.forward_logits(model, batch), batch["labels"])


def row_keys(texts: list[str]) -> list[str]:
    """One key per row that names its record across runs (its conditioning text, hashed; repeats numbered),
    so that two runs' rows pair up even where one run dropped rows the other kept."""
    seen: dict[str, int] = {}
    keys = []
    for text in texts:
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        seen[digest] = seen.get(digest, -1) + 1
        keys.append(f"{digest}-{seen[digest]}")
    return keys


def eval_split_name(splits: dict[str, list[Record]]) -> str:
    """The split a run reports on: test where the dataset has one, else validation."""
    return "test" if "test" in splits else "validation"


def _encode(records: list[Record], config: TrainConfig, model, tokenizer) -> Encoded:
    return get_protocol(config.protocol).encode(records, model, tokenizer, config.max_length, config.context_tokens,
                                                config.condition_source)


def held_out_split(name: str, records: list[Record], config: TrainConfig, model, tokenizer, clusters: Clusters) -> Split:
    """A split other than train as a run sees it: up to ``max_eval_rows`` rows, encoded, and labelled for
    batching by the nearest training centroid or (transductive, the published way) by k-means on the split
    itself. Training and ``evaluate_bundle`` both build their splits here, so the two cannot drift apart."""
    encoded = _encode(_subsample(records, config.max_eval_rows, config.data_seed), config, model, tokenizer)
    return _labelled(name, encoded, config, clusters)


def _labelled(name: str, encoded: Encoded, config: TrainConfig, clusters: Clusters) -> Split:
    """A split other than train, labelled for batching as :func:`held_out_split` says."""
    if config.is_transductive:
        k = min(config.k, len(encoded)) if config.k else None  # config.k: the training k, which fit_clusters keeps
        return Split(name, encoded, fit_clusters(encoded.embeddings, k, config.batch_size, config.seed)[1])
    return Split(name, encoded, clusters.assign(encoded.embeddings)[0])


def selection_split(records: list[Record], config: TrainConfig) -> tuple[list[Record], list[Record]]:
    """(the rows to train on, the selection rows): ``config.selection_rows`` of ``records`` drawn with a seed made
    from ``data_seed`` alone, so every run of one data seed (any training seed, learning rate or regime) holds out
    the same rows, and never trains on them. Without ``selection_rows``: (``records``, [])."""
    if config.selection_rows is None:
        return records, []
    _check_selection(config.selection_rows, len(records))
    chosen = set(random.Random(f"selection:{config.data_seed}").sample(range(len(records)), config.selection_rows))
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def prepare(config: TrainConfig, model, tokenizer) -> tuple[Split, Split, Split, Clusters, dict]:
    """Load, encode and cluster the splits: (train, the split each epoch is validated on, evaluation, clusters, facts).

    Each epoch is validated on the validation split, or with ``selection_rows`` on the selection split carved from
    the training rows (labelled as a held-out split is), which then leaves the validation split unread."""
    splits = load_dataset_splits(config.dataset, config.data_dir, config.data_seed)
    records, selection = selection_split(_subsample(splits["train"], config.max_train_rows, config.data_seed), config)
    encoded = _encode(records, config, model, tokenizer)
    if len(encoded) < 1:
        raise ValueError(f"no training row of {config.dataset} is long enough to score under {config.protocol!r}")
    clusters, train_labels = fit_clusters(encoded.embeddings, config.k, config.batch_size, config.seed)
    eval_name = eval_split_name(splits)
    held = {name: held_out_split(name, splits[name], config, model, tokenizer, clusters)
            for name in ("validation", eval_name) if name == eval_name or not selection}
    if selection:
        held["selection"] = _labelled("selection", _encode(selection, config, model, tokenizer), config, clusters)
        if len(held["selection"].encoded) < 1:
            raise ValueError(f"no selection row of {config.dataset} is long enough to score under {config.protocol!r}; "
                             "raise --selection-rows")
    every = {"train": Split("train", encoded, train_labels), **held}
    info = {
        "eval_split": eval_name,
        "rows": {name: len(split.encoded) for name, split in every.items()},
        "dropped_rows": {name: split.encoded.dropped for name, split in every.items()},
        "k": clusters.k,
        "padding_share": {name: split.encoded.padding_share for name, split in every.items()
                          if split.encoded.padding_share is not None},
        "embedding": get_protocol(config.protocol).embedding_settings(
            config.dataset in INSTRUCTION_DATASETS, config.max_length, config.context_tokens, config.condition_source
        ),
    }
    return every["train"], held["selection" if selection else "validation"], held[eval_name], clusters, info


@dataclass
class _Run:
    """A run in training: what ``train`` sets up once, and the progress each epoch adds (what a checkpoint holds)."""

    config: TrainConfig
    out: Path
    accelerator: Accelerator
    model: torch.nn.Module  # what trains: wrapped for multi-process training once the accelerator prepares it
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer | None  # None: the regime trains nothing
    train_split: Split
    val_split: Split  # what each epoch is validated on: the validation split, or the selection split
    eval_split: Split
    clusters: Clusters
    info: dict  # what prepare says about the splits, for the metrics
    adapter: AdapterConfig
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    best: dict | None = None  # with patience: {"epoch", "val" (its evaluation), "adapter"} of the lowest validation loss so far

    @property
    def core(self) -> torch.nn.Module:
        """The model itself, out of any multi-process wrapper: what is conditioned, evaluated and saved."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def epochs(self) -> int:
        """The epochs to train: none where the regime has nothing to train (``base``)."""
        return self.config.epochs if self.optimizer is not None else 0


def train(
    config: TrainConfig, out: str | Path, resume: bool = False, progress: Callable[[float, str], None] | None = None,
    show_progress: bool = True, overwrite: bool = False,
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> dict:
    """Train one regime, evaluate it, and write the run folder (a loadable bundle + metrics).

    ``progress(fraction, message)`` is called as work advances (for a UI). A finished run
    folder is returned as it is when ``resume`` is set. Nothing is lost silently: ``resume``
    refuses a folder made with another configuration, and a fresh run refuses a folder that
    already holds a run unless ``overwrite``. Both are checked before any model is loaded.
    ``base``: ``config.model`` already loaded, which this run adapts in place (pass a copy to keep it).
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if config.cached_features and config.regime not in HEAD_ONLY:
        raise ValueError(f"cached_features (--cached-features) needs a head-only regime ({', '.join(HEAD_ONLY)}); "
                         f"{config.regime!r} adapts the transformer, whose hidden states then change as it trains")
    device = resolve_device(config.device)  # a device asked for and missing is refused before any work
    out, recorded = run_folder(out, config, resume, overwrite)
    if resume and (done := finished_run(out, config)):
        return done
    report = progress or (lambda fraction, message: None)
    began = time.time()
    accelerator = Accelerator(cpu=device.type == "cpu")
    run = _setup(config, out, accelerator, report, show_progress, base)
    if recorded is not None and recorded.checkpoint is not None:
        _resume(run, recorded.checkpoint)
    if overwrite and accelerator.is_main_process:  # the replaced run's records go once this run starts
        clear_run(out)
    if run.optimizer is not None:
        run.model, run.optimizer = accelerator.prepare(run.model, run.optimizer)
    val = None  # the last epoch's validation
    for epoch in range(run.start_epoch, run.epochs):
        if run.best is not None and epoch - run.best["epoch"] >= config.patience:
            break  # no better validation loss for `patience` epochs
        val = _run_epoch(run, epoch, report, show_progress)
        if accelerator.is_main_process:
            save_checkpoint(out, _checkpoint(run, epoch))
    return _finish(run, val, report, began)


def _setup(
    config: TrainConfig, out: Path, accelerator: Accelerator, report: Callable[[float, str], None], show_progress: bool,
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None,
) -> _Run:
    """The model loaded and adapted, the splits encoded and clustered, and the optimizer for the adapters."""
    report(0.0, f"loading {config.model}")
    if base is None:
        model, tokenizer = load_model(config.model, device=str(accelerator.device))
    else:
        model, tokenizer = base[0].to(accelerator.device), base[1]
    seed_everything(config.seed)  # after loading: a random model seeds itself while it is built
    report(0.05, f"encoding {config.dataset} ({config.protocol} protocol)")
    train_split, val_split, eval_split, clusters, info = prepare(config, model, tokenizer)
    if config.cached_features:  # before the adapters: the frozen transformer's states, once per split
        if accelerator.num_processes > 1:
            raise ValueError("cached_features (--cached-features) trains in one process; leave it out with accelerate")
        report(0.07, "computing the transformer's hidden states (cached)")
        protocol, pad_id = get_protocol(config.protocol), tokenizer.pad_token_id
        for split in {id(split): split for split in (train_split, val_split, eval_split)}.values():  # eval may be val
            split.features = cached_features(model, split.encoded, protocol, pad_id, progress=show_progress)
    adapter = apply_regime(model, replace(config.adapter, k=clusters.k)).config
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr) if params else None
    return _Run(config, out, accelerator, model, tokenizer, optimizer, train_split, val_split, eval_split, clusters, info, adapter)


def _checkpoint(run: _Run, epoch: int) -> dict:
    """The state after ``epoch`` that :func:`_resume` continues from."""
    return {"config": config_dict(run.config), "epoch": epoch, "adapter": adapter_state(run.core),
            "optimizer": run.optimizer.state_dict(), "rng": torch.get_rng_state(), "history": run.history, "best": run.best}


def _resume(run: _Run, state: dict) -> None:
    """Continue after a checkpoint's epoch, with its adapters, optimizer, random state and history, so that the run
    ends with the same metrics as one never interrupted."""
    run.model.load_state_dict(state["adapter"], strict=False)
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    run.history, run.start_epoch, run.best = state["history"], state["epoch"] + 1, state.get("best")


def _run_epoch(run: _Run, epoch: int, report: Callable[[float, str], None], show_progress: bool) -> dict:
    """One epoch over this process's share of the batches, then validation, recorded in the run's history;
    returns the validation result."""
    config, accelerator, core = run.config, run.accelerator, run.core
    protocol, pad_id = get_protocol(config.protocol), run.tokenizer.pad_token_id
    run.model.train()
    started, losses = time.time(), []
    epoch_batches = batches(run.train_split, config, config.seed, epoch, accelerator.process_index, accelerator.num_processes)
    bar = tqdm(epoch_batches, desc=f"{config.regime} epoch {epoch + 1}/{run.epochs}", disable=not show_progress or not accelerator.is_main_process, leave=False)
    for step, idx in enumerate(bar):
        with _conditioned(core, run.train_split, idx, config, run.clusters):
            row_sums, row_counts = _row_terms(run.model, run.train_split, idx, protocol, pad_id, accelerator.device)
            loss = row_sums.sum() / row_counts.sum().clamp(min=1)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                checkpoint = run.out / "checkpoint.pt"
                raise TrainingDiverged(
                    f"training stopped at epoch {epoch + 1}, step {step + 1}: the loss became {losses[-1]} "
                    f"(lr {config.lr:g}, alpha {config.alpha:g}); nothing was saved as finished"
                    + (f" ({checkpoint.name} holds the last finished epoch)" if checkpoint.is_file() else "")
                    + ". Lower --lr or --alpha and start over with --overwrite"
                )
            accelerator.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        report(0.1 + 0.85 * (epoch + (step + 1) / len(epoch_batches)) / run.epochs, f"epoch {epoch + 1}/{run.epochs}: loss {losses[-1]:.3f}")
    val = evaluate(core, run.val_split, config, run.clusters, pad_id)
    run.history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val["loss"], "val_ppl": val["ppl"], "seconds": time.time() - started, "step_losses": losses})
    if config.patience and (run.best is None or val["loss"] < run.best["val"]["loss"]):
        run.best = {"epoch": epoch + 1, "val": val, "adapter": {k: v.clone() for k, v in adapter_state(core).items()}}
    return val


def _finish(run: _Run, val: dict | None, report: Callable[[float, str], None], began: float) -> dict:
    """The run's metrics: the final evaluation of its kept adapters; the main process saves the bundle beside them
    and marks the run finished."""
    config, core, clusters, pad_id = run.config, run.core, run.clusters, run.tokenizer.pad_token_id
    train_split, eval_split, history, info = run.train_split, run.eval_split, run.history, run.info
    if run.best is not None:  # early stopping: the best epoch's adapters are the run's
        core.load_state_dict(run.best["adapter"], strict=False)
        val = run.best["val"]
    report(0.95, "evaluating")
    # the last epoch's validation pass already scored the evaluation split when the two are one split
    ran_last_epoch = run.start_epoch < run.epochs
    final = val if ran_last_epoch and eval_split is run.val_split else evaluate(core, eval_split, config, clusters, pad_id)
    train_loss = history[-1]["train_loss"] if history else evaluate(core, train_split, config, clusters, pad_id)["loss"]
    if not history:  # nothing trained: the untrained model's selection loss; without selection rows, as ever, its evaluation
        val = evaluate(core, run.val_split, config, clusters, pad_id) if config.selection_rows else final
    result = {
        "config": config_dict(config),
        "adapter": run.adapter.to_dict(),
        "trainable_parameters": trainable_parameters(core),
        "total_parameters": sum(p.numel() for p in core.parameters()),
        "train_loss": train_loss,
        "eval": final,
        "history": history or [{"epoch": 0, "train_loss": train_loss, "val_loss": val["loss"], "val_ppl": val["ppl"], "seconds": 0.0, "step_losses": []}],
        "steps": sum(len(h["step_losses"]) for h in history),
        **info,
        "selection": config.selection_rows is not None,  # whether history's val_loss is the selection split's
        "complete": True,
    }
    if run.best is not None:
        result["best_epoch"] = run.best["epoch"]
    if config.regime in CONDITIONED:
        result["eval_shuffled_condition"] = evaluate(core, eval_split, config, clusters, pad_id, shuffle_condition=True)
    rows = {key: result[key].pop("per_row") for key in ("eval", "eval_shuffled_condition") if key in result}
    if (head := conditioned_head(core)) is not None:
        result["adapter_diversity"] = adapter_diversity(head, clusters.centroids)
    result["wall_seconds"] = time.time() - began  # this process's share when the run was resumed
    if run.accelerator.is_main_process:
        sample = torch.randperm(len(train_split.encoded), generator=torch.Generator().manual_seed(0))[:POINTS_IN_BUNDLE]
        points = Points(train_split.encoded.embeddings[sample], train_split.labels[sample], [train_split.encoded.texts[i][:300] for i in sample])
        metadata = {"dataset": config.dataset, "protocol": config.protocol, "embedding": info["embedding"], "train": config_dict(config), "rows": info["rows"], "metrics": {k: result[k] for k in ("train_loss", "eval")}}
        if config.dataset == "alpaca":
            metadata["prompt_template"] = "### Instruction:\n{prompt}\n\n### Response:\n"
        save_bundle(run.out, core, run.tokenizer, run.adapter, clusters, metadata, config.model, points)
        write_finished_run(run.out, result, rows)
    report(1.0, "done")
    return result


def train_bundle(
    model: str, dataset: str, regime: str, out: str | Path, *, data_dir: str | None = None, seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None, **settings,
) -> Path:
    """A trained bundle for a demo (causal protocol); ``settings`` are :class:`TrainConfig` fields."""
    config = TrainConfig(model=model, dataset=dataset, data_dir=data_dir, regime=regime, seed=seed, **settings)
    train(config, out, resume=True, progress=progress, base=base)
    return Path(out)


def evaluate_bundle(
    bundle: str | Path, *, dataset: str | None = None, data_dir: str | None = None, protocol: str | None = None,
    split: str | None = None, max_eval_rows: int | None = None, device: str = "auto",
) -> dict:
    """Evaluate a bundle written by :func:`train` on one split, prepared exactly as its training run prepared it.

    ``dataset``, ``data_dir`` and ``protocol`` default to the bundle's; ``split`` to the run's evaluation
    split; ``max_eval_rows`` None evaluates every row of the split.
    """
    metadata = read_bundle_config(bundle).get("metadata")
    recorded = metadata.get("train") if isinstance(metadata, dict) else None
    if not isinstance(recorded, dict):
        raise ValueError(
            f"bundle {bundle} records no training configuration (metadata.train), which evaluate needs for its "
            "tokenization, batching and clusters; evaluate bundles written by `python -m chameleon_core train`"
        )
    try:
        trained = TrainConfig(**recorded)
    except TypeError as err:  # a setting this version does not know
        raise ValueError(f"bundle {bundle} records training settings this code cannot read: {err}") from None
    config = replace(trained, dataset=dataset or trained.dataset, data_dir=data_dir or trained.data_dir,
                     protocol=protocol or trained.protocol, max_eval_rows=max_eval_rows)  # checked before loading
    loaded = load_bundle(bundle, device=str(resolve_device(device)))
    if loaded.clusters is None and (reason := _needs_clusters(config, loaded.adapter.regime)):
        raise ValueError(
            f"bundle {bundle} holds no clusters (clusters.safetensors), but evaluating it needs them: {reason}; "
            "restore the bundle's clusters.safetensors or retrain it"
        )
    splits = load_dataset_splits(config.dataset, config.data_dir, config.data_seed)
    name = split or eval_split_name(splits)
    if name not in splits:
        raise ValueError(f"dataset {config.dataset} has no split {name!r}; it has {sorted(splits)}")
    # Without trained clusters (where _needs_clusters allows it) every row falls in one group.
    dim = loaded.model.get_input_embeddings().embedding_dim
    clusters = loaded.clusters or Clusters(torch.zeros(1, dim))
    held = held_out_split(name, splits[name], config, loaded.model, loaded.tokenizer, clusters)
    result = evaluate(loaded.model, held, config, clusters, loaded.tokenizer.pad_token_id, progress=True)
    result.pop("per_row")
    return {"bundle": str(bundle), "regime": loaded.adapter.regime, "protocol": config.protocol, "split": name,
            **result, "padding_share": held.encoded.padding_share, "dropped_rows": held.encoded.dropped}


def _needs_clusters(config: TrainConfig, regime: str) -> str | None:
    """Why evaluating ``regime`` under ``config`` depends on the trained clusters, or None if it does not.

    The clusters group the evaluation rows into batches (cluster sampler, not transductive) and,
    with centroid conditioning or per-cluster adapters, choose the adapter itself. Batches change
    the result when the hyper head conditions on each batch, or when the protocol's loss depends on
    them (paper: a mean of per-batch means); static adapters and a constant hyper input need neither.
    """
    if regime in ROUTED:
        return "each row uses the head adapter of its nearest trained centroid"
    if regime in CONDITIONED and config.conditioning == "centroid":
        return "the hyper head is conditioned on the trained centroids"
    if config.sampler == "cluster" and not config.is_transductive:
        if regime in CONDITIONED:
            return "batches are formed by the trained clusters and the hyper head is conditioned on each batch"
        if get_protocol(config.protocol).loss_depends_on_batches:
            return f"batches are formed by the trained clusters and the {config.protocol} protocol's loss depends on them"
    return None
