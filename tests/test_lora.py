"""Static LoRA: numerically PEFT's LoRA, identity at start, exact merge/unmerge, clear errors."""

import copy
import json
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from chameleon_core import (
    AdapterConfig, LoRALayer, apply_regime, export_peft, inject_head_lora, inject_lora, lora_layers, merge_lora,
    unmerge_lora,
)
from chameleon_core.lora import DEFAULT_TARGETS

RANK, ALPHA = 4, 8.0  # scale 2, so a wrong scale cannot hide behind alpha / r = 1


def test_matches_peft_given_the_same_a_and_b(tiny, batch, logits, randomize_lora):
    model, _ = tiny
    gpt2 = model.config.model_type == "gpt2"
    targets = DEFAULT_TARGETS[model.config.model_type]
    reference = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), fan_in_fan_out=gpt2, lora_dropout=0.0),
    )
    inject_lora(model, targets, RANK, ALPHA)
    randomize_lora(model)
    layers = lora_layers(model)
    assert len(layers) == model.config.num_hidden_layers * (4 if gpt2 else 7)  # gpt2: attn.c_proj and mlp.c_proj
    assert all(isinstance(layer.base, Conv1D) == gpt2 for layer in layers.values())
    with torch.no_grad():
        for name, layer in layers.items():
            theirs = reference.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    ours = logits(model, batch)
    with reference.disable_adapter():
        assert (ours - logits(reference, batch)).abs().max() > 1e-2  # the adapters do change the output
    assert (ours - logits(reference, batch)).abs().max() <= 1e-5


@pytest.mark.parametrize("regime", ["lora", "lora-head", "lora-matched"])
def test_export_peft_loads_in_peft_with_the_same_logits(tiny, batch, logits, randomize_lora, tmp_path, regime):
    """The head is included: PEFT can target a tied ``lm_head`` (it only warns that *merging* it
    would need ``ensure_weight_tying``), so the exported head adapter is compared with the layers'."""
    model, _ = tiny
    fresh = copy.deepcopy(model)
    report = apply_regime(model, AdapterConfig(regime, rank=RANK, alpha=ALPHA))
    randomize_lora(model)
    export_peft(tmp_path, model, report.config)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (report.config.lora_rank, report.config.lora_alpha)
    assert "lm_head" in written["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied head; fan_in_fan_out flipped for the Linear head
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded.get_base_model().lm_head, peft.tuners.lora.LoraLayer)
    ours = logits(model, batch)
    assert (ours - logits(loaded, batch)).abs().max() <= 1e-5
    with loaded.disable_adapter():
        assert (ours - logits(loaded, batch)).abs().max() > 1e-2


def test_fresh_adapter_is_the_identity(tiny, batch, logits):
    model, _ = tiny
    base = logits(model, batch)
    inject_lora(model, DEFAULT_TARGETS[model.config.model_type], RANK, ALPHA)
    inject_head_lora(model, RANK, ALPHA)
    assert all(not layer.lora_B.any() and layer.lora_A.any() for layer in lora_layers(model).values())
    assert torch.equal(logits(model, batch), base)


@pytest.mark.parametrize("base", [nn.Linear(6, 5), Conv1D(5, 6)], ids=["linear", "conv1d"])
def test_update_is_scaled_by_alpha_over_r(base):
    layer = LoRALayer(base, r=3, alpha=7.5)
    assert layer.scale == 2.5
    assert (layer.in_features, layer.out_features) == (6, 5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 6)
    expected = base(x) + 2.5 * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected)


def test_merge_then_unmerge_is_exact(tiny, batch, logits, randomize_lora):
    model, _ = tiny
    inject_lora(model, DEFAULT_TARGETS[model.config.model_type], RANK, ALPHA)
    inject_head_lora(model, RANK, ALPHA)
    randomize_lora(model)
    originals = {name: (layer.base.weight, layer.base.weight.clone()) for name, layer in lora_layers(model).items()}
    unmerged = logits(model, batch)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert not any(torch.equal(layer.base.weight, originals[name][1]) for name, layer in lora_layers(model).items())
    assert (logits(model, batch) - unmerged).abs().max() <= 1e-5
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert layer.base.weight is originals[name][0]
        assert torch.equal(layer.base.weight, originals[name][1])
    assert (logits(model, batch) - unmerged).abs().max() <= 1e-5


