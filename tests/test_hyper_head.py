"""Hyper-LoRA head: published parameter counts, per-row adapters in one pass, training, generation,
and the adapter-diversity diagnostic."""

import copy

import pytest
import torch
import torch.nn.functional as F

from chameleon_core import (
    AdapterConfig, HyperLoRAHead, apply_regime, condition_groups, conditioned, hyper_head, mean_embedding,
    trainable_parameters,
)
from chameleon_core.hyper_head import ClusterLoRAHead, adapter_diversity
from chameleon_core.lora import lora_layers, output_head_name

CLUSTERS = torch.tensor([3, 1, 3, 0])  # rows 0 and 2 share a cluster; ids need not be 0..G-1


@pytest.fixture
def chameleon(tiny, batch, randomize_lora):
    """A chameleon model whose generated head update is large enough to tell adapters apart."""
    model, _ = tiny
    apply_regime(model, AdapterConfig("chameleon", rank=4))
    randomize_lora(model)
    with torch.no_grad():
        hyper_head(model).hyper.net[-1].weight.normal_(std=0.2)
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    return model, embeddings


def rows(batch, index: list[int]) -> dict[str, torch.Tensor]:
    """A sub-batch, trimmed to its own longest row (as it would be padded on its own)."""
    length = int(batch["attention_mask"][index].sum(1).max())
    return {key: value[index, :length] for key, value in batch.items()}


@pytest.mark.parametrize(
    "regime, head_count",
    [
        ("chameleon", (768 * 64 + 64) + (64 * 32 + 32) + (32 + 1) * 4 * (768 + 50_257)),  # d -> 64 -> 32 -> r (d + V)
        ("lora-head", 4 * (768 + 50_257)),  # A: r x d, B: V x r
    ],
)
def test_gpt2_small_head_parameter_counts(gpt2_small, regime, head_count):
    report = apply_regime(gpt2_small, AdapterConfig(regime, rank=4))
    head = gpt2_small.get_submodule(report.head_module)
    assert isinstance(head, HyperLoRAHead) == (regime == "chameleon")
    assert trainable_parameters(head) == head_count == {"chameleon": 6_786_596, "lora-head": 204_100}[regime]


@pytest.mark.parametrize("conditioning", ["batch", "example"])
def test_mixed_batch_in_one_pass_equals_each_group_on_its_own(chameleon, batch, logits, conditioning):
    model, embeddings = chameleon
    with conditioned(model, embeddings, conditioning, cluster_ids=CLUSTERS):
        mixed = logits(model, batch)
    with conditioned(model, embeddings, "batch"):
        assert (logits(model, batch) - mixed).abs().max() > 1e-2  # per-group adapters really differ
    groups = [[0, 2], [1], [3]] if conditioning == "batch" else [[0], [1], [2], [3]]
    for index in groups:
        alone = rows(batch, index)
        with conditioned(model, embeddings[index], "batch"):
            separate = logits(model, alone)
        real = alone["attention_mask"].bool()
        assert (mixed[index, : real.shape[1]][real] - separate[real]).abs().max() <= 1e-5


def test_batch_of_one_cluster_is_conditioned_on_its_mean_with_or_without_ids(chameleon, batch, logits):
    model, embeddings = chameleon
    with conditioned(model, embeddings, "batch"):
        expected = logits(model, batch)
    with conditioned(model, embeddings, "batch", cluster_ids=torch.full((4,), 7)):
        assert (logits(model, batch) - expected).abs().max() <= 1e-5


def test_centroids_condition_each_cluster(chameleon, batch, logits):
    model, embeddings = chameleon
    centroids = torch.nn.functional.normalize(torch.randn(5, embeddings.shape[1]), dim=-1)
    cond, groups = condition_groups(embeddings, "centroid", CLUSTERS, centroids)
    assert torch.equal(cond, centroids[[0, 1, 3]]) and groups.tolist() == [2, 1, 2, 0]
    with conditioned(model, embeddings, "centroid", cluster_ids=CLUSTERS, centroids=centroids):
        mixed = logits(model, batch)
    for index, cluster in (([0, 2], 3), ([1], 1), ([3], 0)):
        alone = rows(batch, index)
        with conditioned(model, centroids[cluster : cluster + 1], "batch"):
            separate = logits(model, alone)
        real = alone["attention_mask"].bool()
        assert (mixed[index, : real.shape[1]][real] - separate[real]).abs().max() <= 1e-5


