"""Inference with a trained bundle: what any user of one needs, and nothing that trains.

New prompts are checked and cut to the model's positions, embedded exactly as training conditioned
(the bundle's ``metadata["embedding"]``), assigned to the trained centroids (or clustered among
themselves), and every cluster's prompts run through ChameleonLLM with the adapter generated for
that cluster, a mixed batch in one pass. Each sampled row draws from its own seeded stream, so rows
of several requests can share a batch and still answer as they would alone. The demo's backend
(:mod:`.bundle_set`) and its scheduler (:mod:`.serving`) build on this module; importing it loads neither
the demo nor training.
"""

from __future__ import annotations

import copy
import re
import reprlib
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TopKLogitsWarper,
)

from .bundle import Bundle, BundleError
from .clustering import fit_clusters
from .data import normalize_text
from .embeddings import embed_texts
from .hyper_head import condition_groups, conditioned, hyper_head

MAX_PROMPTS = 32
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 128
# Tokens one request may cost: prompts x (longest templated prompt + new tokens), since every batch is
# left-padded to its longest row. Generation dominates: each new token is one step of every model for
# the whole batch. Measured with SmolLM2 on 2 CPU cores (three models, adapter summary included): four
# Alpaca-template prompts with 128 new tokens (604 tokens) take 34 s, one with 128 takes 8 s, eight with
# 64 (696 tokens) 18 s. 640 lets the page's four-prompt examples run at the full 128 new tokens while no
# request holds the models much beyond half a minute.
MAX_REQUEST_TOKENS = 640
MAX_SEED = 2**32 - 1  # k-means and NumPy take 32-bit seeds
DECODINGS = ("greedy", "sample")
CLUSTER_SOURCES = ("trained", "prompts")  # assign prompts to the trained clusters, or run k-means on the prompts themselves
SAMPLE_TOP_K = 50  # sampling draws from the 50 likeliest tokens at temperature 1, as transformers does by default
# A prompt template that heads its sections with this at a line start (Alpaca's `### Instruction:` ... `### Response:`)
# ends an answer where the model starts a new heading.
SECTION_HEADING = "\n###"


# ---------------------------------------------------------------- prompts and settings
class InputError(ValueError):
    """Input a user can fix (the message names the field and what is allowed), as opposed to a bug."""


def validate_prompts(text: object) -> list[str]:
    """One prompt per line, normalised as training read its texts (:func:`~.data.normalize_text`: NFC, no
    zero-width characters), stripped, blank lines dropped; an :class:`InputError` says what is wrong."""
    if text is not None and not isinstance(text, str):
        raise InputError(f"Prompts must be text, one prompt per line; got {type(text).__name__} {reprlib.repr(text)}.")
    lines = [line for line in re.split(r"\r\n|\r|\n", text or "") if line.strip()]
    for number, line in enumerate(lines, start=1):
        bad = next((c for c in line if c != "\t" and unicodedata.category(c) in ("Cc", "Cs")), None)
        if bad is not None and unicodedata.category(bad) == "Cs":
            raise InputError(
                f"Prompt {number} contains U+{ord(bad):04X}, half of a UTF-16 surrogate pair, which is no character on "
                "its own; send the text as valid Unicode (the pair complete, or UTF-8)."
            )
        if bad is not None:
            raise InputError(
                f"Prompt {number} contains the control character U+{ord(bad):04X}; remove it "
                "(only tabs and line breaks are allowed)."
            )
    prompts = [prompt for prompt in (normalize_text(line).strip() for line in lines) if prompt]
    if not prompts:
        raise InputError("Enter at least one prompt (one per line); the input is empty.")
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"{len(prompts)} prompts given; at most {MAX_PROMPTS} fit in one batch (one per line).")
    for number, prompt in enumerate(prompts, start=1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"Prompt {number} is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}.")
    return prompts


