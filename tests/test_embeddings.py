"""The normalised mean token embedding: padding-invariant, unit-norm, batched like the model, cached."""

import copy

import pytest
import torch

from chameleon_core import embed_texts, inject_lora, mean_embedding
from chameleon_core import embeddings as embeddings_module
from chameleon_core.embeddings import embed_rows
from chameleon_core.lora import default_targets, lora_layers, merge_lora
from chameleon_core.models import model_fingerprint


def test_masked_mean_is_the_mean_of_the_real_tokens(tiny, batch):
    model, _ = tiny
    found = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    table = model.get_input_embeddings().weight
    for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
        expected = torch.nn.functional.normalize(table[ids[mask.bool()]].mean(0), dim=0)
        torch.testing.assert_close(found[row], expected)


def test_padding_does_not_change_an_embedding(tiny, texts):
    model, tokenizer = tiny
    short, long = texts[3], texts[2]
    padded = tokenizer([short, long], return_tensors="pt", padding=True)
    assert (padded["attention_mask"][0] == 0).sum() > 5  # the short text really is padded
    alone = embed_texts(model, tokenizer, [short])[0]
    assert (embed_texts(model, tokenizer, [short, long])[0] - alone).abs().max() <= 1e-6
    assert (mean_embedding(model, padded["input_ids"], padded["attention_mask"])[0] - alone).abs().max() <= 1e-6


def test_embeddings_have_unit_norm(tiny, texts):
    model, tokenizer = tiny
    for settings in ({}, {"mask_padding": False, "pad_to_max_length": True, "max_length": 32}):
        found = embed_texts(model, tokenizer, texts, **settings)
        assert found.shape == (len(texts), model.config.hidden_size)
        torch.testing.assert_close(found.norm(dim=-1), torch.ones(len(texts)))


def test_the_published_variant_averages_padding_too(tiny, texts):
    model, tokenizer = tiny
    masked = embed_texts(model, tokenizer, texts)
    paper = embed_texts(model, tokenizer, texts, max_length=32, mask_padding=False, pad_to_max_length=True)
    assert ((paper - masked).norm(dim=-1) > 1e-2).all()


def test_embed_texts_equals_mean_embedding_on_the_same_batch(tiny, batch, texts):
    model, tokenizer = tiny
    expected = mean_embedding(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(embed_texts(model, tokenizer, texts), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(embed_texts(model, tokenizer, texts, batch_size=3), expected, rtol=0, atol=1e-6)
    assert embed_texts(model, tokenizer, []).shape == (0, model.config.hidden_size)


def test_cache_returns_the_same_tensor_without_recomputing(tiny_gpt2, texts, tmp_path, monkeypatch):
    model, tokenizer = tiny_gpt2
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return mean_embedding(*args, **kwargs)

    def embed(texts=texts, **settings) -> torch.Tensor:
        return embed_texts(model, tokenizer, texts, cache_dir=tmp_path, **settings)

    monkeypatch.setattr(embeddings_module, "mean_embedding", counting)
    first = embed()
    assert len(calls) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(embed(), first) and len(calls) == 1
    embed(max_length=4), embed(mask_padding=False), embed(texts[:3])  # other settings or texts: new entries
    assert len(calls) == 4 and len(list(tmp_path.glob("*.safetensors"))) == 4
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.1 * torch.randn_like(model.get_input_embeddings().weight))
    assert not torch.equal(embed(), first) and len(calls) == 5  # other weights: never a stale read


def test_the_hidden_source_cache_is_read_back_and_covers_every_weight_of_the_transformer(tiny, texts, tmp_path, monkeypatch):
    """A grid's runs read one split's hidden-state conditions from disk; a change to any weight of the body (which
    the input-embedding fingerprint does not see) is a new entry, never a stale read."""
    model, tokenizer = tiny
    calls, real = [], embeddings_module.mean_hidden_state
    monkeypatch.setattr(embeddings_module, "mean_hidden_state", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    ids = tokenizer(texts, return_tensors="pt", padding=True)["input_ids"]

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        return (embed_texts(model, tokenizer, texts, source="hidden", cache_dir=tmp_path),
                embed_rows(model, ids, "hidden", cache_dir=tmp_path))

    first = both()
    assert len(calls) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    again = both()
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(again, first))  # read back, not recomputed
    torch.testing.assert_close(first[1], embed_rows(model, ids, "hidden"), rtol=0, atol=0)  # as computed uncached
    calls.clear()
    fingerprint = model_fingerprint(model)
    with torch.no_grad():
        list(model.base_model.parameters())[-1].add_(0.5)  # the final norm's
    assert model_fingerprint(model) == fingerprint  # the input embeddings did not change
    changed = both()
    assert len(calls) == 2 and not any(torch.equal(a, b) for a, b in zip(changed, first))


def test_an_all_padding_row_does_not_divide_by_zero(tiny_gpt2):
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert torch.isfinite(mean_embedding(tiny_gpt2[0], ids, torch.zeros_like(ids))).all()


def test_the_hidden_source_is_the_mean_of_a_rows_final_hidden_states(tiny, batch, texts):
    """``source="hidden"``: each row's vector is the normalised mean of the transformer's final hidden states
    (final norm included) over its real tokens, the same alone as beside longer rows."""
    model, tokenizer = tiny
    found = embed_texts(model, tokenizer, texts, source="hidden")
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[-1]  # (N, T, d), what the head reads
    for row, mask in enumerate(batch["attention_mask"]):
        expected = torch.nn.functional.normalize(states[row, mask.bool()].mean(0), dim=0)
        torch.testing.assert_close(found[row], expected, rtol=0, atol=1e-5)
    assert ((found - embed_texts(model, tokenizer, texts)).norm(dim=-1) > 1e-2).all()  # not the input embeddings
    torch.testing.assert_close(embed_texts(model, tokenizer, texts[:1], source="hidden")[0], found[0], rtol=0, atol=1e-5)


def test_the_hidden_source_reads_the_frozen_model_whatever_lora_the_layers_carry(tiny, texts, randomize_lora):
    """Training embeds its rows before any adapter exists; a trained bundle with layer LoRA (merged or
    not) must embed a prompt the same way, so the adapters are switched off while it is read."""
    model, tokenizer = tiny
    frozen = embed_texts(model, tokenizer, texts, source="hidden")
    adapted = copy.deepcopy(model)
    inject_lora(adapted, default_targets(adapted), r=4, alpha=8.0)
    randomize_lora(adapted, 0.5)
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        assert not torch.allclose(adapted.base_model(**batch).last_hidden_state, model.base_model(**batch).last_hidden_state)
    torch.testing.assert_close(embed_texts(adapted, tokenizer, texts, source="hidden"), frozen, rtol=0, atol=1e-5)
    merge_lora(adapted)
    torch.testing.assert_close(embed_texts(adapted, tokenizer, texts, source="hidden"), frozen, rtol=0, atol=1e-5)
    assert all(layer.merged and not layer.disabled for layer in lora_layers(adapted).values())  # restored as it was


def test_an_unknown_source_is_refused(tiny, texts):
    with pytest.raises(ValueError, match="unknown condition source 'logits'; choose from"):
        embed_texts(*tiny, texts, source="logits")
