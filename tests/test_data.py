"""Datasets as Records: WikiText folders, Alpaca JSON, the synthetic corpus, and seeded disjoint splits."""

import json
import math
from collections import Counter

import pytest

from chameleon_core import Record, load_alpaca, load_dataset_splits, load_synthetic, load_wikitext
from chameleon_core.data import (
    DOMAINS, GROUP_PROMPT, GROUPS, RESPONSE_MARKER, WORDS_PER_GROUP, alpaca_record, group_floors, group_records,
    group_vocabularies, load_groups, split_records,
)

VALID_ROWS = [f" Sentence number {i} of the validation file .\n" for i in range(30)]


@pytest.fixture
def wiki(tmp_path):
    """A WikiText-style folder without a train file; blank rows as the real files have them."""
    folder = tmp_path / "wikitext"
    folder.mkdir()
    (folder / "wiki.valid.raw").write_text(" \n" + " \n".join(VALID_ROWS) + "\n\n", encoding="utf-8")
    (folder / "wiki.test.raw").write_text(" \n = Heading = \n \n Test body .\n", encoding="utf-8")
    return folder


def texts(records: list[Record]) -> set[str]:
    return {r.text for r in records}


def test_wikitext_folder_drops_blank_rows_and_resplits_validation(wiki):
    splits = load_wikitext(wiki)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [27, 3, 2]
    assert all(r.text.strip() for records in splits.values() for r in records)
    assert texts(splits["train"]) | texts(splits["validation"]) == set(VALID_ROWS)
    assert not texts(splits["train"]) & texts(splits["validation"])
    assert [r.text for r in splits["test"]] == [" = Heading = \n", " Test body .\n"]
    assert all(r.prompt == "" and r.condition == r.response for r in splits["test"])


def test_wikitext_resplit_is_seeded(wiki):
    first, again, other = load_wikitext(wiki, seed=1), load_wikitext(wiki, seed=1), load_wikitext(wiki, seed=2)
    assert first == again
    assert texts(first["validation"]) != texts(other["validation"])


def test_wikitext_train_file_is_used_when_present(wiki):
    (wiki / "wiki.train.raw").write_text(" Train row .\n \n", encoding="utf-8")
    splits = load_wikitext(wiki)
    assert [r.text for r in splits["train"]] == [" Train row .\n"]
    assert [r.text for r in splits["validation"]] == VALID_ROWS


def test_wikitext_missing_folder_or_file_names_the_path(tmp_path, wiki):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_wikitext(tmp_path / "nowhere")
    (wiki / "wiki.test.raw").unlink()
    with pytest.raises(FileNotFoundError, match=f"{wiki} has no wiki.test.raw"):
        load_wikitext(wiki)


def test_alpaca_template_with_and_without_input():
    plain = alpaca_record(" Name a colour. ", "", " Blue. ")
    assert plain.prompt == f"### Instruction:\nName a colour.\n\n{RESPONSE_MARKER}"
    assert (plain.response, plain.condition, plain.text) == ("Blue.", "Name a colour.", plain.prompt + "Blue.")
    with_input = alpaca_record("Translate.", "chat", "cat")
    assert with_input.prompt == f"### Instruction:\nTranslate.\n\n### Input:\nchat\n\n{RESPONSE_MARKER}"
    assert with_input.condition == "Translate.\nchat"


def write_alpaca(path, rows) -> str:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def alpaca_rows(n: int = 40) -> list[dict]:
    return [
        {"instruction": f"Task {i}", "input": f"input {i}" if i % 3 else "", "output": f"ANSWER-{i}"} for i in range(n)
    ]


