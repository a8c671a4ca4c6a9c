"""Bounding a request before it runs: prompts cut to the model's positions, a token budget, settings checked."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from chameleon_core.cli import main
from chameleon_core.data import alpaca_record
from chameleon_core.inference import (
    MAX_REQUEST_TOKENS,
    SAMPLE_TOP_K,
    InputError,
    RowSampler,
    Request,
    answer_stops,
    cut_answer,
    fit_prompts,
    generate,
    generate_rows,
    row_seeds,
    validate_prompts,
)

ROOT = Path(__file__).resolve().parents[1]
ALPACA = "Below is an instruction.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
LONG = " ".join(f"zq{i % 7}x" for i in range(400))  # 2,000 characters, over 1,000 tokens for the tiny tokenizer

from conftest import loaded_modules


def test_inference_imports_neither_training_nor_the_demo():
    """A user of a trained bundle gets inference without the trainer or the demo's backend."""
    loaded = loaded_modules("import chameleon_core.inference")
    assert "chameleon_core.inference" in loaded and loaded.isdisjoint({"chameleon_core.train", "chameleon_core.bundle_set"})


def test_a_long_prompt_keeps_its_end_and_its_template_fits(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    limit = model.config.max_position_embeddings - 16
    fitted = fit_prompts(model, tokenizer, [LONG], 16, ALPACA)
    [condition], [text] = fitted.conditions, fitted.texts
    assert LONG.endswith(condition) and len(condition) < len(LONG)
    assert text == ALPACA.format(prompt=condition)  # the template is kept whole; the prompt is what is cut
    assert limit - 2 <= len(tokenizer(text)["input_ids"]) <= limit
    assert fitted.cut == {1: len(tokenizer(condition)["input_ids"])}
    assert fitted.note() == (
        f"Prompts cut to fit the model's 512 positions with 16 new tokens (each keeps its end): "
        f"prompt 1 to its last {fitted.cut[1]} tokens."
    )


def test_prompts_that_fit_are_left_alone(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    fitted = fit_prompts(model, tokenizer, ["Whisk the butter.", "The striker scores."], 32, ALPACA)
    assert fitted.conditions == ["Whisk the butter.", "The striker scores."]
    assert fitted.cut == {} and fitted.note() is None
    longest = max(len(tokenizer(text)["input_ids"]) for text in fitted.texts)
    assert fitted.tokens == 2 * (longest + 32)  # padded to the longest row


def test_the_request_budget_names_the_count_and_what_to_reduce(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    prompts = [f"prompt {i}" for i in range(8)]
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    with pytest.raises(InputError, match=(
        rf"This request needs {8 * (longest + 128):,} tokens: 8 prompt\(s\) × \({longest} tokens of the longest prompt, "
        rf"template included, \+ 128 new tokens\).* The limit is {MAX_REQUEST_TOKENS} tokens per request: use fewer "
        "or shorter prompts, or fewer new tokens."
    )):
        fit_prompts(model, tokenizer, prompts, 128)


def test_a_template_longer_than_the_positions_is_refused(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    with pytest.raises(InputError, match="positions leave no room for prompt 1 in its template; lower Max new tokens"):
        fit_prompts(model, tokenizer, ["hello"], 8, "word " * 600 + "{prompt}")


def test_a_sampled_row_draws_the_same_whatever_its_batch_mates(tiny_gpt2, texts):
    model, tokenizer = tiny_gpt2
    seeds = row_seeds(2, True, 5)
    alone = generate(model, tokenizer, texts[:2], max_new_tokens=8, do_sample=True, seed=5)
    mixed = generate_rows(model, tokenizer, [texts[3], texts[1], texts[2], texts[0]], [None, seeds[1], None, seeds[0]],
                          max_new_tokens=8)
    assert [mixed[3], mixed[1]] == alone  # each row samples from its own stream, wherever it sits
    assert [mixed[0], mixed[2]] == generate(model, tokenizer, [texts[3], texts[2]], max_new_tokens=8)  # greedy rows stay greedy
    assert alone != generate(model, tokenizer, texts[:2], max_new_tokens=8, do_sample=True, seed=6)
    assert alone[0] != generate(model, tokenizer, [texts[0]], max_new_tokens=8)[0]


def test_the_row_sampler_draws_from_the_softmax_of_the_top_k():
    """Gumbel-max over the top 50 scores: the frequencies of their softmax, and never a token below them."""
    scores = torch.linspace(0.0, -1.0, SAMPLE_TOP_K + 14)[None]  # uncut, the last 14 would be drawn 14 % of the time
    draws = torch.tensor([int(RowSampler([seed])(torch.zeros(1, 1, dtype=torch.long), scores).argmax()) for seed in range(4000)])
    frequencies = torch.bincount(draws, minlength=scores.shape[1]) / len(draws)
    assert frequencies[SAMPLE_TOP_K:].sum() == 0
    assert torch.allclose(frequencies[:SAMPLE_TOP_K], scores[0, :SAMPLE_TOP_K].softmax(-1), atol=0.01)


@pytest.mark.parametrize(
    "text, hold, answer",
    [("Tea.\n\n### Instruction:\nMore", False, "Tea.\n"),  # the next heading ends the answer, unshown
     ("###\n\n###\n", False, ""),  # a heading right after the prompt's line break: the answer has ended at once
     ("\n###", False, ""),
     ("Use ### for headings.", False, "Use ### for headings."),  # not at a line start: part of the answer
     ("Tea.\n#", False, "Tea.\n#"),  # the end, the answer is what was written
     ("Tea.\n#", True, "Tea."),  # while streaming, a start of a heading is held back
     ("#", True, "")],
)
def test_an_answer_ends_at_the_templates_next_heading_which_is_never_shown(text, hold, answer):
    stops = answer_stops(ALPACA)
    assert stops == ("\n###",) and answer_stops("{prompt}") == ()
    assert cut_answer(text, stops, ALPACA.format(prompt="Make tea."), hold) == answer
    assert cut_answer("#", stops, "no line break", hold=True) == "#"  # no line start, so no heading begins


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "seeded"])
def test_streamed_answers_are_the_answers_and_a_row_that_ends_leaves_the_others_alone(tiny_gpt2, texts, do_sample):
    model, tokenizer = tiny_gpt2
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: varied answers, where the fresh model repeats one token
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    seeds = row_seeds(len(texts), do_sample, 3)
    free = generate_rows(model, tokenizer, texts, seeds, max_new_tokens=12)
    # A piece of one row's answer (after its start) that some other row's answer lacks: it ends the rows that
    # write it, there, and leaves the others alone.
    stop = next(row[i : i + 3] for row in free for i in range(1, len(row) - 2) if any(row[i : i + 3] not in o for o in free))
    stopped = generate_rows(model, tokenizer, texts, seeds, max_new_tokens=12, stops=(stop,))
    assert stopped == [text[: text.index(stop)] if stop in text else text for text in free]
    assert any(stop in text for text in free) and any(a == b for a, b in zip(stopped, free))
    pieces: dict[int, list[str]] = {}
    streamed = generate_rows(model, tokenizer, texts, seeds, max_new_tokens=12, stops=(stop,),
                             stream=lambda grew: [pieces.setdefault(row, []).append(text) for row, text in grew.items()])
    assert streamed == stopped
    assert sum(map(len, pieces.values())) > len(texts)  # in pieces, not once per row
    for row, grown in pieces.items():
        assert grown[-1] == stopped[row] and all(b.startswith(a) for a, b in zip(grown, grown[1:]))


def test_the_base_model_ends_the_haiku_where_its_answer_ends(smollm2):
    """SmolLM2 as released answers Alpaca's haiku prompt with nothing but new headings; they are never shown."""
    model, tokenizer = smollm2
    template = "### Instruction:\n{prompt}\n\n### Response:\n"  # the committed bundles' template
    prompt = [template.format(prompt="Write a haiku about autumn.")]
    assert "###" in generate(model, tokenizer, prompt, max_new_tokens=6)[0]
    assert "###" not in generate(model, tokenizer, prompt, max_new_tokens=6, stops=answer_stops(template))[0]


def test_generate_refuses_an_uncut_prompt_instead_of_indexing_past_the_positions(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    with pytest.raises(ValueError, match="overflow the model's 512 positions; cut the prompts with fit_prompts"):
        generate(model, tokenizer, [LONG], max_new_tokens=4)


@pytest.mark.parametrize(
    "raw, clean",
    [(("trained", 3, 32), ("trained", 3, 32, 0, False)),
     (("prompts", 3.0, 128.0, 4294967295.0, "sample"), ("prompts", 3, 128, 2**32 - 1, True)),  # JSON numbers
     (("trained", 1, 1, None), ("trained", 1, 1, 0, False))],  # an empty seed box
)
def test_settings_come_back_as_clean_ints(raw, clean):
    request = Request.parse(["hello"], *raw)
    assert request == (("hello",), *clean) and all(type(v) is int for v in request[2:5])


def test_the_generate_command_refuses_a_negative_seed_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "chameleon_core", "generate", "--bundle", str(tmp_path), "--prompt", "hi", "--seed", "-5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: Seed must be an integer from 0 to 2**32 - 1 (4,294,967,295); got -5."]


@pytest.mark.parametrize(
    "flags, message",
    [(["--seed", str(2**32)], "Seed must be an integer from 0 to 2**32 - 1 (4,294,967,295); got 4294967296."),
     (["--k", "0"], "k (clusters among the prompts) must be an integer from 1 to 32; got 0."),
     (["--max-new-tokens", "129"], "Max new tokens must be an integer from 1 to 128; got 129.")],
)
def test_the_generate_command_gives_the_apps_messages(tmp_path, capsys, flags, message):
    assert main(["generate", "--bundle", str(tmp_path), "--prompt", "hi", *flags]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]


def test_prompts_are_read_as_training_read_its_texts():
    """NFC, zero-width characters removed: on the page, through the API, in `generate` and in training alike."""
    typed = "Why is the café's sky blue?"
    variants = [unicodedata.normalize("NFD", typed), typed.replace(" ", "\u200b ").replace("W", "\ufeffW\u200d"),
                typed.replace("y", "y\u2060\u200c")]
    assert all(variant != typed for variant in variants)
    assert validate_prompts("\n".join(variants)) == [typed] * 3
    record = alpaca_record(variants[0], "", variants[1])
    assert record.condition == typed and record.response == typed
    with pytest.raises(InputError, match="the input is empty"):
        validate_prompts("\u200b\n\u200d \ufeff")
