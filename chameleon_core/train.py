"""Training and evaluation of one regime under one protocol, with checkpoints and resume.

A run folder is also a bundle: after the last epoch it holds the adapters (``load_bundle``
reads it), ``metrics.json`` and ``metrics.csv``; while training it holds ``checkpoint.pt``,
from which ``resume=True`` continues to the same final metrics as an uninterrupted run.
Multi-GPU: ``accelerate launch -m chameleon_core train ...``; each process takes every
``num_processes``-th cluster-homogeneous batch.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .bundle import Points, save_bundle
from .clustering import ClusterBatchSampler, Clusters, RandomBatchSampler, fit_clusters
from .data import load_dataset_splits
from .hyper_head import conditioned
from .models import load_model, resolve_device
from .protocols import PROTOCOLS, Encoded, collate, embedding_settings, encode, forward_logits, loss_terms
from .regimes import AdapterConfig, adapter_state, apply_regime, trainable_parameters

SAMPLERS = ("cluster", "random")
# "centroid" conditions each row on its training cluster's centroid rather than the batch mean.
TRAIN_CONDITIONING = ("batch", "centroid", "example")
POINTS_IN_BUNDLE = 2000


@dataclass(frozen=True)
class TrainConfig:
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
    conditioning: str = "batch"
    k: int | None = None  # number of clusters; default N // batch_size (the paper)
    transductive: bool | None = None  # cluster the eval split itself; default: only under "paper"
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    device: str = "auto"

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose from {PROTOCOLS}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {SAMPLERS}")
        if self.conditioning not in TRAIN_CONDITIONING:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; choose from {TRAIN_CONDITIONING}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")

    @property
    def is_transductive(self) -> bool:
        return self.protocol == "paper" if self.transductive is None else self.transductive


@dataclass
class Split:
    """An encoded split with its cluster labels."""

    name: str
    encoded: Encoded
    labels: torch.Tensor


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


def _conditioned(model, split: Split, idx: list[int], config: TrainConfig, clusters: Clusters, cond: torch.Tensor | None = None):
    """The conditioning context of one batch: the paper's batch mean, a centroid, or per example."""
    device = next(model.parameters()).device
    emb = (split.encoded.cond[idx] if cond is None else cond).to(device)
    if config.conditioning == "batch":
        return conditioned(model, emb, "batch")
    if config.conditioning == "example":
        return conditioned(model, emb, "example")
    return conditioned(model, emb, "cluster", clusters.assign(emb)[0], clusters.centroids)