class Request(NamedTuple):
    """One comparison's prompts and settings, checked once (:meth:`parse`) and passed whole from the page,
    the command line and the scheduler to generation."""

    prompts: tuple[str, ...]
    cluster_source: str  # one of CLUSTER_SOURCES: whose centroids the prompts are assigned to
    k: int  # cluster count among the prompts (cluster source "prompts")
    max_new_tokens: int
    seed: int
    do_sample: bool

    @classmethod
    def parse(
        cls, prompts: Sequence[str], cluster_source: object = "trained", k: object = 3, max_new_tokens: object = 32,
        seed: object = 0, decoding: object = "greedy",
    ) -> Request:
        """Raw values (JSON from the API, or the command line) checked in one place, so both give the same messages.

        Integers may arrive as whole floats (JSON numbers); strings, booleans and fractions are refused
        rather than guessed at. An empty seed (``None``) means 0. An :class:`InputError` says what to change.
        """
        if not prompts:
            raise InputError("Enter at least one prompt; the request has none.")
        if cluster_source not in CLUSTER_SOURCES:
            raise InputError(f"Cluster source must be one of {_choices(CLUSTER_SOURCES)}; got {reprlib.repr(cluster_source)}.")
        if decoding not in DECODINGS:
            raise InputError(f"Decoding must be one of {_choices(DECODINGS)}; got {reprlib.repr(decoding)}.")
        return cls(
            tuple(prompts),
            cluster_source,
            _integer("k (clusters among the prompts)", k, 1, MAX_PROMPTS),
            _integer("Max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS),
            _integer("Seed", 0 if seed is None else seed, 0, MAX_SEED, "2**32 - 1 (4,294,967,295)"),
            decoding == "sample",
        )


def _choices(values: tuple[str, ...]) -> str:
    return " or ".join(map(repr, values))


def _integer(name: str, value: object, low: int, high: int, high_text: str | None = None) -> int:
    """``value`` as an int in ``[low, high]``, or an :class:`InputError` naming the field and its range."""
    number = int(value) if isinstance(value, float) and value.is_integer() else value  # is_integer: False for inf, nan
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise InputError(f"{name} must be an integer from {low} to {high_text or high}; got {reprlib.repr(value)}.")
    return number


# ---------------------------------------------------------------- embedding, clusters, generation
def embed_prompts(bundle: Bundle, prompts: list[str]) -> torch.Tensor:
    """(N, d) conditioning embeddings, made with the settings the bundle was trained with.

    ``prompts`` are the conditions, cut by :func:`fit_prompts` when they have to be, so the
    embedding reads the same text as the generations.
    """
    return embed_texts(bundle.model, bundle.tokenizer, prompts, **bundle.metadata.get("embedding", {}))


@dataclass
class Assignment:
    labels: torch.Tensor  # (N,) cluster of each prompt
    distances: torch.Tensor  # (N,) Euclidean distance to that cluster's centroid
    centroids: torch.Tensor  # (k, d) the centroids ``labels`` index
    source: str  # one of CLUSTER_SOURCES: whose centroids these are


def assign(bundle: Bundle, embeddings: torch.Tensor, source: str = "trained", k: int = 3, seed: int = 0) -> Assignment:
    """Nearest trained centroid, or seeded k-means among the prompts (``k`` capped at their number)."""
    if source == "trained":
        if bundle.clusters is None:
            raise BundleError("this bundle holds no trained clusters; use the cluster source 'prompts' (k-means on the prompts)")
        fitted = bundle.clusters
    elif source == "prompts":
        fitted, _ = fit_clusters(embeddings, k=min(k, len(embeddings)), seed=seed)
    else:
        raise ValueError(f"unknown cluster source {source!r}; choose from {CLUSTER_SOURCES}")
    labels, distances = fitted.assign(embeddings)
    return Assignment(labels, distances, fitted.centroids, source)


def _positions(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _check_fits(model: PreTrainedModel, width: int, max_new_tokens: int = 0) -> None:
    """A guard for direct callers: prompts are cut in one place, :func:`fit_prompts`, never silently here."""
    positions = _positions(model)
    if positions is not None and width + max_new_tokens > positions:
        raise ValueError(f"a prompt of {width} tokens and {max_new_tokens} new tokens overflow the model's "
                         f"{positions} positions; cut the prompts with fit_prompts first")


def _token_count(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = True) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass
class FittedPrompts:
    """A request's prompts cut to the model's positions; embedding, generation and summary all read these."""

    conditions: list[str]  # each prompt, or the end of it that fits: what is embedded
    texts: list[str]  # the conditions in the bundle's prompt template: what the models read
    lengths: list[int]  # tokens of each text
    cut: dict[int, int]  # 1-based number of each prompt that was cut -> its tokens kept
    positions: int | None  # the model's positions (None: unbounded)
    max_new_tokens: int
    tokens: int  # what the request costs: prompts x (longest text + new tokens), padding included

    def note(self) -> str | None:
        """The line the page and the command line show about cut prompts; None when none was cut."""
        if not self.cut:
            return None
        each = ", ".join(f"prompt {number} to its last {kept:,} tokens" for number, kept in self.cut.items())
        return (f"Prompts cut to fit the model's {self.positions:,} positions with {self.max_new_tokens} new tokens "
                f"(each keeps its end): {each}.")


def fit_prompts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
    template: str = "{prompt}",
) -> FittedPrompts:
    """Cut each prompt that overflows the positions left after the new tokens, then check the request's budget.

    The cut keeps a prompt's end (the part the continuation follows) and is made in the raw prompt,
    not the template, so the condition that is embedded stays exactly the prompt part of what the
    models read. The cut bounds one prompt; :data:`MAX_REQUEST_TOKENS` bounds the whole request.
    """
    positions = _positions(model)
    limit = None if positions is None else positions - max_new_tokens
    conditions, cut = list(prompts), {}
    lengths = [len(ids) for ids in tokenizer([template.format(prompt=p) for p in prompts])["input_ids"]]
    for i, prompt in enumerate(prompts):
        if limit is None or lengths[i] <= limit:
            continue
        fitted = _keep_end(tokenizer, prompt, template, limit)
        if fitted is None:
            raise InputError(f"With {max_new_tokens} new tokens the model's {positions:,} positions leave no room for "
                             f"prompt {i + 1} in its template; lower Max new tokens.")
        conditions[i], lengths[i] = fitted
        cut[i + 1] = _token_count(tokenizer, conditions[i], special=False)
    longest = max(lengths, default=0)
    tokens = len(prompts) * (longest + max_new_tokens)
    if tokens > MAX_REQUEST_TOKENS:
        raise InputError(
            f"This request needs {tokens:,} tokens: {len(prompts)} prompt(s) × ({longest:,} tokens of the longest "
            f"prompt, template included, + {max_new_tokens} new tokens), as every prompt is padded to the longest. "
            f"The limit is {MAX_REQUEST_TOKENS:,} tokens per request: use fewer or shorter prompts, or fewer new tokens."
        )
    texts = [template.format(prompt=condition) for condition in conditions]
    return FittedPrompts(conditions, texts, lengths, cut, positions, max_new_tokens, tokens)


def _keep_end(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str, limit: int) -> tuple[str, int] | None:
    """The longest end of ``prompt`` whose templated text fits ``limit`` tokens, with that length; None if none does.

    The end starts at a token boundary of the prompt (its character offset, so the text is the
    user's own, never a decoded fragment). Tokens can merge differently at the new start, so the
    length is measured again and the end shortened by any overshoot.
    """
    starts = [start for start, _ in tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    keep = min(len(starts), limit - _token_count(tokenizer, template.format(prompt="")))
    while keep > 0:
        end = prompt[starts[-keep]:]
        length = _token_count(tokenizer, template.format(prompt=end))
        if length <= limit:
            return end, length
        keep -= length - limit
    return None


class RowSampler(LogitsProcessor):
    """Sampling as greedy decoding of Gumbel-perturbed scores, each sampled row with its own generator.

    ``argmax(scores + Gumbel noise)`` is a draw from ``softmax(scores)`` (the Gumbel-max trick), so
    ``generate`` decodes greedily while every sampled row draws from its own seeded stream: its
    tokens depend on its seed and its own scores, never on the other rows of the batch or on the
    global RNG. That is what lets requests share a batch and still sample as they would alone.
    Scores are cut to the top :data:`SAMPLE_TOP_K` first, as ``transformers`` samples by default.
    Rows without a seed stay greedy.
    """

    def __init__(self, seeds: Sequence[int | None]):
        self.rows = [row for row, seed in enumerate(seeds) if seed is not None]
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds if seed is not None]
        self.top_k = TopKLogitsWarper(SAMPLE_TOP_K)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform)).to(scores)
        scores = scores.clone()
        scores[self.rows] = self.top_k(input_ids[self.rows], scores[self.rows]) + gumbel
        return scores