def test_condition_groups_rejects_bad_modes():
    embeddings = torch.randn(3, 8)
    with pytest.raises(ValueError, match="unknown conditioning 'cluster'"):
        condition_groups(embeddings, "cluster")
    with pytest.raises(ValueError, match="'centroid' needs the rows' cluster ids and the centroids"):
        condition_groups(embeddings, "centroid")
    with pytest.raises(ValueError, match="'centroid' needs the centroids"):
        condition_groups(embeddings, "centroid", torch.tensor([0, 1, 0]))


def test_forward_without_conditioning_raises(chameleon, batch, logits):
    model, embeddings = chameleon
    with pytest.raises(RuntimeError, match=r"no conditioning.*with conditioned\(model, embeddings"):
        logits(model, batch)
    with conditioned(model, embeddings):
        logits(model, batch)
    with pytest.raises(RuntimeError, match="no conditioning"):  # cleared on leaving the context
        logits(model, batch)


def test_conditioned_is_a_no_op_without_a_hyper_head(tiny, batch, logits, randomize_lora):
    model, _ = tiny
    apply_regime(model, AdapterConfig("lora"))
    randomize_lora(model)
    expected = logits(model, batch)
    with conditioned(model, torch.randn(4, model.config.hidden_size), "example"):
        assert torch.equal(logits(model, batch), expected)


def test_training_step_changes_only_the_adapters(chameleon, batch):
    model, embeddings = chameleon
    model.train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    embedding = model.get_input_embeddings().weight.detach().clone()
    hyper = {name: p.detach().clone() for name, p in hyper_head(model).hyper.named_parameters()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with conditioned(model, embeddings, "batch", cluster_ids=CLUSTERS):
        model(**batch, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hyper_head(model).hyper.parameters())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    assert all(not torch.equal(p, hyper[name]) for name, p in hyper_head(model).hyper.named_parameters())
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)


def test_generate_inside_conditioned_expands_rows(chameleon, tiny, texts):
    """Each prompt, generated in a mixed batch with two beams and two returned sequences, gets
    exactly what it gets when generated alone: the adapter follows its row through expansion."""
    model, tokenizer = chameleon[0], tiny[1]
    prompts = torch.tensor([ids[:6] for ids in tokenizer(texts[:2])["input_ids"]])  # equal lengths: no padding
    embeddings = mean_embedding(model, prompts)
    pad = tokenizer.pad_token_id
    settings = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=pad)
    with conditioned(model, embeddings, "example"):
        together = model.generate(prompts, **settings)
    assert together.shape == (4, 10)
    for i in range(2):
        with conditioned(model, embeddings[i : i + 1], "batch"):
            assert torch.equal(together[2 * i : 2 * i + 2], model.generate(prompts[i : i + 1], **settings))
    with conditioned(model, embeddings, "batch"):
        sampled = model.generate(prompts, max_new_tokens=3, do_sample=True, num_return_sequences=3, pad_token_id=pad)
    assert sampled.shape == (6, 9)
    with pytest.raises(RuntimeError, match="no conditioning"):
        model.generate(prompts, max_new_tokens=1)


def test_expanded_rows_must_divide_evenly(chameleon, batch):
    model, embeddings = chameleon
    with conditioned(model, embeddings[:3], "example"), pytest.raises(ValueError, match="4 rows cannot share"):
        model(**batch)


def test_apply_regime_keeps_eval_mode(tiny, batch, logits):
    model, _ = tiny
    assert not model.training
    apply_regime(model, AdapterConfig("chameleon", hyper_dropout=0.5))
    assert not hyper_head(model).hyper.training
    embeddings = torch.randn(4, model.config.hidden_size)

    def generate_and_run() -> torch.Tensor:  # the adapter (and its dropout) is drawn on entering
        with conditioned(model, embeddings):
            return logits(model, batch)

    assert torch.equal(generate_and_run(), generate_and_run())
    model.train()
    assert hyper_head(model).hyper.training
    with torch.no_grad():
        cond = embeddings.mean(0, keepdim=True)
        assert not torch.equal(hyper_head(model).hyper(cond)[1], hyper_head(model).hyper(cond)[1])  # dropout is real


