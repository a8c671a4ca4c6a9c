"""Bundles: exact round trips, and a specific BundleError for every way a bundle can be unusable."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import BatchEncoding

from chameleon_core import (
    AdapterConfig, BundleError, Clusters, apply_regime, conditioned, export_peft, fit_clusters, load_bundle,
    load_model, mean_embedding, model_fingerprint, save_bundle,
)

METADATA = {"dataset": "synthetic", "steps": 3, "losses": [2.5, 2.25]}


def trained(model, regime: str) -> AdapterConfig:
    """Apply ``regime`` and move every adapter tensor away from its initial value, as training would."""
    config = apply_regime(model, AdapterConfig(regime, rank=4)).config
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return config


def conditioned_logits(model, batch: BatchEncoding, clusters: Clusters | None = None) -> torch.Tensor:
    """Logits with batch conditioning, or per-row nearest-centroid conditioning when given clusters."""
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    if clusters is None:
        context = conditioned(model, embeddings)
    else:
        context = conditioned(model, embeddings, "cluster", clusters.assign(embeddings)[0], clusters.centroids)
    with torch.no_grad(), context:
        return model(**batch).logits


@dataclass
class Saved:
    path: Path
    batch: BatchEncoding
    logits: torch.Tensor
    clusters: Clusters


@pytest.fixture
def saved(tiny_gpt2, texts, tmp_path) -> Saved:
    """A trained chameleon bundle with two clusters, on ``random:tiny-gpt2`` (seed 0)."""
    model, tokenizer = tiny_gpt2
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    adapter = trained(model, "chameleon")
    clusters, _ = fit_clusters(mean_embedding(model, batch["input_ids"], batch["attention_mask"]), k=2)
    path = save_bundle(tmp_path / "bundle", model, tokenizer, adapter, clusters, METADATA)
    return Saved(path, batch, conditioned_logits(model, batch, clusters), clusters)


@pytest.fixture
def base():
    """A fresh copy of the base model the ``saved`` bundle was trained on."""
    return load_model("random:tiny-gpt2")[0]


@pytest.mark.parametrize("regime", ["chameleon", "lora", "lora-matched"])
def test_round_trip_gives_identical_logits(tiny, batch, tmp_path, regime):
    model, tokenizer = tiny
    adapter = trained(model, regime)
    expected = conditioned_logits(model, batch)
    save_bundle(tmp_path, model, tokenizer, adapter)
    loaded = load_bundle(tmp_path, load_model(model.name_or_path)[0])
    assert loaded.adapter == adapter and loaded.clusters is None and loaded.metadata == {}
    assert torch.equal(conditioned_logits(loaded.model, batch), expected)


def test_round_trip_keeps_centroids_metadata_and_tokenizer(saved, texts):
    loaded = load_bundle(saved.path)  # no model given: the base is rebuilt from its recorded name
    assert loaded.base_model == "random:tiny-gpt2" and loaded.metadata == METADATA
    assert torch.equal(loaded.clusters.centroids, saved.clusters.centroids)
    assert loaded.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"].equal(saved.batch["input_ids"])
    assert torch.equal(conditioned_logits(loaded.model, saved.batch, loaded.clusters), saved.logits)
    assert not loaded.model.training


@pytest.mark.parametrize(
    "name, seed", [("random:tiny-gpt2", 1), ("random:tiny-llama", 0)], ids=["seed", "architecture"]
)
def test_another_base_model_is_refused_naming_both_fingerprints(saved, name, seed):
    recorded = json.loads((saved.path / "config.json").read_text())["base_fingerprint"]
    other, _ = load_model(name, seed=seed)
    found = model_fingerprint(other)
    assert found != recorded
    with pytest.raises(BundleError, match=f"'random:tiny-gpt2' \\(fingerprint {recorded}\\).*{name}.*{found}"):
        load_bundle(saved.path, other)


def test_fingerprint_ignores_adapters(tiny_gpt2):
    model, _ = tiny_gpt2
    before = model_fingerprint(model)
    trained(model, "chameleon")
    assert model_fingerprint(model) == before


@pytest.mark.parametrize("file", ["adapter.safetensors", "config.json"])
def test_missing_file_is_named(saved, base, file):
    (saved.path / file).unlink()
    with pytest.raises(BundleError, match=f"bundle {saved.path} is missing {file}"):
        load_bundle(saved.path, base)


def test_truncated_adapter_is_reported(saved, base):
    adapter = saved.path / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    with pytest.raises(BundleError, match="adapter.safetensors in bundle .* is corrupt or truncated"):
        load_bundle(saved.path, base)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"format": "chameleon-bun', "config.json in bundle .* is corrupt"),
        (b"\xff\xfe", "config.json in bundle .* is corrupt"),
        (b'{"format": "something-else", "version": 1}', "is not a ChameleonLLM bundle config"),
        (b'{"format": "chameleon-bundle", "version": 99}', "has format version 99, this code reads 1"),
    ],
    ids=["truncated", "not-utf8", "other-format", "future-version"],
)
def test_corrupt_config_is_reported(saved, base, content, message):
    (saved.path / "config.json").write_bytes(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(saved.path, base)


def test_adapter_of_another_regime_is_reported(saved, base):
    config = json.loads((saved.path / "config.json").read_text())
    config["adapter"]["regime"] = "lora"
    (saved.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not fit regime 'lora': missing \\['lm_head.lora_A'"):
        load_bundle(saved.path, base)


def test_a_model_that_already_has_adapters_is_refused(saved, tiny_gpt2):
    with pytest.raises(ValueError, match="already carries adapters; apply a regime to a fresh base model"):
        load_bundle(saved.path, tiny_gpt2[0])  # the very model the bundle was saved from


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(BundleError, match="folder does not exist"):
        load_bundle(tmp_path / "nothing")


def test_export_peft_refuses_chameleon(tiny_gpt2, tmp_path):
    model, _ = tiny_gpt2
    with pytest.raises(BundleError, match="only static LoRA exports to PEFT; regime 'chameleon'"):
        export_peft(tmp_path, model, trained(model, "chameleon"))
    assert not list(tmp_path.iterdir())
