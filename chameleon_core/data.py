"""Datasets as lists of :class:`Record`: WikiText-2, Alpaca, a synthetic multi-domain corpus and a positive control.

Every record says what the model reads (``prompt + response``), what is scored (``response``)
and what is known at inference time to condition on (``condition``).
"""

from __future__ import annotations

import json
import math
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("wikitext", "alpaca", "alpaca-hidden", "synthetic", "groups")
INSTRUCTION_DATASETS = ("alpaca", "alpaca-hidden", "groups")  # a prompt is read, the condition is its own text
ALPACA_HUB_IDS = ("yahma/alpaca-cleaned", "tatsu-lab/alpaca")
RESPONSE_MARKER = "### Response:\n"
# Invisible characters that make text which looks the same tokenize differently: zero-width space,
# non-joiner and joiner, word joiner, byte-order mark.
ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def normalize_text(text: str) -> str:
    """Text as every model here reads it, in training and at inference alike: Unicode NFC, zero-width
    characters removed. The same-looking text (composed or decomposed accents, a pasted zero-width
    joiner) then lands in the same cluster and gets the same answer."""
    return unicodedata.normalize("NFC", text).translate(ZERO_WIDTH)


@dataclass(frozen=True)
class Record:
    prompt: str  # read but never scored (Alpaca: the template up to the response marker)
    response: str  # the scored text
    condition: str  # what a deployed model knows before answering: embedded to cluster and condition
    label: str = ""  # domain of a synthetic record, for checking clusters

    @property
    def text(self) -> str:
        return self.prompt + self.response


# ---------------------------------------------------------------- WikiText-2
def _wikitext_rows(lines: list[str]) -> list[Record]:
    """Keep non-blank rows, as the hub's ``len(text.strip()) > 0`` filter does."""
    return [Record("", text, text) for text in map(normalize_text, lines) if text.strip()]


def load_wikitext(data_dir: str | Path | None = None, seed: int = 0) -> dict[str, list[Record]]:
    """WikiText-2 raw: from the hub, or from a folder holding ``wiki.{train,valid,test}.raw``.

    A folder without ``wiki.train.raw`` is re-split, seeded: train = 90 % of the valid rows,
    validation = the other 10 %, test = the test file. Nothing is shared between splits.
    """
    if data_dir is None:
        from datasets import load_dataset

        hub = load_dataset("wikitext", "wikitext-2-raw-v1")
        return {split: _wikitext_rows(list(hub[split]["text"])) for split in ("train", "validation", "test")}
    folder = _folder(data_dir)
    read = lambda name: _wikitext_rows((folder / name).read_text(encoding="utf-8").splitlines(keepends=True))  # noqa: E731
    for needed in ("wiki.valid.raw", "wiki.test.raw"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder} has no {needed} (expected wiki.{{train,valid,test}}.raw)")
    if (folder / "wiki.train.raw").is_file():
        return {"train": read("wiki.train.raw"), "validation": read("wiki.valid.raw"), "test": read("wiki.test.raw")}
    train, validation = split_records(read("wiki.valid.raw"), 0.1, seed)
    return {"train": train, "validation": validation, "test": read("wiki.test.raw")}


# ---------------------------------------------------------------- Alpaca
def alpaca_record(instruction: str, input: str, output: str) -> Record:
    """The published template; the condition is the instruction (+ input), never the answer."""
    instruction, input, output = (normalize_text(text).strip() for text in (instruction, input, output))
    if input:
        prompt = f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n{RESPONSE_MARKER}"
        condition = f"{instruction}\n{input}"
    else:
        prompt = f"### Instruction:\n{instruction}\n\n{RESPONSE_MARKER}"
        condition = instruction
    return Record(prompt, output, condition)


