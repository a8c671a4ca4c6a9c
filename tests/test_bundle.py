"""Bundles: exact round trips, and a specific BundleError for every way a bundle can be unusable."""

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import BatchEncoding

from chameleon_core import (
    AdapterConfig, BundleError, Clusters, apply_regime, conditioned, export_peft, fit_clusters, load_bundle,
    load_model, mean_embedding, model_fingerprint, save_bundle,
)
from chameleon_core.bundle import Points, read_bundle_config, share_bundle, write_checksums
from conftest import edit_config

ROOT = Path(__file__).resolve().parents[1]
# With the training record ``train`` writes (metadata.train), here the settings the ``saved`` bundle was made with.
METADATA = {"dataset": "synthetic", "steps": 3, "losses": [2.5, 2.25],
            "train": {"regime": "chameleon", "rank": 4, "alpha": 4.0, "targets": []}}


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
        context = conditioned(model, embeddings, "centroid", clusters.assign(embeddings)[0], clusters.centroids)
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
    # changed on purpose (the training record too): without rewritten checksums, the checksum refuses it first
    edit_config(saved.path, lambda config: (config["adapter"].update(regime="lora"), config["metadata"].pop("train")))
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


def test_changed_bytes_in_adapter_are_named_by_the_checksum(saved, base):
    adapter = saved.path / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # the tensors start after the JSON header
    middle = (header + len(data)) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    adapter.write_bytes(bytes(data))
    with safe_open(adapter, "pt") as f:  # still a readable safetensors file: only the checksum can tell
        assert set(f.keys())
    with pytest.raises(BundleError, match=f"adapter.safetensors in bundle {saved.path} does not match its recorded checksum"):
        load_bundle(saved.path, base)


def test_config_changed_after_saving_is_refused_until_checksums_are_rewritten(saved):
    config = json.loads((saved.path / "config.json").read_text())
    (saved.path / "config.json").write_text(json.dumps({**config, "metadata": {"dataset": "other"}}))
    with pytest.raises(BundleError, match="config.json in bundle .* does not match its recorded checksum"):
        read_bundle_config(saved.path)
    write_checksums(saved.path)
    assert read_bundle_config(saved.path)["metadata"] == {"dataset": "other"}


def test_a_file_listed_in_the_checksums_but_gone_is_named(saved, base):
    (saved.path / "clusters.safetensors").unlink()
    with pytest.raises(BundleError, match="is missing clusters.safetensors \\(listed in its checksums.json\\)"):
        load_bundle(saved.path, base)


def test_bundle_without_checksums_is_refused_unless_allowed_until_they_are_written(saved, base):
    (saved.path / "checksums.json").unlink()
    with pytest.raises(BundleError, match="has no checksums.json, so an edited or corrupt file cannot be detected.*"
                                          "write_checksums.*allow_unverified=True"):
        load_bundle(saved.path, base)
    with pytest.warns(UserWarning, match="has no checksums.json.*write_checksums") as caught:
        loaded = load_bundle(saved.path, base, allow_unverified=True)
    assert len([w for w in caught if "checksums" in str(w.message)]) == 1
    assert torch.equal(conditioned_logits(loaded.model, saved.batch, loaded.clusters), saved.logits)
    write_checksums(saved.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_bundle(saved.path, load_model("random:tiny-gpt2")[0])
    assert not [w for w in caught if "checksums" in str(w.message)]


@pytest.mark.parametrize(
    "alpha, message",
    [
        (8.0, "adapter alpha is 8.0, but the bundle was trained with 4.0 \\(metadata.train.alpha\\)"),
        (0, "alpha must be a finite number > 0 .* got 0.0"),
        (-4, "alpha must be a finite number > 0 .* got -4.0"),
        (float("nan"), "alpha must be a finite number > 0 .* got nan"),
        (1e308, "alpha must be a finite number > 0 with scale alpha / rank at most 1000 .* got 1e\\+308"),
    ],
    ids=["other-than-trained", "zero", "negative", "nan", "overflow"],
)
def test_an_edited_alpha_is_refused_even_with_rewritten_checksums(saved, base, alpha, message):
    edit_config(saved.path, lambda config: config["adapter"].update(alpha=alpha))
    with pytest.raises(BundleError, match=f"config.json in bundle .*: {message}"):
        load_bundle(saved.path, base)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ([1, 2], "metadata must be a JSON object"),
        ({"embedding": {"max_length": "32"}}, "metadata.embedding must be an object of max_length \\(int\\)"),
        ({"embedding": {"max_length": 0}}, "metadata.embedding must be .*, max_length >= 1, source one of embeddings, hidden; got"),
        ({"embedding": {"source": "logits"}}, "metadata.embedding must be .*, source one of embeddings, hidden; got"),
        ({"prompt_template": "### {instruction}"}, "metadata.prompt_template must be text holding {prompt}"),
    ],
    ids=["not-an-object", "embedding-type", "embedding-range", "embedding-source", "template"],
)
def test_unusable_metadata_is_named(saved, base, metadata, message):
    edit_config(saved.path, lambda config: config.update(metadata=metadata))
    with pytest.raises(BundleError, match=f"config.json in bundle .*: {message}"):
        load_bundle(saved.path, base)


