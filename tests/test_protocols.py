"""The two protocols: what is scored, what conditions, what the published one really measures."""

import pytest
import torch
import torch.nn.functional as F

from chameleon_core.data import Record, alpaca_record, load_synthetic
from chameleon_core.models import load_model
from chameleon_core.protocols import IGNORE, PROTOCOLS, collate, encode, forward_logits, get_protocol, loss_terms
from chameleon_core.train import TrainConfig


def _model():
    torch.manual_seed(0)
    return load_model("random:tiny-gpt2")


def test_paper_protocol_scores_the_last_position_without_shift_and_mostly_padding():
    model, tok = _model()
    records = load_synthetic()["train"][:40]
    enc = encode(records, model, tok, "paper", max_length=128)
    assert all(len(ids) == 128 for ids in enc.input_ids)
    assert enc.padding_share == 1.0  # every synthetic row is shorter than 128 tokens: the target is EOS
    batch = collate(enc, list(range(8)), "paper", tok.pad_token_id)
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != 0).long())  # the published mask
    logits = forward_logits(model, batch, "paper")
    assert logits.shape[1] == 1  # only the last position is computed
    total, n = loss_terms(logits, batch["labels"], "paper")
    expected = F.cross_entropy(logits[:, -1], batch["input_ids"][:, -1])  # target = the token just read
    assert int(n) == 8 and torch.allclose(total / n, expected, atol=1e-5)


def test_paper_protocol_ignores_id_zero_targets():
    logits = torch.randn(3, 1, 10)
    labels = torch.tensor([[5, 0], [5, 3], [5, IGNORE]])
    total, n = loss_terms(logits, labels, "paper")
    assert int(n) == 1
    assert torch.allclose(total, F.cross_entropy(logits[1:2, -1], torch.tensor([3]), reduction="sum"))


def test_causal_loss_is_independent_of_padding_and_batch_companions():
    model, tok = _model()
    records = [Record("", "The galaxy is distant and the telescope is faint. " * 6, ""), Record("", "Bake the dough. " * 30, "")]
    enc = encode(records, model, tok, "causal", max_length=256, context_tokens=8)
    assert len(enc.input_ids[0]) != len(enc.input_ids[1])
    together = collate(enc, [0, 1], "causal", tok.pad_token_id)
    alone = collate(enc, [0], "causal", tok.pad_token_id)
    with torch.no_grad():
        t_sum, t_n = loss_terms(forward_logits(model, together, "causal")[:1], together["labels"][:1], "causal")
        a_sum, a_n = loss_terms(forward_logits(model, alone, "causal"), alone["labels"], "causal")
    assert int(t_n) == int(a_n) == len(enc.input_ids[0]) - 8
    assert torch.allclose(t_sum, a_sum, atol=1e-4)


def test_causal_wikitext_conditions_on_the_first_tokens_only_and_drops_short_rows():
    model, tok = _model()
    head = "The galaxy is distant and the telescope is faint tonight. "
    records = [Record("", head + "Bake the dough.", ""), Record("", head + "Score a late goal in the match.", ""), Record("", "Too short.", "")]
    enc = encode(records, model, tok, "causal", context_tokens=8)
    assert enc.dropped == 1 and len(enc) == 2
    assert torch.allclose(enc.embeddings[0], enc.embeddings[1])  # same first 8 tokens, different scored tails
    assert all((labels[:8] == IGNORE).all() and (labels[8:] != IGNORE).all() for labels in enc.labels)


def test_paper_wikitext_condition_leaks_the_scored_tokens():
    model, tok = _model()
    head = "The galaxy is distant and the telescope is faint tonight. "
    records = [Record("", head + "Bake the dough.", ""), Record("", head + "Score a late goal in the match.", "")]
    enc = encode(records, model, tok, "paper", max_length=64)
    assert not torch.allclose(enc.embeddings[0], enc.embeddings[1])  # the tail (what is scored) changes the condition


def test_causal_alpaca_scores_the_response_and_conditions_on_the_instruction():
    model, tok = _model()
    records = [alpaca_record("Explain how to bake the dough.", "", "Knead it, then bake it golden."),
               alpaca_record("Explain how to bake the dough.", "", "Something else entirely.")]
    enc = encode(records, model, tok, "causal")
    assert torch.allclose(enc.embeddings[0], enc.embeddings[1])  # the answer never reaches the condition
    prompt_len = len(tok(records[0].prompt)["input_ids"])
    labels = enc.labels[0]
    assert (labels[:prompt_len] == IGNORE).all() and (labels[prompt_len:] != IGNORE).all()
    assert int(enc.input_ids[0][-1]) == tok.eos_token_id  # the end of the answer is scored too


def test_with_gpt2s_tokenizer_most_published_wikitext_targets_are_padding():
    """The published setting (GPT-2 tokens, max_length 256): 2,704 of the 2,891 non-blank test rows are shorter."""
    from conftest import DATA_DIR

    from chameleon_core.data import load_wikitext

    if not (DATA_DIR / "gpt2-tokenizer").is_dir():
        pytest.skip("the GPT-2 tokenizer and WikiText-2 are not available locally")
    model, tok = load_model("random:tiny-gpt2", tokenizer=str(DATA_DIR / "gpt2-tokenizer"))
    test_rows = load_wikitext(DATA_DIR / "wikitext-2-raw")["test"]
    enc = encode(test_rows, model, tok, "paper", max_length=256)
    assert len(enc) == 2891
    assert enc.padding_share == pytest.approx(2704 / 2891)


def test_protocols_are_objects_found_by_name():
    assert list(PROTOCOLS) == ["paper", "causal"] and all(get_protocol(n).name == n for n in PROTOCOLS)
    assert PROTOCOLS["paper"].transductive and not PROTOCOLS["causal"].transductive  # the README's point 6
    assert TrainConfig(protocol="paper").is_transductive and not TrainConfig(protocol="causal").is_transductive
    assert not TrainConfig(protocol="paper", transductive=False).is_transductive
    with pytest.raises(ValueError, match="unknown protocol 'casual'; choose from paper, causal"):
        get_protocol("casual")
    with pytest.raises(ValueError, match="choose from paper, causal"):
        TrainConfig(protocol="casual")


def test_split_loss_is_per_token_or_the_mean_of_batch_means():
    sums, counts = [6.0, 1.0], [3, 1]  # batch means 2 and 1
    assert PROTOCOLS["causal"].split_loss(sums, counts) == 7 / 4
    assert PROTOCOLS["paper"].split_loss(sums, counts) == 1.5