@torch.no_grad()
def evaluate(
    model, split: Split, config: TrainConfig, clusters: Clusters, pad_id: int, shuffle_condition: bool = False,
    progress: bool = False,
) -> dict:
    """Loss and perplexity of ``split``; ``paper``: mean of per-batch means, ``causal``: per token.

    ``shuffle_condition`` conditions every batch on a *different* cluster's centroid (ablation).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(config.seed)
    batch_means, total, count = [], 0.0, 0
    for idx in tqdm(batches(split, config, seed=0), desc=f"eval {split.name}", disable=not progress, leave=False):
        cond = None
        if shuffle_condition:
            own = int(clusters.assign(split.encoded.cond[idx].mean(0, keepdim=True))[0])
            other = (own + 1 + int(rng.integers(clusters.k - 1))) % clusters.k if clusters.k > 1 else own
            cond = clusters.centroids[other].expand(len(idx), -1)
        batch = {k: v.to(device) for k, v in collate(split.encoded, idx, config.protocol, pad_id).items()}
        with _conditioned(model, split, idx, config, clusters, cond):
            loss_sum, n = loss_terms(forward_logits(model, batch, config.protocol), batch["labels"], config.protocol)
        if int(n):
            batch_means.append(float(loss_sum) / int(n))
            total, count = total + float(loss_sum), count + int(n)
    model.train(was_training)
    loss = float(np.mean(batch_means)) if config.protocol == "paper" else total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "targets": count, "rows": len(split.encoded)}


def prepare(config: TrainConfig, model, tokenizer) -> tuple[Split, Split, Split, Clusters, dict]:
    """Load, encode and cluster train / validation / evaluation splits."""
    splits = load_dataset_splits(config.dataset, config.data_dir, config.data_seed)
    eval_name = "test" if "test" in splits else "validation"
    chosen = {
        "train": _subsample(splits["train"], config.max_train_rows, config.data_seed),
        "validation": _subsample(splits["validation"], config.max_eval_rows, config.data_seed),
        eval_name: _subsample(splits[eval_name], config.max_eval_rows, config.data_seed),
    }
    encoded = {
        name: encode(records, model, tokenizer, config.protocol, config.max_length, config.context_tokens)
        for name, records in chosen.items()
    }
    if len(encoded["train"]) < 1:
        raise ValueError(f"no training row of {config.dataset} is long enough to score under {config.protocol!r}")
    clusters, train_labels = fit_clusters(encoded["train"].cond, config.k, config.batch_size, config.seed)

    def labelled(name: str) -> Split:
        enc = encoded[name]
        if config.is_transductive:  # the published behaviour: cluster the evaluation split itself
            k = min(clusters.k, len(enc)) if config.k else None
            return Split(name, enc, fit_clusters(enc.cond, k, config.batch_size, config.seed)[1])
        return Split(name, enc, clusters.assign(enc.cond)[0])

    train = Split("train", encoded["train"], train_labels)
    info = {
        "eval_split": eval_name,
        "rows": {name: len(enc) for name, enc in encoded.items()},
        "dropped_rows": {name: enc.dropped for name, enc in encoded.items()},
        "k": clusters.k,
        "padding_share": {name: enc.padding_share for name, enc in encoded.items() if enc.padding_share is not None},
        "embedding": embedding_settings(config.protocol, config.dataset == "alpaca", config.max_length, config.context_tokens),
    }
    return train, labelled("validation"), labelled(eval_name), clusters, info


def _write_metrics(out: Path, result: dict) -> None:
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train_loss", "val_loss", "val_ppl", "seconds"])
        writer.writeheader()
        for row in result["history"]:
            writer.writerow({k: row[k] for k in writer.fieldnames})


def train(
    config: TrainConfig, out: str | Path, resume: bool = False, progress: Callable[[float, str], None] | None = None,
    show_progress: bool = True,
) -> dict:
    """Train one regime, evaluate it, and write the run folder (a loadable bundle + metrics).

    ``progress(fraction, message)`` is called as work advances (for a UI). A finished run
    folder is returned as it is when ``resume`` is set.
    """
    out = Path(out)
    if resume and (done := finished_run(out, config)):
        return done
    report = progress or (lambda fraction, message: None)
    accelerator = Accelerator(cpu=resolve_device(config.device).type == "cpu")
    seed_everything(config.seed)
    report(0.0, f"loading {config.model}")
    model, tokenizer = load_model(config.model, device=str(accelerator.device))
    report(0.05, f"encoding {config.dataset} ({config.protocol} protocol)")
    train_split, val_split, eval_split, clusters, info = prepare(config, model, tokenizer)
    adapter = apply_regime(
        model, AdapterConfig(regime=config.regime, rank=config.rank, alpha=config.alpha)
    ).config
    pad_id = tokenizer.pad_token_id
    history, start_epoch = [], 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr) if params else None
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != _config_dict(config):
            raise ValueError(f"{checkpoint} was written by a different configuration; use another --out or drop --resume")
        model.load_state_dict(state["adapter"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
    if optimizer is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    epochs = config.epochs if params else 0
    for epoch in range(start_epoch, epochs):
        model.train()
        started, losses = time.time(), []
        epoch_batches = batches(train_split, config, config.seed, epoch, accelerator.process_index, accelerator.num_processes)
        bar = tqdm(epoch_batches, desc=f"{config.regime} epoch {epoch + 1}/{epochs}", disable=not show_progress or not accelerator.is_main_process, leave=False)
        for step, idx in enumerate(bar):
            batch = {k: v.to(accelerator.device) for k, v in collate(train_split.encoded, idx, config.protocol, pad_id).items()}
            with _conditioned(core, train_split, idx, config, clusters):
                loss_sum, n = loss_terms(forward_logits(model, batch, config.protocol), batch["labels"], config.protocol)
                loss = loss_sum / n.clamp(min=1)
                accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            report(0.1 + 0.85 * (epoch + (step + 1) / len(epoch_batches)) / epochs, f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.3f}")
        val = evaluate(core, val_split, config, clusters, pad_id)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val["loss"], "val_ppl": val["ppl"], "seconds": time.time() - started, "step_losses": losses})
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"config": _config_dict(config), "epoch": epoch, "adapter": adapter_state(core), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "history": history}, tmp)
            tmp.replace(checkpoint)
    report(0.95, "evaluating")
    final = evaluate(core, eval_split, config, clusters, pad_id)
    train_loss = history[-1]["train_loss"] if history else evaluate(core, train_split, config, clusters, pad_id)["loss"]
    result = {
        "config": _config_dict(config),
        "adapter": adapter.to_dict(),
        "trainable_parameters": trainable_parameters(core),
        "total_parameters": sum(p.numel() for p in core.parameters()),
        "train_loss": train_loss,
        "eval": final,
        "history": history or [{"epoch": 0, "train_loss": train_loss, "val_loss": final["loss"], "val_ppl": final["ppl"], "seconds": 0.0, "step_losses": []}],
        **info,
        "complete": True,
    }
    if config.regime == "chameleon":
        result["eval_shuffled_condition"] = evaluate(core, eval_split, config, clusters, pad_id, shuffle_condition=True)
    if accelerator.is_main_process:
        sample = torch.randperm(len(train_split.encoded), generator=torch.Generator().manual_seed(0))[:POINTS_IN_BUNDLE]
        points = Points(train_split.encoded.cond[sample], train_split.labels[sample], [train_split.encoded.texts[i][:300] for i in sample])
        metadata = {"dataset": config.dataset, "protocol": config.protocol, "embedding": info["embedding"], "train": _config_dict(config), "metrics": {k: result[k] for k in ("train_loss", "eval")}}
        if config.dataset == "alpaca":
            metadata["prompt_template"] = "### Instruction:\n{prompt}\n\n### Response:\n"
        save_bundle(out, core, tokenizer, adapter, clusters, metadata, config.model, points)
        _write_metrics(out, result)
        checkpoint.unlink(missing_ok=True)
    report(1.0, "done")
    return result


def finished_run(out: Path, config: TrainConfig) -> dict | None:
    """The metrics of a completed run of exactly ``config`` in ``out``, else None."""
    path = Path(out) / "metrics.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done if done.get("complete") and done.get("config") == _config_dict(config) else None


def _config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def train_bundle(
    model: str, dataset: str, regime: str, out: str | Path, *, data_dir: str | None = None, epochs: int = 1,
    seed: int = 0, max_train_rows: int | None = None, progress: Callable[[float, str], None] | None = None,
) -> Path:
    """A small trained bundle for a demo (causal protocol); returns its folder."""
    config = TrainConfig(model=model, dataset=dataset, data_dir=data_dir, regime=regime, epochs=epochs, seed=seed,
                         max_train_rows=max_train_rows, max_eval_rows=500)
    train(config, out, resume=True, progress=progress)
    return Path(out)


def config_from_args(args, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from parsed CLI arguments (fields absent on ``args`` keep defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return replace(TrainConfig(**values), **overrides)


def add_train_arguments(parser, defaults: bool = True) -> None:
    """The training options shared by ``train`` and ``reproduce`` (None = keep the default)."""
    d = TrainConfig()
    default = (lambda v: v) if defaults else (lambda v: None)
    parser.add_argument("--model", default=default(d.model), help="hub id, local folder, or random:{tiny-gpt2,tiny-llama,gpt2}")
    parser.add_argument("--dataset", default=default(d.dataset), choices=("wikitext", "alpaca", "synthetic"))
    parser.add_argument("--data-dir", dest="data_dir", default=None, help="local data (WikiText folder or Alpaca .json); default: the hub")
    parser.add_argument("--epochs", type=int, default=default(d.epochs))
    parser.add_argument("--lr", type=float, default=default(d.lr))
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=default(d.batch_size))
    parser.add_argument("--rank", type=int, default=default(d.rank))
    parser.add_argument("--alpha", type=float, default=default(d.alpha), help="LoRA alpha; scale = alpha / rank")
    parser.add_argument("--max-length", dest="max_length", type=int, default=default(d.max_length))
    parser.add_argument("--context-tokens", dest="context_tokens", type=int, default=default(d.context_tokens))
    parser.add_argument("--k", type=int, default=None, help="number of clusters (default: rows // batch size)")
    parser.add_argument("--max-train-rows", dest="max_train_rows", type=int, default=None)
    parser.add_argument("--max-eval-rows", dest="max_eval_rows", type=int, default=None)
    parser.add_argument("--data-seed", dest="data_seed", type=int, default=default(d.data_seed))
    parser.add_argument("--device", default=default(d.device), help="auto, cpu, cuda, mps")


def _train_command(args) -> dict:
    result = train(config_from_args(args), args.out, resume=args.resume)
    return {k: result[k] for k in ("trainable_parameters", "train_loss", "eval", "eval_split", "k", "padding_share")}


def _evaluate_command(args) -> dict:
    from .bundle import load_bundle

    bundle = load_bundle(args.bundle, device=str(resolve_device(args.device)))
    trained = TrainConfig(**bundle.metadata["train"])
    config = replace(trained, dataset=args.dataset or trained.dataset, data_dir=args.data_dir or trained.data_dir,
                     protocol=args.protocol or trained.protocol, max_eval_rows=args.max_eval_rows)
    splits = load_dataset_splits(config.dataset, config.data_dir, config.data_seed)
    name = args.split or ("test" if "test" in splits else "validation")
    if name not in splits:
        raise ValueError(f"dataset {config.dataset} has no split {name!r}; it has {sorted(splits)}")
    records = _subsample(splits[name], config.max_eval_rows, config.data_seed)
    encoded = encode(records, bundle.model, bundle.tokenizer, config.protocol, config.max_length, config.context_tokens)
    clusters = bundle.clusters or fit_clusters(encoded.cond, 1)[0]
    if config.is_transductive:
        labels = fit_clusters(encoded.cond, None, config.batch_size, config.seed)[1]
    else:
        labels = clusters.assign(encoded.cond)[0]
    result = evaluate(bundle.model, Split(name, encoded, labels), config, clusters, bundle.tokenizer.pad_token_id, progress=True)
    return {"bundle": str(args.bundle), "regime": bundle.adapter.regime, "protocol": config.protocol, "split": name,
            **result, "padding_share": encoded.padding_share, "dropped_rows": encoded.dropped}


def register(commands) -> None:
    p = commands.add_parser("train", help="train one regime; the output folder is a loadable bundle")
    add_train_arguments(p)
    p.add_argument("--regime", default="chameleon", choices=("base", "lora-head", "lora", "chameleon", "lora-matched"))
    p.add_argument("--protocol", default="causal", choices=PROTOCOLS)
    p.add_argument("--sampler", default="cluster", choices=SAMPLERS)
    p.add_argument("--conditioning", default="batch", choices=TRAIN_CONDITIONING)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder (bundle + metrics + checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(run=_train_command)

    p = commands.add_parser("evaluate", help="evaluate one bundle on a dataset split")
    p.add_argument("--bundle", required=True)
    p.add_argument("--dataset", default=None, help="default: the dataset the bundle was trained on")
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.add_argument("--protocol", default=None, choices=PROTOCOLS, help="default: the bundle's training protocol")
    p.add_argument("--split", default=None, help="default: test if the dataset has one, else validation")
    p.add_argument("--max-eval-rows", dest="max_eval_rows", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_evaluate_command)