def test_clusters_that_contradict_the_adapter_are_refused(saved, base):
    edit_config(saved.path, lambda config: config["adapter"].update(k=3))  # the bundle holds 2 centroids
    with pytest.raises(BundleError, match="holds 2 centroids, but its adapter was trained on 3 clusters"):
        load_bundle(saved.path, base)


def permute_vocabulary(file: Path) -> None:
    """Swap the ids of the tokenizer's first two vocabulary entries: a valid tokenizer that reads text differently."""
    data = json.loads(file.read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    file.write_text(json.dumps(data))


def test_the_tokenizer_is_covered_by_the_checksums(saved, base):
    assert "tokenizer/tokenizer.json" in json.loads((saved.path / "checksums.json").read_text())["files"]
    permute_vocabulary(saved.path / "tokenizer" / "tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json in bundle .* does not match its recorded checksum"):
        load_bundle(saved.path, base)


def test_a_file_added_to_the_tokenizer_is_refused(saved, base):
    (saved.path / "tokenizer" / "added_tokens.json").write_text('{"<new>": 5}')
    with pytest.raises(BundleError, match="tokenizer/added_tokens.json in bundle .* is not listed in checksums.json"):
        load_bundle(saved.path, base)


def test_the_model_card_is_documentation_no_checksum_covers(saved, base):
    (saved.path / "README.md").write_text("# A bundle\n")
    load_bundle(saved.path, base)
    (saved.path / "README.md").write_text("# A bundle, its card edited on the hub\n")
    loaded = load_bundle(saved.path, load_model("random:tiny-gpt2")[0])
    assert torch.equal(conditioned_logits(loaded.model, saved.batch, loaded.clusters), saved.logits)
    assert "README.md" not in json.loads((write_checksums(saved.path)).read_text())["files"]


def test_another_models_tokenizer_is_refused(saved, base):
    tokenizer = load_model("random:tiny-gpt2")[1]
    tokenizer.add_tokens([f"<word{i}>" for i in range(1000)])  # a larger vocabulary than the model embeds
    shutil.rmtree(saved.path / "tokenizer")
    tokenizer.save_pretrained(saved.path / "tokenizer")
    write_checksums(saved.path)
    with pytest.raises(BundleError, match="tokenizer/ in bundle .* has 1,837 tokens, but the base model embeds only "
                                          "837: it is another model's tokenizer"):
        load_bundle(saved.path, base)


def test_a_corrupt_tokenizer_file_is_named(saved, base):
    (saved.path / "tokenizer" / "tokenizer.json").write_text('{"model": ')
    write_checksums(saved.path)
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json in bundle .* cannot be loaded"):
        load_bundle(saved.path, base)


def test_resaving_without_clusters_removes_the_old_ones(saved):
    model, tokenizer = load_model("random:tiny-gpt2")
    save_bundle(saved.path, model, tokenizer, trained(model, "lora"))
    assert not (saved.path / "clusters.safetensors").exists() and not (saved.path / "points.json").exists()
    assert load_bundle(saved.path, load_model("random:tiny-gpt2")[0]).clusters is None


def test_committed_bundles_match_their_checksums():
    bundles = sorted(ROOT.glob("assets/bundles/*/*/config.json"))
    assert bundles
    for config in bundles:
        recorded = json.loads((config.parent / "checksums.json").read_text())["files"]
        assert {"adapter.safetensors", "config.json"} <= set(recorded)
        for name, digest in recorded.items():
            assert hashlib.sha256((config.parent / name).read_bytes()).hexdigest() == digest, config.parent / name


@pytest.mark.parametrize("regime", ["chameleon", "lora"])
def test_half_precision_bundle_loads_to_float32_with_nearly_the_same_logits(tiny, batch, tmp_path, regime):
    model, tokenizer = tiny
    adapter = trained(model, regime)
    points = Points(torch.randn(4, 64), torch.zeros(4, dtype=torch.long), ["a", "b", "c", "d"])
    save_bundle(tmp_path / "fp32", model, tokenizer, adapter, points=points)
    save_bundle(tmp_path / "fp16", model, tokenizer, adapter, points=points, half=True)
    with safe_open(tmp_path / "fp16" / "adapter.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    full, half = (load_bundle(tmp_path / name, load_model(model.name_or_path)[0]) for name in ("fp32", "fp16"))
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    assert half.points.embeddings.dtype == torch.float32
    assert torch.allclose(half.points.embeddings, points.embeddings, rtol=2**-10, atol=0)
    expected, got = conditioned_logits(full.model, batch), conditioned_logits(half.model, batch)
    effect = (expected - conditioned_logits(load_model(model.name_or_path)[0], batch)).abs().max()
    # float16 keeps 11 significant bits: each stored weight is off by at most 2**-11 of itself, so the
    # adapters' share of the logits is off by a small multiple of 2**-11 of that share (the rounding
    # errors of a dot product partly cancel). Measured: 6e-4 to 9e-4 of it; allowed: 2**-8 (3.9e-3).
    difference = (got - expected).abs().max()
    assert 0 < difference < 2**-8 * effect


def test_same_name_with_other_weights_is_explained(saved):
    other, _ = load_model("random:tiny-gpt2", seed=1)
    with pytest.raises(BundleError, match="same name but different weights .*seed, version or conversion"):
        load_bundle(saved.path, other)


def test_smollm2_mismatch_names_the_hub_and_gguf_difference(saved, base):
    edit_config(saved.path, lambda config: config.update(base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                                         base_fingerprint="0" * 24))
    with pytest.raises(BundleError, match="the hub weights and the dequantized GGUF weights differ") as err:
        load_bundle(saved.path, base)
    assert "same name" not in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": "eight"}, "adapter config field 'rank' must be an integer, got 'eight'"),
        ({"ranks": 4}, "unknown adapter config key 'ranks'; allowed keys: regime, rank, alpha, init, targets"),
        ({"targets": "c_attn"}, "adapter config field 'targets' must be a list of strings, got 'c_attn'"),
    ],
    ids=["wrong-type", "unknown-key", "not-a-list"],
)
def test_invalid_adapter_config_is_named(saved, base, change, message):
    edit_config(saved.path, lambda config: config["adapter"].update(change))
    with pytest.raises(BundleError, match=f"config.json in bundle .*: {message}"):
        load_bundle(saved.path, base)


def test_shared_copy_is_half_precision_without_texts_or_tokenizer(tiny_gpt2, texts, tmp_path):
    model, tokenizer = tiny_gpt2
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    adapter = trained(model, "chameleon")
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    clusters, labels = fit_clusters(embeddings, k=2)
    path = save_bundle(tmp_path / "full", model, tokenizer, adapter, clusters, METADATA, points=Points(embeddings, labels, texts))
    shared = share_bundle(path, tmp_path / "shared")
    assert not (shared / "tokenizer").exists() and json.loads((shared / "points.json").read_text()) == [""] * len(texts)
    assert all(t.dtype == torch.float16 for t in safetensors.torch.load_file(shared / "adapter.safetensors").values())
    loaded = load_bundle(shared, load_model("random:tiny-gpt2")[0])
    assert torch.equal(loaded.points.labels, labels) and torch.equal(loaded.clusters.centroids, clusters.centroids)
    expected = conditioned_logits(model, batch, clusters)
    gap = (conditioned_logits(loaded.model, batch, clusters) - expected).abs().max()
    assert 0 < gap < 1e-2 * expected.abs().max()  # rounded to float16, restored to float32
    with pytest.raises(BundleError, match="already exists"):
        share_bundle(path, shared)
