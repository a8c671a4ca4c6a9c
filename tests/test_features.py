"""Cached hidden states: the head-only regimes get the whole model's losses and gradients from them."""

from __future__ import annotations

import pytest
import torch

from chameleon_core import AdapterConfig, apply_regime, load_model, lora_layers
from chameleon_core.features import Features, cached_features, compute_features, packed_row_terms, row_terms
from chameleon_core.hyper_head import ClusterLoRAHead, HyperLoRAHead, conditioned_head
from chameleon_core.protocols import IGNORE, get_protocol
from chameleon_core.regimes import HEAD_ONLY
from chameleon_core.train import Split, TrainConfig, _conditioned, _row_terms, prepare, train

TINY = dict(model="random:tiny-llama", dataset="synthetic", max_length=64, max_train_rows=64, max_eval_rows=32, batch_size=8)


def _loss_and_gradients(model, split, idx, config, clusters, pad_id):
    model.zero_grad(set_to_none=True)
    with _conditioned(model, split, idx, config, clusters):
        sums, counts = _row_terms(model, split, idx, get_protocol(config.protocol), pad_id, "cpu")
        (sums.sum() / counts.sum()).backward()
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("protocol", ["causal", "paper"])
@pytest.mark.parametrize("regime", HEAD_ONLY)
def test_cached_states_give_the_whole_models_losses_and_gradients(regime, protocol):
    model, tok = load_model("random:tiny-llama")
    config = TrainConfig(**TINY, regime=regime, protocol=protocol)
    train_split, *_, clusters, _ = prepare(config, model, tok)
    features = compute_features(model, train_split.encoded, get_protocol(protocol), tok.pad_token_id)
    apply_regime(model, AdapterConfig(regime, rank=4, k=clusters.k))
    with torch.no_grad():  # adapters that change the logits, so a wrong path cannot pass
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.5)
        if isinstance(head := conditioned_head(model), ClusterLoRAHead):
            head.lora_B.normal_(std=0.5)
        if isinstance(head, HyperLoRAHead):
            head.hyper.net[-1].weight.normal_(std=0.5)
    model.eval()  # no dropout in the hyper-network: both paths see the same adapters
    cached = Split("train", train_split.encoded, train_split.labels, features)
    one_cluster = [i for i, label in enumerate(train_split.labels) if label == train_split.labels[0]][:4]
    # mixed rows and one cluster's rows: a head with one adapter for the batch reads the packed positions
    # (Features.pack), a head with several reads the padded layout (Features.collate)
    for idx in ([0, 1, 2, 3], list(range(8, 16)), one_cluster):
        whole = _loss_and_gradients(model, train_split, idx, config, clusters, tok.pad_token_id)
        fast = _loss_and_gradients(model, cached, idx, config, clusters, tok.pad_token_id)
        assert torch.equal(fast[1], whole[1]) and int(whole[1].sum()) > 0  # the same scored targets
        torch.testing.assert_close(fast[0].sum() / fast[1].sum(), whole[0].sum() / whole[1].sum(), rtol=0, atol=1e-5)
        torch.testing.assert_close(fast[0], whole[0], rtol=1e-6, atol=1e-5)  # each row's summed loss
        for name, gradient in whole[2].items():
            assert gradient.abs().max() > 0
            torch.testing.assert_close(fast[2][name], gradient, rtol=0, atol=1e-5)


def test_packed_positions_give_the_padded_layouts_row_terms():
    torch.manual_seed(0)
    lengths = [3, 0, 5, 1]  # a row with no scored position too
    features = Features([torch.randn(n, 6) for n in lengths], [torch.randint(0, 11, (n,)) for n in lengths])
    features.targets[2][1] = IGNORE  # a kept, unscored position (published protocol)
    head = torch.nn.Linear(6, 11)
    hidden, targets, rows = features.pack([2, 0, 1, 3])
    assert hidden.shape == (1, 9, 6) and rows.tolist() == [0] * 5 + [1] * 3 + [3]
    packed = packed_row_terms(head(hidden), targets, rows, 4)
    padded = row_terms(head(features.collate([2, 0, 1, 3])[0]), features.collate([2, 0, 1, 3])[1])
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-6, atol=1e-6)
    assert packed[1].tolist() == padded[1].tolist() == [4, 3, 0, 1]


def test_the_cache_is_read_back_and_keyed_on_the_rows(tmp_path):
    model, tok = load_model("random:tiny-llama")
    config = TrainConfig(**TINY, regime="lora-head")
    train_split, val_split, *_ = prepare(config, model, tok)
    protocol = get_protocol("causal")
    first = cached_features(model, train_split.encoded, protocol, tok.pad_token_id, tmp_path)
    again = cached_features(model, train_split.encoded, protocol, tok.pad_token_id, tmp_path)
    other = cached_features(model, val_split.encoded, protocol, tok.pad_token_id, tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(first.hidden + first.targets, again.hidden + again.targets))
    assert len(other.targets) == len(val_split.encoded) != len(first.targets)


@pytest.mark.parametrize("regime", HEAD_ONLY)
def test_a_run_on_cached_states_ends_where_the_whole_model_run_ends(tmp_path, monkeypatch, regime):
    """Same seed, same batches: the losses of every step and the final evaluation agree (a model without
    dropout in its transformer, as SmolLM2)."""
    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path / "cache"))
    config = TrainConfig(**TINY, regime=regime, epochs=2, lr=1e-2, hyper_dropout=0.0)
    whole = train(config, tmp_path / "whole", show_progress=False)
    fast = train(TrainConfig(**TINY, regime=regime, epochs=2, lr=1e-2, hyper_dropout=0.0, cached_features=True),
                 tmp_path / "fast", show_progress=False)
    steps = [loss for epoch in whole["history"] for loss in epoch["step_losses"]]
    assert whole["history"][-1]["train_loss"] < whole["history"][0]["train_loss"] - 0.05  # it trained
    assert [loss for epoch in fast["history"] for loss in epoch["step_losses"]] == pytest.approx(steps, abs=1e-4)
    assert fast["eval"]["loss"] == pytest.approx(whole["eval"]["loss"], abs=1e-4)
    assert fast["config"]["cached_features"] and not whole["config"]["cached_features"]


def test_cached_states_are_refused_for_a_regime_that_adapts_the_transformer(tmp_path):
    with pytest.raises(ValueError, match=r"cached_features \(--cached-features\) needs a head-only regime \(lora-head, "
                                         r"chameleon-head, lora-head-matched, chameleon-head-constant, "
                                         r"lora-head-per-cluster\); 'chameleon' adapts the transformer"):
        train(TrainConfig(**TINY, regime="chameleon", cached_features=True), tmp_path / "run", show_progress=False)