def load_alpaca(
    source: str | Path = ALPACA_HUB_IDS[0], seed: int = 0, validation_fraction: float = 0.1, hidden: bool = False
) -> dict[str, list[Record]]:
    """Alpaca from a hub id or a local JSON list, split seeded into disjoint train / validation
    (the same split with ``hidden``, see :func:`alpaca_record_hidden`)."""
    if Path(source).expanduser().is_file():
        rows = _read_json(Path(source).expanduser())
        if not isinstance(rows, list):
            raise ValueError(f"{source} must hold a JSON list of {{instruction, input, output}} records")
    elif str(source).endswith(".json"):
        raise FileNotFoundError(f"Alpaca file {source} does not exist")
    else:
        from datasets import load_dataset

        rows = list(load_dataset(str(source), split="train"))
    for i, row in enumerate(rows):
        _check_alpaca_row(source, i, row)
    records = [alpaca_record(row["instruction"], row.get("input", ""), row["output"]) for row in rows]
    train, validation = split_records(records, validation_fraction, seed)
    if hidden:  # split first, so that both variants hold the same records in the same order
        train, validation = ([alpaca_record_hidden(r) for r in part] for part in (train, validation))
    return {"train": train, "validation": validation}


def alpaca_record_hidden(record: Record) -> Record:
    """``record`` with its instruction hidden from the model's input: the model reads the response marker alone
    and the instruction (+ input) is only the condition. The hidden-condition control: what the condition
    tells, the context cannot."""
    return Record(RESPONSE_MARKER, record.response, record.condition)