def test_alpaca_json_splits_disjoint_and_conditions_never_hold_the_answer(tmp_path):
    splits = load_alpaca(write_alpaca(tmp_path / "a.json", alpaca_rows()), seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (36, 4)
    assert not texts(splits["train"]) & texts(splits["validation"])
    records = splits["train"] + splits["validation"]
    assert all(r.response.startswith("ANSWER") for r in records)
    assert not any("ANSWER" in r.condition or "ANSWER" in r.prompt for r in records)
    assert load_alpaca(tmp_path / "a.json", seed=0) == splits
    assert load_alpaca(tmp_path / "a.json", seed=1) != splits
    assert load_dataset_splits("alpaca", tmp_path) == splits  # a folder: its .json file


def test_alpaca_bad_files_raise(tmp_path):
    with pytest.raises(ValueError, match="must hold a JSON list"):
        load_alpaca(write_alpaca(tmp_path / "dict.json", {"instruction": "x", "output": "y"}))
    rows = alpaca_rows(5)
    del rows[3]["output"]
    with pytest.raises(ValueError, match="record 3 lacks one"):
        load_alpaca(write_alpaca(tmp_path / "missing.json", rows))
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        load_alpaca(tmp_path / "absent.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no Alpaca .json file"):
        load_dataset_splits("alpaca", empty)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([1, 2, 3], "record 0 of .* is 1, not an object: Alpaca records must be JSON objects"),
        ([{"instruction": "x", "output": "y"}, {"instruction": None, "output": "z"}],
         "field 'instruction' of record 1 of .* must be a string, got null"),
        ([{"instruction": "x", "input": ["a"], "output": "y"}], "field 'input' of record 0 of .* must be a string"),
    ],
    ids=["not-objects", "null-instruction", "list-input"],
)
def test_alpaca_records_of_the_wrong_shape_are_named(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_alpaca(write_alpaca(tmp_path / "bad.json", rows))


def test_malformed_alpaca_json_names_the_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x",\n  "output": }]', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path} is not valid JSON: Expecting value \\(line 2 column 13\\)$"):
        load_dataset_splits("alpaca", path)


def test_split_rejects_impossible_fractions():
    records = [Record("", str(i), str(i)) for i in range(3)]
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        split_records(records, 1.0, 0)
    with pytest.raises(ValueError, match="cannot split 3 records"):
        split_records(records, 0.1, 0)


def test_split_drops_duplicates_so_no_text_is_on_both_sides():
    records = [Record("", str(i % 10), str(i % 10)) for i in range(100)]
    train, held = split_records(records, 0.5, 0)
    assert len(train) == len(held) == 5 and not texts(train) & texts(held)


def test_synthetic_corpus_has_six_domains_and_is_deterministic():
    splits = load_synthetic(n_per_domain=20)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [96, 12, 12]
    everything = [r for records in splits.values() for r in records]
    assert {r.label for r in everything} == set(DOMAINS) and len(DOMAINS) == 6
    assert len(texts(everything)) == 120
    assert load_synthetic(n_per_domain=20) == splits and load_synthetic(n_per_domain=20, seed=1) != splits
    instructions = load_synthetic(n_per_domain=5, instructions=True)["train"]
    assert all(r.prompt.endswith(RESPONSE_MARKER) and r.response not in r.condition for r in instructions)


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
        load_dataset_splits("imdb")