@pytest.fixture
def many_rows(tiny, randomize_lora):
    """A chameleon model with a distinct head update per group, and 20 unpadded rows of random tokens."""
    model, _ = tiny
    apply_regime(model, AdapterConfig("chameleon", rank=4))
    randomize_lora(model)
    with torch.no_grad():
        hyper_head(model).hyper.net[-1].weight.normal_(std=0.2)
    ids = torch.randint(model.config.vocab_size, (20, 6))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("conditioning, n_groups", [("centroid", 16), ("example", 20)])
def test_many_groups_in_one_pass_equal_each_group_alone(many_rows, logits, conditioning, n_groups):
    """16 clusters in 20 rows, and every row its own group: the gathered pass equals each group run alone."""
    model, batch = many_rows
    embeddings = mean_embedding(model, batch["input_ids"])
    centroids = F.normalize(torch.randn(n_groups, embeddings.shape[1]), dim=-1)
    cluster_ids = torch.randperm(20) % n_groups  # every cluster present, rows of a cluster scattered
    with conditioned(model, embeddings, conditioning, cluster_ids, centroids):
        mixed = logits(model, batch)
    with conditioned(model, embeddings, "batch"):
        assert (logits(model, batch) - mixed).abs().max() > 1e-2  # per-group adapters really differ
    for g in range(n_groups):
        index = (cluster_ids == g).nonzero().flatten().tolist() if conditioning == "centroid" else [g]
        cond = centroids[g : g + 1] if conditioning == "centroid" else embeddings[g : g + 1]
        with conditioned(model, cond, "batch"):
            alone = logits(model, {key: value[index] for key, value in batch.items()})
        assert (mixed[index] - alone).abs().max() <= 1e-5


def _summed_loss(model, batch) -> torch.Tensor:
    ids = batch["input_ids"]
    out = model(**batch).logits
    return F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def test_mixed_batch_gradients_are_the_sum_of_each_groups(many_rows):
    """The gather's backward routes each row's gradient to its own group's generated adapter."""
    model, batch = many_rows
    model.eval()  # no dropout: the mixed and the separate passes generate the same adapters
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = mean_embedding(model, batch["input_ids"])
    cluster_ids = torch.arange(20) % 16
    centroids = F.normalize(torch.randn(16, embeddings.shape[1]), dim=-1)
    with conditioned(model, embeddings, "centroid", cluster_ids, centroids):
        mixed = torch.autograd.grad(_summed_loss(model, batch), params)
    separate = [torch.zeros_like(p) for p in params]
    for g in range(16):
        rows = {key: value[cluster_ids == g] for key, value in batch.items()}
        with conditioned(model, centroids[g : g + 1], "batch"):
            for total, grad in zip(separate, torch.autograd.grad(_summed_loss(model, rows), params)):
                total += grad
    hyper = {id(p) for p in hyper_head(model).hyper.parameters()}
    assert all(g.abs().sum() > 0 for p, g in zip(params, mixed) if id(p) in hyper)
    for a, b in zip(mixed, separate):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _dense_diversity(delta: torch.Tensor) -> dict:
    """The diagnostic on materialised updates ``delta`` (k, V, d): the reference for the factored one."""
    flat = delta.flatten(1)
    k = len(flat)
    cosine = F.cosine_similarity(flat[:, None], flat[None], dim=-1)[tuple(torch.triu_indices(k, k, 1))]
    norms = flat.norm(dim=1)
    spread = (flat - flat.mean(0)).pow(2).sum(1).mean().sqrt()
    return {"clusters": k, "mean_cosine": cosine.mean().item(), "min_cosine": cosine.min().item(),
            "relative_spread": (spread / norms.mean()).item(), "mean_norm": norms.mean().item()}


