"""The two ablation regimes: ``chameleon-constant`` (no conditioning) and ``lora-per-cluster`` (one static head
LoRA per training cluster): parameter counts, routing, training, bundles, and the end-to-end training run."""

import copy
import math

import pytest
import torch

from chameleon_core import (
    AdapterConfig, apply_regime, conditioned, hyper_head, load_bundle, load_model, mean_embedding, save_bundle,
    trainable_parameters,
)
from chameleon_core.hyper_head import ClusterLoRAHead, ConditionedHead, conditioned_head
from chameleon_core.train import TrainConfig, evaluate, prepare, train

TINY = dict(model="random:tiny-gpt2", dataset="synthetic", max_length=96, max_train_rows=192, max_eval_rows=48, batch_size=16)
CLUSTERS = torch.tensor([3, 1, 3, 0])  # rows 0 and 2 share a cluster


def adapted(model, regime: str, **config) -> torch.nn.Module:
    apply_regime(model, AdapterConfig(regime, rank=4, **config))
    return model


# ---------------------------------------------------------------- chameleon-constant
def test_constant_has_chameleons_parameters_plus_one_input_vector(tiny):
    model, _ = tiny
    chameleon = adapted(copy.deepcopy(model), "chameleon")
    constant = adapted(model, "chameleon-constant")
    d = model.config.hidden_size
    assert trainable_parameters(constant) == trainable_parameters(chameleon) + d
    vector = hyper_head(constant).hyper.input
    assert vector.shape == (d,) and vector.requires_grad and vector.norm().item() == pytest.approx(1.0)  # like an embedding
    assert conditioned_head(constant) is hyper_head(constant)


def test_constant_gives_every_row_the_same_adapter_whatever_the_conditioning(tiny, batch, logits, randomize_lora):
    model, _ = tiny
    adapted(model, "chameleon-constant")
    randomize_lora(model)
    with torch.no_grad():
        hyper_head(model).hyper.net[-1].weight.normal_(std=0.2)
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    with conditioned(model, embeddings, "batch"):
        expected = logits(model, batch)
    for mode, cond in (("example", embeddings), ("batch", torch.randn_like(embeddings)), ("batch", -embeddings)):
        with conditioned(model, cond, mode, cluster_ids=CLUSTERS):
            assert (logits(model, batch) - expected).abs().max() <= 1e-5, mode
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        hyper_head(fresh).hyper.input.mul_(-1)
    with conditioned(fresh, embeddings):
        assert (logits(fresh, batch) - expected).abs().max() > 1e-2  # the learned input does decide the adapter


def test_constant_input_learns(tiny, batch):
    model, _ = tiny
    adapted(model, "chameleon-constant").train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with conditioned(model, torch.randn(4, model.config.hidden_size), "example"):
        model(**batch, labels=labels).loss.backward()
    hyper = hyper_head(model).hyper
    assert hyper.input.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hyper.parameters())


# ---------------------------------------------------------------- lora-per-cluster
def test_per_cluster_holds_k_peft_initialised_head_adapters(tiny):
    model, _ = tiny
    lora = adapted(copy.deepcopy(model), "lora")
    per_cluster = adapted(model, "lora-per-cluster", k=5)
    head = conditioned_head(per_cluster)
    d, V = model.config.hidden_size, model.config.vocab_size
    assert isinstance(head, ClusterLoRAHead) and hyper_head(per_cluster) is None
    assert head.lora_A.shape == (5, 4, d) and head.lora_B.shape == (5, V, 4)
    head_lora = 4 * (d + V)
    assert trainable_parameters(per_cluster) == trainable_parameters(lora) + 4 * head_lora
    assert torch.count_nonzero(head.lora_B) == 0  # a fresh head is the base head
    bound = 1 / math.sqrt(d)  # PEFT's Kaiming-uniform (a = sqrt 5) with fan-in d, per cluster: not r * d
    assert (head.lora_A.abs().amax((1, 2)) <= bound).all() and (head.lora_A.abs().amax((1, 2)) > 0.9 * bound).all()
    assert not torch.equal(head.lora_A[0], head.lora_A[1])


def test_per_cluster_without_clusters_holds_one_adapter(tiny):
    model, _ = tiny
    report = apply_regime(model, AdapterConfig("lora-per-cluster"))
    assert report.config.k == 1 and conditioned_head(model).lora_A.shape[0] == 1