def row_seeds(rows: int, do_sample: bool, seed: int) -> list[int | None]:
    """Each row's sampling seed, mixed from the request's seed and the row's place in the request
    (None for every row when decoding greedily): the same rows sample the same in any batch."""
    if not do_sample:
        return [None] * rows
    return [int(np.random.SeedSequence((seed, row)).generate_state(1)[0]) for row in range(rows)]


# ---------------------------------------------------------------- where an answer ends
def answer_stops(template: str) -> tuple[str, ...]:
    """The strings that end an answer written in ``template`` (besides the model's EOS token): its next
    section heading, for a template that heads its sections with :data:`SECTION_HEADING`."""
    return (SECTION_HEADING,) if SECTION_HEADING in "\n" + template else ()


def cut_answer(text: str, stops: Sequence[str], prompt: str = "", hold: bool = False) -> str:
    """``text`` up to its first stop string, the stop left out.

    The end of ``prompt`` is read with it, since a stop may begin there: Alpaca's prompt ends in a
    line break, so an answer that opens with ``###`` has ended before its first word. ``hold`` (while
    streaming) also leaves out an end of ``text`` that may still grow into a stop.
    """
    if not stops:
        return text
    tail = prompt[max(0, len(prompt) - max(map(len, stops)) + 1) :]  # the part of the prompt a stop may start in
    full = tail + text
    end = len(full)
    for stop in stops:
        found = full.find(stop, max(0, len(tail) - len(stop) + 1))  # a stop ends inside ``text``, never in the prompt
        if found >= 0:
            end = min(end, found)
        elif hold:
            end = min([end] + [len(full) - n for n in range(1, len(stop)) if full.endswith(stop[:n])])
    return text[: max(0, end - len(tail))]


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a sequence: the tokenizer's EOS and the model's generation config's (a chat
    model ends its turns with another token than its tokenizer's EOS)."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *ids] if i is not None})