def test_real_wikitext_counts(data_dir):
    folder = data_dir / "wikitext-2-raw"
    lines = (folder / "wiki.valid.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [line for line in lines if line.strip()]
    assert (len(lines), len(rows), len(set(rows))) == (3760, 2461, 2361)  # 100 repeated rows (e.g. headings)
    splits = load_dataset_splits("wikitext", folder)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (2125, 236, 2891)
    assert texts(splits["train"]) | texts(splits["validation"]) == set(rows)
    assert not texts(splits["train"]) & texts(splits["validation"])


def test_real_alpaca_counts(data_dir):
    splits = load_dataset_splits("alpaca", data_dir / "alpaca")
    assert (len(splits["train"]), len(splits["validation"])) == (4500, 500)  # 5,000 distinct records
    assert not texts(splits["train"]) & texts(splits["validation"])
    assert sum("### Input:" in r.prompt for r in splits["train"] + splits["validation"]) == 1943


def test_positive_control_puts_the_group_in_the_condition_and_not_in_the_models_input():
    vocabularies = group_vocabularies()
    group_of = {word: g for g, words in enumerate(vocabularies) for word in words}
    assert len(group_of) == GROUPS * WORDS_PER_GROUP  # disjoint vocabularies
    records = group_records()
    assert {r.prompt for r in records} == {GROUP_PROMPT}  # the model's input is the same for every row
    for r in records:
        g = int(r.label.removeprefix("group"))
        assert {group_of[w] for w in r.condition.split()} == {g}  # the condition names the group, alone
        assert group_of[r.response] == g
        assert not set(r.condition.split()) & set(r.prompt.split())
    # the groups are about equally frequent, and the data is seeded
    counts = [sum(r.label == f"group{g}" for r in records) for g in range(GROUPS)]
    assert min(counts) > len(records) / GROUPS * 0.8
    assert group_records() == records and group_records(seed=1) != records


def test_positive_control_floors_are_the_entropies_a_predictor_with_and_without_the_condition_reaches():
    floors = group_floors()
    assert floors == pytest.approx({"without condition": math.log(128), "with condition": math.log(16)})
    test = load_groups()["test"]
    vocabularies = group_vocabularies()
    union = Counter(r.response for r in load_groups()["train"])
    total = sum(union.values())
    without = -sum(math.log(union[r.response] / total) for r in test) / len(test)  # the best constant guess, fitted
    with_ = -sum(math.log(1 / len(vocabularies[int(r.label.removeprefix('group'))])) for r in test) / len(test)
    assert with_ == pytest.approx(floors["with condition"])
    assert without == pytest.approx(floors["without condition"], abs=0.1)


def test_positive_control_splits_are_disjoint_and_validation_comes_from_the_training_rows():
    splits = load_dataset_splits("groups")
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1836, 204, 360]
    assert not set(splits["train"]) & set(splits["validation"]) and not set(splits["train"]) & set(splits["test"])


def test_hidden_alpaca_holds_the_same_records_with_the_instruction_only_as_condition(tmp_path):
    path = tmp_path / "alpaca.json"
    rows = [{"instruction": f"Name fruit number {i}.", "input": "in a list" if i % 2 else "", "output": f"Fruit {i}."}
            for i in range(20)]
    path.write_text(json.dumps(rows))
    visible, hidden = load_dataset_splits("alpaca", path), load_dataset_splits("alpaca-hidden", path)
    for split in ("train", "validation"):
        assert [(r.response, r.condition) for r in hidden[split]] == [(r.response, r.condition) for r in visible[split]]
        assert {r.prompt for r in hidden[split]} == {RESPONSE_MARKER}
        assert all("fruit number" not in r.prompt and "fruit number" in v.prompt
                   for r, v in zip(hidden[split], visible[split]))


def test_one_token_vocabularies_are_disjoint_real_words_of_one_token_each():
    from chameleon_core.data import token_vocabularies
    from chameleon_core.models import load_model

    _, tokenizer = load_model("random:tiny-gpt2")
    vocabularies = token_vocabularies(tokenizer, groups=4, words=8)
    words = [w for group in vocabularies for w in group]
    assert [len(group) for group in vocabularies] == [8] * 4 and len(set(words)) == 32
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 and w.isalpha() for w in words)
    assert token_vocabularies(tokenizer, groups=4, words=8) == vocabularies  # seeded
    records = group_records(n=200, vocabularies=vocabularies)
    group_of = {word: g for g, group in enumerate(vocabularies) for word in group}
    assert all(group_of[r.response] == int(r.label.removeprefix("group")) for r in records)
    assert all({group_of[w] for w in r.condition.split()} == {group_of[r.response]} for r in records)
    with pytest.raises(ValueError, match="one-token words"):
        token_vocabularies(tokenizer, groups=10_000, words=16)