def test_unmerge_after_moving_a_merged_model_restores_the_moved_originals(tiny, randomize_lora):
    """The kept originals follow ``.to()``, and the tied head gets the embedding back, not a copy."""
    model, _ = tiny
    apply_regime(model, AdapterConfig("lora", rank=RANK, alpha=ALPHA))
    randomize_lora(model)
    originals = {name: layer.base.weight.double() for name, layer in lora_layers(model).items()}
    merge_lora(model)
    model.double()
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base.weight, originals[name])
    assert model.get_output_embeddings().base.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("regime", ["lora", "chameleon"])  # chameleon merges the layer LoRA only
def test_merge_and_unmerge_keep_state_dict_keys_and_parameter_names(tiny, randomize_lora, regime):
    """A merged model saves under the unmerged model's names, with no extra copy of the old weights."""
    model, _ = tiny
    apply_regime(model, AdapterConfig(regime, rank=RANK, alpha=ALPHA))
    randomize_lora(model)

    def names() -> tuple[list[str], list[str]]:
        return list(model.state_dict()), [name for name, _ in model.named_parameters()]

    applied = names()
    merge_lora(model)
    assert names() == applied
    unmerge_lora(model)
    assert names() == applied


def test_merging_a_tied_head_leaves_the_input_embedding_alone(tiny_gpt2, randomize_lora):
    model, _ = tiny_gpt2
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding  # GPT-2 ties lm_head to wte
    before = embedding.clone()
    inject_head_lora(model, RANK, ALPHA)
    randomize_lora(model)
    merge_lora(model)
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert not torch.equal(model.lm_head.base.weight, before)  # the head itself did change
    unmerge_lora(model)
    assert model.lm_head.base.weight is model.get_input_embeddings().weight  # tie restored


def test_paper_init_is_not_the_identity(tiny, batch, logits):
    model, _ = tiny
    base = logits(model, batch)
    inject_head_lora(model, RANK, ALPHA, init="paper")
    head = model.get_output_embeddings()
    assert head.lora_B.any() and head.lora_A.std() < 0.02  # both factors are 0.01 * N(0, 1)
    assert not torch.equal(logits(model, batch), base)


class Toy(nn.Module):
    """An architecture with no default LoRA targets."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy")
        self.mixer, self.gate, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 9)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_unknown_architecture_without_targets_names_candidates():
    with pytest.raises(ValueError, match=r"model_type 'toy'.*\('gate', 'mixer'\)"):
        apply_regime(Toy(), AdapterConfig("lora"))


def test_head_only_lora_needs_no_layer_targets():
    toy = Toy()
    report = apply_regime(toy, AdapterConfig("lora-head", rank=2))
    assert report.head_module == "head" and not report.layer_modules and list(lora_layers(toy)) == ["head"]


def test_explicit_targets_work_on_unknown_architecture():
    toy = Toy()
    assert inject_lora(toy, ["mixer", "head"], RANK, ALPHA) == ["mixer"]  # the head only via inject_head_lora


def test_targets_that_match_nothing_raise(tiny):
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D module matches LoRA targets"):
        inject_lora(tiny[0], ("not_a_layer",), RANK, ALPHA)


def test_bad_layer_arguments_raise():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALayer(nn.Linear(4, 4), r=0, alpha=1.0)
    with pytest.raises(ValueError, match="unknown LoRA init 'xavier'"):
        LoRALayer(nn.Linear(4, 4), r=2, alpha=1.0, init="xavier")
    with pytest.raises(TypeError, match="not Conv2d"):
        LoRALayer(nn.Conv2d(4, 4, 1), r=2, alpha=1.0)