def test_each_row_uses_its_clusters_static_lora(tiny, batch, logits, randomize_lora):
    """A mixed batch in one pass equals, row by row, a plain ``lora`` model holding that cluster's head adapter."""
    model, _ = tiny
    base = copy.deepcopy(model)
    adapted(model, "lora-per-cluster", k=4)
    randomize_lora(model)
    head = conditioned_head(model)
    with torch.no_grad():
        head.lora_B.normal_(std=0.1)
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    with conditioned(model, embeddings, "batch", CLUSTERS):
        mixed = logits(model, batch)
    static = adapted(base, "lora")
    static.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.lora_")}, strict=False)
    for cluster in (3, 1, 0):
        with torch.no_grad():
            static.lm_head.lora_A.copy_(head.lora_A[cluster])
            static.lm_head.lora_B.copy_(head.lora_B[cluster])
        rows = CLUSTERS == cluster
        assert (mixed[rows] - logits(static, batch)[rows]).abs().max() <= 1e-5
    with conditioned(model, embeddings, "batch", torch.full((4,), 2)):
        assert (logits(model, batch) - mixed).abs().max() > 1e-2  # clusters really differ


def test_per_cluster_routing_needs_valid_cluster_ids(tiny, batch, logits):
    model, _ = tiny
    adapted(model, "lora-per-cluster", k=4)
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    for conditioning in ("batch", "example", "centroid"):
        with pytest.raises(ValueError, match="condition it with the rows' cluster ids"), conditioned(model, embeddings, conditioning):
            pass
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\).*got 1\.\.4"), conditioned(model, embeddings, "batch", CLUSTERS + 1):
        pass
    with pytest.raises(RuntimeError, match=r"lora-per-cluster head has no conditioning.*conditioned\(model, embeddings, \"centroid\", cluster_ids, centroids\)"):
        logits(model, batch)


def test_per_cluster_gradients_reach_only_the_batchs_clusters(tiny, batch):
    model, _ = tiny
    adapted(model, "lora-per-cluster", k=5)
    head = conditioned_head(model)
    with torch.no_grad():
        head.lora_B.normal_(std=0.1)  # with B = 0, A gets no gradient
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    with conditioned(model, embeddings, "batch", CLUSTERS):
        model(**batch, labels=labels).loss.backward()
    touched = [bool(head.lora_A.grad[c].abs().sum() > 0 and head.lora_B.grad[c].abs().sum() > 0) for c in range(5)]
    assert touched == [True, True, False, True, False]


@pytest.mark.parametrize("regime", ["chameleon-constant", "lora-per-cluster"])
def test_bundle_round_trip(tiny, batch, tmp_path, regime):
    model, tokenizer = tiny
    config = apply_regime(model, AdapterConfig(regime, rank=4, k=4)).config
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])

    def run(m) -> torch.Tensor:
        with torch.no_grad(), conditioned(m, embeddings, "batch", CLUSTERS):
            return m(**batch).logits

    save_bundle(tmp_path, model, tokenizer, config)
    loaded = load_bundle(tmp_path, load_model(model.name_or_path)[0])
    assert loaded.adapter == config and loaded.adapter.k == 4
    assert isinstance(conditioned_head(loaded.model), ConditionedHead)
    assert torch.equal(run(loaded.model), run(model))


# ---------------------------------------------------------------- training end to end
@pytest.mark.parametrize("regime", ["chameleon-constant", "lora-per-cluster"])
def test_training_run_records_clusters_diversity_and_a_loadable_bundle(tmp_path, regime):
    config = TrainConfig(**TINY, regime=regime, epochs=1, lr=3e-3)
    result = train(config, tmp_path / "run", show_progress=False)
    k = result["k"]
    assert result["adapter"]["k"] == k > 1
    diversity = result["adapter_diversity"]
    assert diversity["clusters"] == k
    if regime == "chameleon-constant":  # one adapter, whatever the cluster
        assert diversity["min_cosine"] == pytest.approx(1, abs=1e-9) and diversity["relative_spread"] < 1e-6
    else:  # each cluster's adapter trained on its own rows only
        assert diversity["mean_cosine"] < 0.99 and diversity["relative_spread"] > 0.05
    bundle = load_bundle(tmp_path / "run")
    assert bundle.adapter.k == k and trainable_parameters(bundle.model) == result["trainable_parameters"]
    _, _, eval_split, _, _ = prepare(config, bundle.model, bundle.tokenizer)
    reloaded = evaluate(bundle.model, eval_split, config, bundle.clusters, bundle.tokenizer.pad_token_id)
    assert reloaded["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)


def test_a_config_saved_with_the_older_name_of_k_reads_as_k():
    saved = AdapterConfig("lora-per-cluster", rank=4, k=7).to_dict()
    older = {("clusters" if key == "k" else key): value for key, value in saved.items()}
    assert "k" not in older and AdapterConfig.from_dict(older) == AdapterConfig.from_dict(saved)
    assert AdapterConfig.from_dict(older).k == 7