Stream = Callable[[dict[int, str]], None]  # after a decoding step: row -> its answer so far, for the rows that grew


class AnswerEnd(StoppingCriteria):
    """Ends each row at its answer's end (:func:`cut_answer`) or when ``cancelled(row)`` says so, and hands
    every row's answer so far to ``stream``.

    One decode per step serves both: the text that is streamed is the text the stop is found in, so
    a stop string is never shown, even in part. Rows end on their own; the rest of the batch goes on.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], width: int, stops: Sequence[str],
                 eos: list[int], stream: Stream | None = None, cancelled: Callable[[int], bool] | None = None):
        self.tokenizer, self.prompts, self.width, self.stops, self.eos = tokenizer, prompts, width, stops, set(eos)
        self.stream, self.cancelled = stream, cancelled
        self.done = [False] * len(prompts)
        self.shown = [""] * len(prompts)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        live = [row for row, done in enumerate(self.done) if not done]
        new = input_ids[live, self.width :].tolist()
        grew = {}
        for row, tokens, text in zip(live, new, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
            answer = cut_answer(text, self.stops, self.prompts[row])
            ended = answer != text or tokens[-1] in self.eos or (self.cancelled is not None and self.cancelled(row))
            self.done[row] = ended
            # While it grows, an end that may become a stop and a character still missing bytes ("\ufffd") wait.
            shown = answer if ended else cut_answer(text, self.stops, self.prompts[row], hold=True).rstrip("\ufffd")
            if shown != self.shown[row]:
                self.shown[row] = grew[row] = shown
        if grew and self.stream is not None:
            self.stream(grew)
        return torch.tensor(self.done, device=input_ids.device)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    embeddings: torch.Tensor | None = None,
    cluster_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    conditioning: str = "batch",
    stops: Sequence[str] = (),
) -> list[str]:
    """Continuations of one request's ``prompts`` in one left-padded batch (:func:`generate_rows`).

    Sampled rows draw from streams seeded by ``seed`` and their row (:func:`row_seeds`), so every
    model compared under one seed draws from the same random streams. ``stops``: where an answer
    ends besides EOS, e.g. ``answer_stops(bundle.metadata["prompt_template"])``.
    """
    seeds = row_seeds(len(prompts), do_sample, seed)
    return generate_rows(model, tokenizer, prompts, seeds, embeddings, cluster_ids, centroids, max_new_tokens,
                         conditioning, stops)


@torch.no_grad()
def generate_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    seeds: Sequence[int | None],
    embeddings: torch.Tensor | None = None,
    cluster_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    conditioning: str = "batch",
    stops: Sequence[str] = (),
    stream: Stream | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> list[str]:
    """Continuations of ``prompts`` in one left-padded batch, each row greedy or sampled from its own seed.

    A conditioned head gets each row's adapter: rows that share a cluster id form one group,
    conditioned as the bundle was trained (``conditioning``, see :data:`~.hyper_head.CONDITIONING`):
    with ``batch``, the mean of the group's embeddings, as the paper's cluster-homogeneous batch.
    ``prompts`` must fit the model's positions with the new tokens (:func:`fit_prompts` cuts them,
    so that the embedding and the summary see the same text). ``seeds`` (one per row, None for a
    greedy row) make each row's sample its own (:class:`RowSampler`), so rows of several requests
    can share one batch. Each row ends at EOS, at a stop string (not returned) or when
    ``cancelled(row)``; ``stream`` gets the rows' answers as they grow (:class:`AnswerEnd`). Neither
    changes a token: streamed or not, a row's answer is the same.
    """
    if hyper_head(model) is not None and (embeddings is None or cluster_ids is None):
        raise ValueError("a ChameleonLLM model needs the prompts' embeddings and cluster ids to generate")
    left = copy.copy(tokenizer)
    left.padding_side = "left"
    device = model.get_input_embeddings().weight.device
    batch = left(prompts, return_tensors="pt", padding=True).to(device)
    width = batch["input_ids"].shape[1]
    _check_fits(model, width, max_new_tokens)
    eos = eos_ids(model, tokenizer)
    ends = StoppingCriteriaList()
    if stops or stream is not None or cancelled is not None:
        ends.append(AnswerEnd(left, prompts, width, stops, eos, stream, cancelled))
    with conditioned(model, embeddings, conditioning, cluster_ids, centroids):
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=eos, logits_processor=LogitsProcessorList([RowSampler(seeds)]),
                                stopping_criteria=ends)
    texts = left.batch_decode(output[:, width:], skip_special_tokens=True)
    return [cut_answer(text, stops, prompt) for text, prompt in zip(texts, prompts)]


# ---------------------------------------------------------------- several requests in one batch
def length_buckets(lengths: Sequence[int], new_tokens: Sequence[int]) -> list[list[int]]:
    """Row indices grouped into the batches they are generated in: one per number of new tokens,
    split further by prompt length only where that pays.

    Every decoding step costs a batch about the same whatever its prompts' lengths, and a second
    batch repeats every step, so rows stay together unless padding them to the longest would make
    more than half of the batch's prompt tokens padding. Rows keep their order within a batch.
    """
    by_tokens: dict[int, list[int]] = {}
    for row, tokens in enumerate(new_tokens):
        by_tokens.setdefault(tokens, []).append(row)
    buckets = []
    for rows in by_tokens.values():
        bucket, real = [], 0
        for row in sorted(rows, key=lengths.__getitem__):
            if bucket and (len(bucket) + 1) * lengths[row] > 2 * (real + lengths[row]):
                buckets.append(sorted(bucket))
                bucket, real = [], 0
            bucket.append(row)
            real += lengths[row]
        buckets.append(sorted(bucket))
    return buckets


@dataclass
class MixedRows:
    """The rows of several requests side by side, with what each model needs to generate them together."""

    spans: list[slice]  # each request's rows
    assignments: list[Assignment]  # each request's, made among its own prompts or from the trained clusters
    texts: list[str]
    lengths: list[int]  # tokens of each text
    new_tokens: list[int]
    seeds: list[int | None]  # each row's sampling seed (None: greedy), from its request's seed and its row there
    embeddings: torch.Tensor  # (N, d)
    groups: torch.Tensor  # (N,) each row's group: one per (request, cluster)
    vectors: torch.Tensor  # (G, d) each group's conditioning vector, made from its own request's rows

    @classmethod
    def mix(cls, bundle: Bundle, requests: Sequence[Request], fitted: Sequence[FittedPrompts]) -> MixedRows:
        """Every request's rows side by side: embedded at once, then assigned and conditioned request by request.

        Each request's groups (one per cluster, conditioned as ``bundle`` was trained) take ids no other
        request shares, so no request's adapter reads another's prompts.
        """
        sizes = [len(f.texts) for f in fitted]
        embeddings = embed_prompts(bundle, [condition for f in fitted for condition in f.conditions])
        assignments, vectors, groups = [], [], []
        for request, own in zip(requests, embeddings.split(sizes)):
            assignment = assign(bundle, own, request.cluster_source, request.k, request.seed)
            assignments.append(assignment)
            own_vectors, group = condition_groups(own, bundle.adapter.conditioning, assignment.labels, assignment.centroids)
            groups.append(group + sum(map(len, vectors)))  # ids unique to this request
            vectors.append(own_vectors)
        seeds = [seed for r, size in zip(requests, sizes) for seed in row_seeds(size, r.do_sample, r.seed)]
        ends = np.cumsum(sizes).tolist()
        return cls([slice(end - size, end) for end, size in zip(ends, sizes)], assignments,
                   [text for f in fitted for text in f.texts], [n for f in fitted for n in f.lengths],
                   [f.max_new_tokens for f in fitted for _ in f.texts], seeds, embeddings, torch.cat(groups),
                   torch.cat(vectors))

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = (),
                 stream: Stream | None = None, cancelled: Callable[[int], bool] | None = None) -> list[str]:
        """Every row's continuation, a batch per length bucket; ``stops``, ``stream`` and ``cancelled``
        as :func:`generate_rows`'s, with the rows numbered as here.

        Each group's vector is handed to the head as its ``centroid``, so a bucket holding part of
        a group is conditioned on the whole group, exactly as the request alone would be.
        """
        texts = [""] * len(self.texts)
        for bucket in length_buckets(self.lengths, self.new_tokens):
            generated = generate_rows(
                model, tokenizer, [self.texts[i] for i in bucket], [self.seeds[i] for i in bucket], self.embeddings[bucket],
                self.groups[bucket], self.vectors, self.new_tokens[bucket[0]], "centroid", stops,
                stream and (lambda grew, bucket=bucket: stream({bucket[row]: text for row, text in grew.items()})),
                cancelled and (lambda row, bucket=bucket: cancelled(bucket[row])),
            )
            for row, text in zip(bucket, generated):
                texts[row] = text
        return texts


@dataclass
class AdapterView:
    """The head update ChameleonLLM generated for one cluster."""

    cluster: int
    prompts: int  # how many of the prompts fell in it
    norm: float  # ||scale * B A||_F
    boosted: list[tuple[str, float]]  # tokens whose logits the update raises most, for the prompts' mean state


@torch.no_grad()
def adapter_summary(
    bundle: Bundle, prompts: list[str], embeddings: torch.Tensor, assignment: Assignment, top_k: int = 6
) -> list[AdapterView]:
    """Per cluster: the size of its generated head update and the tokens ``scale * B (A h)`` boosts most.

    The adapters are those :func:`generate` uses (conditioned as the bundle was trained). ``h`` is
    each prompt's mean final hidden state over its tokens, so the boost is the mean logit change
    the adapters make on the cluster's prompts (the texts the models read,
    :attr:`FittedPrompts.texts`). ``||BA||_F`` comes from two r x r Gram matrices; no
    vocabulary-sized matrix is built.
    """
    head = hyper_head(bundle.model)
    if head is None:
        raise BundleError(f"a {bundle.adapter.regime!r} bundle has no generated adapter to summarise")
    weight = head.base.weight
    A, B, groups = head.adapters(embeddings.to(weight), bundle.adapter.conditioning, assignment.labels,
                                 assignment.centroids)  # (G, r, d), (G, V, r), (N,)
    gram = (B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))
    norms = head.scale * gram.sum((1, 2)).clamp(min=0).sqrt()  # (G,)
    device = head.base.weight.device
    batch = bundle.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    _check_fits(bundle.model, batch["input_ids"].shape[1])
    hidden = bundle.model.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    states = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N, d) per prompt
    views = []
    for cluster in torch.unique(assignment.labels).tolist():
        members = assignment.labels.to(device) == cluster
        rows = groups[members]  # each member's adapter: one for the cluster unless conditioning is per example
        low = torch.einsum("nrd,nd->nr", A[rows], states[members])  # (n, r)
        boost = head.scale * torch.einsum("nvr,nr->v", B[rows], low) / len(rows)  # (V,) mean logit change
        top = boost.topk(min(top_k, boost.numel()))
        tokens = [(bundle.tokenizer.decode([i]), float(v)) for i, v in zip(top.indices.tolist(), top.values)]
        views.append(AdapterView(cluster, int(members.sum()), float(norms[rows].mean()), tokens))
    return views