def _read_json(path: Path):
    """A JSON file's content; a malformed file is named with where it breaks."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})") from None


def _check_alpaca_row(source: str | Path, index: int, row) -> None:
    """Each record is an object with string fields; says which record and field is wrong."""
    if not isinstance(row, dict):
        raise ValueError(
            f"record {index} of {source} is {json.dumps(row, default=str)[:60]}, not an object: Alpaca records must be "
            "JSON objects with 'instruction', 'output' and optionally 'input' string fields"
        )
    for key in ("instruction", "output"):
        if key not in row:
            raise ValueError(f"Alpaca records need 'instruction' and 'output' fields; record {index} lacks one ({key!r}) in {source}")
    for key in ("instruction", "input", "output"):
        if key in row and not isinstance(row[key], str):
            raise ValueError(
                f"field {key!r} of record {index} of {source} must be a string, got {json.dumps(row[key], default=str)[:60]}"
            )


# ---------------------------------------------------------------- synthetic corpus
DOMAINS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "noun": ["oven", "dough", "sauce", "onion", "garlic", "butter", "skillet", "broth", "pastry", "basil"],
        "verb": ["whisk", "simmer", "knead", "roast", "chop", "season", "bake", "stir", "braise", "fold"],
        "adj": ["golden", "crispy", "tender", "savory", "fragrant", "creamy", "smoky", "tangy"],
    },
    "astronomy": {
        "noun": ["galaxy", "nebula", "telescope", "comet", "orbit", "pulsar", "quasar", "asteroid", "planet", "star"],
        "verb": ["observe", "detect", "measure", "track", "map", "survey", "image", "orbit", "model", "chart"],
        "adj": ["distant", "luminous", "massive", "infrared", "spiral", "faint", "binary", "stellar"],
    },
    "finance": {
        "noun": ["bond", "equity", "dividend", "portfolio", "ledger", "interest", "loan", "asset", "market", "budget"],
        "verb": ["invest", "hedge", "audit", "borrow", "trade", "price", "allocate", "refinance", "insure", "tax"],
        "adj": ["volatile", "liquid", "fiscal", "quarterly", "leveraged", "taxable", "annual", "secured"],
    },
    "football": {
        "noun": ["striker", "goal", "midfield", "referee", "penalty", "stadium", "keeper", "match", "league", "corner"],
        "verb": ["score", "tackle", "dribble", "pass", "defend", "shoot", "cross", "press", "head", "save"],
        "adj": ["offside", "decisive", "rapid", "aerial", "unbeaten", "home", "late", "clinical"],
    },
    "programming": {
        "noun": ["function", "compiler", "variable", "loop", "pointer", "module", "thread", "array", "server", "query"],
        "verb": ["compile", "debug", "refactor", "deploy", "parse", "allocate", "iterate", "cache", "test", "import"],
        "adj": ["recursive", "static", "async", "immutable", "generic", "nested", "typed", "concurrent"],
    },
    "medicine": {
        "noun": ["patient", "vaccine", "symptom", "surgeon", "dose", "clinic", "tissue", "nerve", "fever", "therapy"],
        "verb": ["diagnose", "treat", "prescribe", "monitor", "examine", "operate", "heal", "screen", "inject", "relieve"],
        "adj": ["chronic", "acute", "clinical", "sterile", "cardiac", "viral", "benign", "renal"],
    },
}
_SENTENCES = [
    "The {adj} {noun} helps you {verb} the {noun2}.",
    "First {verb} the {noun}, then {verb2} the {adj} {noun2}.",
    "Every {noun} needs a {adj} {noun2} before you {verb} it.",
    "Experts {verb} the {noun} when the {noun2} is {adj}.",
    "A {adj} {noun} can {verb} a {adj2} {noun2}.",
]
_INSTRUCTIONS = [
    "Explain how to {verb} the {noun}.",
    "Describe a {adj} {noun} in two sentences.",
    "Why would someone {verb} a {noun}?",
    "Give advice about the {adj} {noun2}.",
]


def _sentence(rng: random.Random, words: dict[str, list[str]], template: str) -> str:
    pick = {k: rng.choice(words[k.rstrip("2")]) for k in ("noun", "noun2", "verb", "verb2", "adj", "adj2")}
    return template.format(**pick)


def synthetic_records(n_per_domain: int = 200, seed: int = 0, instructions: bool = False) -> list[Record]:
    """Short documents (or instruction/response pairs) from six clearly different domains."""
    rng = random.Random(seed)
    records = []
    for domain, words in DOMAINS.items():
        for _ in range(n_per_domain):
            body = " ".join(_sentence(rng, words, rng.choice(_SENTENCES)) for _ in range(rng.randint(4, 8)))
            if instructions:
                record = alpaca_record(_sentence(rng, words, rng.choice(_INSTRUCTIONS)), "", body)
                records.append(Record(record.prompt, record.response, record.condition, domain))
            else:
                records.append(Record("", body, body, domain))
    rng.shuffle(records)
    return records


def synthetic_texts(n_per_domain: int = 200, seed: int = 0) -> list[str]:
    return [r.text for r in synthetic_records(n_per_domain, seed)]


def load_synthetic(n_per_domain: int = 200, seed: int = 0, instructions: bool = False) -> dict[str, list[Record]]:
    records = synthetic_records(n_per_domain, seed, instructions)
    train, rest = split_records(records, 0.2, seed)
    validation, test = split_records(rest, 0.5, seed)
    return {"train": train, "validation": validation, "test": test}


# ---------------------------------------------------------------- positive control
GROUPS, WORDS_PER_GROUP, CONDITION_WORDS = 8, 16, 8
GROUP_PROMPT = "Word: "  # the same for every row: the model's input says nothing about the group
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def group_vocabularies(groups: int = GROUPS, words: int = WORDS_PER_GROUP, seed: int = 0) -> list[list[str]]:
    """``groups`` disjoint lists of ``words`` made-up words each (seeded)."""
    rng = random.Random(seed)
    made: dict[str, None] = {}
    while len(made) < groups * words:
        made["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))] = None
    pool = list(made)
    return [pool[g * words:(g + 1) * words] for g in range(groups)]


def token_vocabularies(tokenizer, groups: int = GROUPS, words: int = WORDS_PER_GROUP, seed: int = 0) -> list[list[str]]:
    """Like :func:`group_vocabularies`, from lowercase alphabetic strings that ``tokenizer`` writes as one
    token each (seeded).

    With them a row's scored text is one token and the end of text, so the head alone decides the whole
    loss: the positive control becomes a task a head-only adapter can learn in seconds.
    """
    single = sorted({word for word in (tokenizer.decode([i]).strip() for i in range(len(tokenizer)))
                     if word.isascii() and word.isalpha() and word.islower() and len(word) >= 3
                     and len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1})
    if len(single) < groups * words:
        raise ValueError(f"the tokenizer has {len(single)} one-token words; {groups} groups of {words} need {groups * words}")
    random.Random(seed).shuffle(single)
    return [single[g * words:(g + 1) * words] for g in range(groups)]


def group_records(n: int = 2400, seed: int = 0, groups: int = GROUPS, words: int = WORDS_PER_GROUP,
                  condition_words: int = CONDITION_WORDS, vocabularies: list[list[str]] | None = None) -> list[Record]:
    """The positive control: a task in which only the condition tells what will be scored.

    Each row belongs to one of ``groups`` latent groups (uniform), each with its own vocabulary. The
    model reads :data:`GROUP_PROMPT`, the same for every row; the scored response is one word drawn
    uniformly from the group's vocabulary; the condition is ``condition_words`` words of that group
    drawn independently of the response. Whatever can be known about the group is in the condition.
    ``vocabularies``: the groups' words (default: made-up ones, :func:`group_vocabularies`).
    """
    vocabularies = vocabularies or group_vocabularies(groups, words, seed)
    groups = len(vocabularies)
    rng = random.Random(seed + 1)
    records = []
    for _ in range(n):
        g = rng.randrange(groups)
        condition = " ".join(rng.choices(vocabularies[g], k=condition_words))
        records.append(Record(GROUP_PROMPT, rng.choice(vocabularies[g]), condition, f"group{g}"))
    return records


def group_floors(groups: int = GROUPS, words: int = WORDS_PER_GROUP) -> dict[str, float]:
    """The lowest expected loss per row (nats) on :func:`group_records`.

    Tokenization is injective, so the scored tokens of a row (its word, then end of text, which the word
    determines) carry exactly the word's entropy: ``log(groups * words)`` for any predictor that cannot
    tell the group (a constant head, any head given no condition), ``log(words)`` for one that can.
    """
    return {"without condition": math.log(groups * words), "with condition": math.log(words)}


def load_groups(seed: int = 0) -> dict[str, list[Record]]:
    """Train / validation / test of the positive control; validation is carved from the training rows
    (the same distribution), to stop training when it no longer improves; test reports."""
    train, test = split_records(group_records(seed=seed), 0.15, seed)
    train, validation = split_records(train, 0.1, seed)
    return {"train": train, "validation": validation, "test": test}


# ---------------------------------------------------------------- splits
def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded disjoint split; exact duplicates are dropped first so no text sits on both sides."""
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    unique = list(dict.fromkeys(records))
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    cut = round(len(unique) * fraction)
    if cut == 0 or cut == len(unique):
        raise ValueError(f"cannot split {len(unique)} records with fraction {fraction}")
    held = set(order[:cut])
    return [r for i, r in enumerate(unique) if i not in held], [r for i, r in enumerate(unique) if i in held]


def load_dataset_splits(name: str, data_dir: str | Path | None = None, seed: int = 0) -> dict[str, list[Record]]:
    """One entry point for the CLI: one of :data:`DATASETS` (``alpaca-hidden``: :func:`alpaca_record_hidden`;
    ``groups``: the positive control, :func:`group_records`)."""
    if name == "wikitext":
        return load_wikitext(data_dir, seed)
    if name in ("alpaca", "alpaca-hidden"):
        hidden = name == "alpaca-hidden"
        if data_dir is None:
            return load_alpaca(seed=seed, hidden=hidden)
        path = Path(data_dir).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise FileNotFoundError(f"{path} holds no Alpaca .json file")
            path = found[0]
        return load_alpaca(path, seed=seed, hidden=hidden)
    if name == "synthetic":
        return load_synthetic(seed=seed)
    if name == "groups":
        return load_groups(seed=seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def _folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    return folder