@pytest.mark.parametrize("kind", ["hyper", "per-cluster"])
def test_adapter_diversity_equals_the_dense_computation(kind):
    base = torch.nn.Linear(12, 30)
    centroids = F.normalize(torch.randn(5, 6), dim=-1)
    if kind == "hyper":
        head = HyperLoRAHead(base, embedding_dim=6, r=3, alpha=6.0, hidden=(8,), dropout=0.5)
        with torch.no_grad():
            head.hyper.net[-1].weight.normal_(std=0.3)
        head.eval()
        A, B = head.hyper(centroids)  # cluster c conditioned on its centroid
        head.train()  # the diagnostic must switch dropout off itself
    else:
        head = ClusterLoRAHead(base, k=5, r=3, alpha=3.0)
        with torch.no_grad():
            head.lora_B.normal_()
        A, B = head.lora_A, head.lora_B
    found = adapter_diversity(head, centroids)
    assert head.training  # the head's mode is restored
    expected = _dense_diversity(head.scale * B.detach().double() @ A.detach().double())  # (k, V, d): the reference
    assert found == pytest.approx(expected, rel=1e-9)
    assert -1 < found["min_cosine"] < found["mean_cosine"] < 1 and found["relative_spread"] > 0.1


def test_adapter_diversity_of_a_constant_input_head_is_one_adapter(tiny):
    model, _ = tiny
    apply_regime(model, AdapterConfig("chameleon-constant", rank=4))
    with torch.no_grad():
        hyper_head(model).hyper.net[-1].weight.normal_(std=0.2)
    centroids = F.normalize(torch.randn(7, model.config.hidden_size), dim=-1)
    found = adapter_diversity(hyper_head(model), centroids)
    assert found["clusters"] == 7 and found["mean_norm"] > 1
    assert found["mean_cosine"] == pytest.approx(1, abs=1e-12) and found["min_cosine"] == pytest.approx(1, abs=1e-12)
    assert found["relative_spread"] <= 1e-6  # zero up to float64 rounding of a difference of equal sums
    one = adapter_diversity(hyper_head(model), centroids[:1])
    assert one["mean_cosine"] is None and one["min_cosine"] is None and one["relative_spread"] == 0


@pytest.mark.parametrize("regime", ["chameleon-head", "chameleon"])
def test_a_hyper_head_initialised_as_a_lora_is_that_static_lora_at_step_0(tiny, batch, regime):
    """``hyper_init="lora"``: every condition gets the same PEFT-initialised adapter (B = 0), so the logits are the
    base model's and the generated B gets exactly the gradient a static head LoRA's B gets with the same A."""
    model, _ = tiny
    static = copy.deepcopy(model)
    apply_regime(model, AdapterConfig(regime, rank=4, hyper_init="lora"))
    apply_regime(static, AdapterConfig("lora-head" if regime == "chameleon-head" else "lora", rank=4))
    head, static_head = hyper_head(model), lora_layers(static)[output_head_name(static)]
    conditions = F.normalize(torch.randn(3, head.hyper.net[0].in_features), dim=1)
    A, B = head.hyper(conditions)
    assert torch.equal(A[0], A[2]) and A.abs().max() > 0 and not B.any()  # one adapter, whatever the condition
    with torch.no_grad():
        static_head.lora_A.copy_(A[0])
        for name, layer in lora_layers(static).items():  # the layers' LoRA (chameleon) is B = 0 on both sides
            if name != output_head_name(static):
                layer.lora_A.copy_(lora_layers(model)[name].lora_A)
    model.eval(), static.eval()
    labels = batch["input_ids"]
    with conditioned(model, mean_embedding(model, batch["input_ids"], batch["attention_mask"])):
        out = model(**batch, labels=labels)
        out.loss.backward()
    reference = static(**batch, labels=labels)
    reference.loss.backward()
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=1e-6)
    # One group per batch and zero output weights: the output bias's B part gets exactly dL/dB of the generated B.
    bias_grad = head.hyper.net[-1].bias.grad[A[0].numel():].reshape(B.shape[1:])
    assert static_head.lora_B.grad.abs().max() > 0
    torch.testing.assert_close(bias_grad, static_head.lora_B.grad, rtol=1e-5, atol=1e-7)


def test_an_unknown_hyper_init_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown hyper-network init 'zeros'; choose from \('paper', 'lora'\)"):
        AdapterConfig("chameleon", hyper_init="zeros")
