"""Saving and loading a trained adapter set ("bundle"): safetensors tensors + a JSON config.

A bundle folder holds ``config.json`` (base model, its fingerprint, the adapter config,
training metadata), ``adapter.safetensors`` (trainable tensors only), ``clusters.safetensors``
(k-means centroids, if any) and ``tokenizer/``. Static LoRA also exports to PEFT's format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .clustering import Clusters
from .lora import lora_layers
from .models import load_model, load_tokenizer, model_fingerprint
from .regimes import AdapterConfig, adapter_state, apply_regime

FORMAT, VERSION = "chameleon-bundle", 1


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, or made for another base model."""


@dataclass
class Points:
    """A sample of training inputs (embedding, cluster, text) so a demo can draw the clusters."""

    embeddings: torch.Tensor  # (n, d)
    labels: torch.Tensor  # (n,) cluster ids
    texts: list[str]


@dataclass
class Bundle:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: AdapterConfig
    base_model: str
    clusters: Clusters | None = None
    metadata: dict = field(default_factory=dict)
    points: Points | None = None


def save_bundle(
    path: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapter: AdapterConfig,
    clusters: Clusters | None = None,
    metadata: dict | None = None,
    base_model: str | None = None,
    points: Points | None = None,
) -> Path:
    """Write a bundle; files are written to temporary names first so a crash leaves no half bundle."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": base_model or model.name_or_path,
        "base_fingerprint": model_fingerprint(model),
        "adapter": adapter.to_dict(),
        "metadata": metadata or {},
    }
    tensors = {name: t.float().cpu().contiguous() for name, t in adapter_state(model).items()}
    _atomic(path / "adapter.safetensors", lambda p: save_file(tensors, p))
    if clusters is not None:
        _atomic(path / "clusters.safetensors", lambda p: save_file({"centroids": clusters.centroids.contiguous()}, p))
    if points is not None:
        _atomic(path / "points.safetensors", lambda p: save_file({"embeddings": points.embeddings.float().contiguous(), "labels": points.labels.long().contiguous()}, p))
        _atomic(path / "points.json", lambda p: p.write_text(json.dumps(points.texts)))
    tokenizer.save_pretrained(path / "tokenizer")
    _atomic(path / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    return path


def read_bundle_config(path: str | Path) -> dict:
    """The bundle's ``config.json``, validated; cheap (no tensors, no model)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}: folder does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BundleError(f"bundle {path} is missing config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"config.json in bundle {path} is corrupt: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"{config_file} is not a ChameleonLLM bundle config (format {FORMAT!r} expected)")
    if config.get("version") != VERSION:
        raise BundleError(f"bundle {path} has format version {config.get('version')}, this code reads {VERSION}")
    return config


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise BundleError(f"bundle {file.parent} is missing {file.name}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{file.name} in bundle {file.parent} is corrupt or truncated: {err}") from None


def load_bundle(path: str | Path, model: PreTrainedModel | None = None, device: str = "cpu") -> Bundle:
    """Rebuild the adapted model. ``model`` (optional) must be the base the bundle was trained on."""
    path = Path(path)
    config = read_bundle_config(path)
    adapter = AdapterConfig.from_dict(config["adapter"])
    tensors = _load_tensors(path / "adapter.safetensors")
    if model is None:
        model, _ = load_model(config["base_model"], device=device)
    if (found := model_fingerprint(model)) != config["base_fingerprint"]:
        raise BundleError(
            f"bundle {path} was trained on base model {config['base_model']!r} (fingerprint "
            f"{config['base_fingerprint']}), but the model given is {model.name_or_path!r} (fingerprint {found})"
        )
    # A bundle may leave its tokenizer out when the base model carries it (a shared bundle then
    # redistributes nothing of the base model's files).
    tokenizer_dir = path / "tokenizer"
    tokenizer = load_tokenizer(str(tokenizer_dir) if tokenizer_dir.is_dir() else config["base_model"])
    apply_regime(model, adapter)
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"adapter.safetensors in bundle {path} does not fit regime {adapter.regime!r}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise BundleError(f"tensor {name} in bundle {path} has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)
    clusters = None
    if (path / "clusters.safetensors").exists():
        clusters = Clusters(_load_tensors(path / "clusters.safetensors")["centroids"])
    points = None
    if (path / "points.safetensors").exists():
        tensors = _load_tensors(path / "points.safetensors")
        try:
            texts = json.loads((path / "points.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BundleError(f"points.json in bundle {path} is missing or corrupt: {err}") from None
        points = Points(tensors["embeddings"], tensors["labels"], texts)
    return Bundle(model.eval(), tokenizer, adapter, config["base_model"], clusters, config.get("metadata", {}), points)


def export_peft(path: str | Path, model: PreTrainedModel, adapter: AdapterConfig, base_model: str | None = None) -> Path:
    """Write static LoRA in PEFT's adapter format (``PeftModel.from_pretrained`` reads it)."""
    if adapter.regime not in ("lora", "lora-head", "lora-matched"):
        raise BundleError(f"only static LoRA exports to PEFT; regime {adapter.regime!r} has a hyper-network head")
    layers = lora_layers(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous()
    save_file(tensors, path / "adapter_model.safetensors")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or model.name_or_path,
        "r": adapter.lora_rank,
        "lora_alpha": adapter.lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return path


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    tmp.replace(target)
