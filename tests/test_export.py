"""Bundles travel the ecosystem's way: PEFT adapters with the bundle's logits, model cards, Hub repo ids."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import huggingface_hub.constants
import peft
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from chameleon_core import (
    AdapterConfig, apply_regime, conditioned, fit_clusters, load_bundle, load_model, mean_embedding, save_bundle,
)
from chameleon_core.bundle import BundleError, export_bundle_peft, fetch_bundle, hub_base_model, share_bundle
from chameleon_core.card import model_card
from chameleon_core.cli import main
from chameleon_core.models import SMOLLM2_HUB

ROOT = Path(__file__).resolve().parents[1]


def bundle_of(tiny, batch, tmp_path, regime: str):
    """A saved bundle of ``regime`` on a tiny model with every adapter tensor moved off its initial value,
    three clusters of its batch; returns (path, adapted model, clusters, the untouched base)."""
    model, tokenizer = tiny
    base = copy.deepcopy(model)
    config = apply_regime(model, AdapterConfig(regime, rank=4, alpha=8.0, conditioning="centroid", k=3)).config
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    clusters, _ = fit_clusters(mean_embedding(model, batch["input_ids"], batch["attention_mask"]), k=3)
    path = save_bundle(tmp_path / "bundle", model.eval(), tokenizer, config, clusters)
    return path, model, clusters, base


def from_pretrained(base, folder, **kwargs) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tied head; fan_in_fan_out flipped for GPT-2's Linear head
        return peft.PeftModel.from_pretrained(base, folder, **kwargs)


def test_static_lora_exports_to_one_peft_adapter_with_the_bundles_logits(tiny, batch, logits, tmp_path, capsys):
    path, model, _, base = bundle_of(tiny, batch, tmp_path, "lora")
    assert main(["export-peft", "--bundle", str(path), "--out", str(tmp_path / "peft")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapters"] == {"default": str(tmp_path / "peft")}
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = from_pretrained(base, tmp_path / "peft")
    assert (logits(loaded, batch) - logits(model, batch)).abs().max() <= 1e-5
    with loaded.disable_adapter():
        assert (logits(loaded, batch) - logits(model, batch)).abs().max() > 1e-2


@pytest.mark.parametrize("regime", ["chameleon", "lora-per-cluster"])
def test_a_per_cluster_head_exports_one_adapter_per_cluster_served_together(tiny, batch, logits, tmp_path, capsys, regime):
    """All the clusters' adapters load into one model, and a batch mixing them (``adapter_names``) gives each
    row the bundle's logits for its cluster."""
    path, model, clusters, base = bundle_of(tiny, batch, tmp_path, regime)
    assert main(["export-peft", "--bundle", str(path), "--out", str(tmp_path / "peft")]) == 0
    adapters = json.loads(capsys.readouterr().out)["adapters"]
    assert list(adapters) == [f"cluster_{c}" for c in range(3)]
    loaded = from_pretrained(base, adapters["cluster_0"], adapter_name="cluster_0")
    for name in ("cluster_1", "cluster_2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.load_adapter(adapters[name], adapter_name=name)
    labels = torch.tensor([0, 2, 1, 2])  # every cluster in one batch, one twice
    with torch.no_grad(), conditioned(model, torch.zeros(4, 1), "centroid", labels, clusters.centroids):
        expected = model(**batch).logits
    with torch.no_grad():
        served = loaded(**batch, adapter_names=[f"cluster_{c}" for c in labels.tolist()]).logits
    assert (served - expected).abs().max() <= 1e-5
    with torch.no_grad():
        other = loaded(**batch, adapter_names=["cluster_1"] * 4).logits
    assert (other - expected).abs().max() > 1e-3  # each cluster's adapter is its own


def test_export_refuses_an_existing_folder(tiny, batch, tmp_path, capsys):
    path, *_ = bundle_of(tiny, batch, tmp_path, "lora")
    (tmp_path / "taken").mkdir()
    assert main(["export-peft", "--bundle", str(path), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists; choose a new folder (nothing was written)" in capsys.readouterr().err
    assert not list((tmp_path / "taken").iterdir())


def test_the_gguf_base_is_named_by_its_hub_id_and_the_difference_said(tmp_path):
    name, warning = hub_base_model("smollm2")
    assert name == SMOLLM2_HUB and "dequantized 4-bit GGUF" in warning and "load_model('smollm2')" in warning
    assert hub_base_model("gpt2") == ("gpt2", None)
    assert "local path" in hub_base_model(str(tmp_path))[1]
    with pytest.raises(BundleError, match="no bundle at"):
        export_bundle_peft(tmp_path / "missing", tmp_path / "out")


# ---------------------------------------------------------------- model cards
def test_saved_and_shared_bundles_carry_a_model_card_the_loader_never_reads(tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    config = apply_regime(model, AdapterConfig("lora", rank=4)).config
    metadata = {"dataset": "alpaca", "protocol": "causal", "train": {"epochs": 2, "rank": 4, "lr": 0.001},
                "metrics": {"eval": {"loss": 1.23456, "ppl": 3.437, "rows": 40}}}
    path = save_bundle(tmp_path / "bundle", model, tokenizer, config, metadata=metadata, base_model="gpt2")
    card = ModelCard.load(path / "README.md")
    assert card.data.base_model == "gpt2" and card.data.library_name == "chameleon-llm"
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["tatsu-lab/alpaca"] and "lora" in card.data.tags
    assert "Mean token loss 1.2346 (perplexity 3.44) on 40 held-out rows" in card.text
    assert "epochs 2, rank 4, learning rate 0.001" in card.text
    assert "README.md" not in json.loads((path / "checksums.json").read_text())["files"]
    shared = share_bundle(path, tmp_path / "shared", model=load_model("random:tiny-gpt2")[0])  # the same seeded base
    assert ModelCard.load(shared / "README.md").data.base_model == "gpt2"


@pytest.mark.parametrize("bundle", sorted((ROOT / "assets" / "bundles").glob("*/*/config.json")), ids=lambda p: p.parent.name)
def test_committed_bundles_carry_their_regenerated_cards(bundle):
    """The cards come from `python -m chameleon_core model-card assets/bundles/*/lora assets/bundles/*/chameleon`."""
    path = bundle.parent
    assert (path / "README.md").read_text() == model_card(path).content
    assert ModelCard.load(path / "README.md").data.license in ("cc-by-nc-4.0", "cc-by-sa-3.0")


# ---------------------------------------------------------------- bundles by Hub repo id
def test_a_repo_id_offline_and_not_cached_is_one_error_line(tmp_path, monkeypatch, offline, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BundleError, match=r"no bundle at someone/no-such-set: .* cannot be reached \(offline\)"):
        fetch_bundle("someone/no-such-set")
    assert main(["generate", "--bundle", "someone/no-such-set", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no bundle at someone/no-such-set") and err.count("\n") == 1


def test_a_repo_id_in_the_local_hub_cache_loads_with_its_checksums_verified(tiny, batch, tmp_path, monkeypatch, offline):
    path, model, _, base = bundle_of(tiny, batch, tmp_path, "lora")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-lora"  # the layout snapshot_download writes
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fetched = fetch_bundle("someone/tiny-lora")
    assert fetched == repo / "snapshots" / commit
    with torch.no_grad():
        assert torch.equal(load_bundle(fetched, copy.deepcopy(base)).model(**batch).logits, model(**batch).logits)
    adapter = fetched / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="does not match its recorded checksum"):
        load_bundle(fetch_bundle("someone/tiny-lora"), copy.deepcopy(base))
