"""The evaluation protocols: how rows become tensors, what conditions, what is scored.

A protocol is one object (see :class:`Protocol`); :data:`PROTOCOLS` holds them by name, and a
new protocol is one subclass added there. Two ship:

``paper`` reproduces the published code exactly (see the README's "What the paper's numbers
measure"): rows right-padded to ``max_length`` with pad = eos, attention mask ``ids != 0``,
loss on the *last* position with *no shift* (so the model is asked to copy the token it reads,
which is padding for most rows), conditioning on the mean over every position of the padded row,
metric = mean of per-batch mean losses, evaluation split clustered on itself.

``causal`` is a correct language-modelling protocol: next-token loss with shift, padding masked
and never attended, token-weighted mean NLL, and conditioning only on what is known before the
scored tokens (WikiText: the first ``context_tokens``; Alpaca: the instruction and input).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Record
from .embeddings import embed_rows, embed_texts
from .models import default_cache_dir

IGNORE = -100
PAPER_IGNORE_ID = 0  # the published ignore_index (GPT-2's "!"), also applied to its attention mask


@dataclass
class Encoded:
    """One split under one protocol: variable-length rows, their labels and conditioning embeddings."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]  # IGNORE where not scored
    embeddings: torch.Tensor  # (N, d) normalised conditioning embeddings, one per row
    texts: list[str]  # the conditioning text of each row, for display
    dropped: int  # rows with nothing left to score
    padding_share: float | None = None  # paper protocol: share of scored targets that are padding

    def __len__(self) -> int:
        return len(self.input_ids)


def _cache(source: str) -> Path | None:
    """Where a split's conditions are kept: the hidden source runs the whole transformer over every condition, the
    same in every run of a grid, so it is read back from disk (beside the cached features); embedding-table means
    cost less than reading a file."""
    return None if source == "embeddings" else default_cache_dir() / "conditions"


def _source(source: str) -> dict:
    """The condition source among the embedding settings: named only when not the published one, so
    settings recorded before the source existed read the same."""
    return {} if source == "embeddings" else {"source": source}


class Protocol:
    """Everything a protocol decides, in one place; the defaults are a correct language-modelling protocol.

    A subclass supplies :meth:`encode` (what is scored and what conditions) and overrides what
    else it does differently; training, evaluation and the CLI only ever call these members.
    """

    name: str
    transductive = False  # by default cluster the evaluation split on itself, not by the training centroids
    logits_to_keep = 0  # the last positions whose logits the loss reads (0: all)
    loss_depends_on_batches = False  # split_loss depends on how rows are batched (evaluating then needs the trained clusters)

    def embedding_settings(
        self, instruction_data: bool, max_length: int, context_tokens: int, source: str = "embeddings"
    ) -> dict:
        """``embed_texts`` keyword arguments that embed a new prompt exactly as training conditioned."""
        return {"max_length": max_length if instruction_data else context_tokens, "mask_padding": True,
                **_source(source)}

    def encode(
        self, records: list[Record], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
        max_length: int = 256, context_tokens: int = 32, source: str = "embeddings",
    ) -> Encoded:
        raise NotImplementedError

    def collate(self, encoded: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-pad the chosen rows into a batch; padding is never attended."""
        rows = [encoded.input_ids[i] for i in indices]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for j, i in enumerate(indices):
            n = len(encoded.input_ids[i])
            ids[j, :n], labels[j, :n], mask[j, :n] = encoded.input_ids[i], encoded.labels[i], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def forward_logits(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=self.logits_to_keep
        ).logits

    def loss_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of scored targets) of one batch."""
        sums, counts = self.row_terms(logits, labels)
        return sums.sum(), counts.sum()

    def row_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) summed loss and (B,) number of scored targets of each row: next-token NLL of every scored label."""
        target = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=IGNORE, reduction="none")
        return nll.sum(1), (target != IGNORE).sum(1)

    def scored_positions(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's positions whose logits :meth:`row_terms` reads, and the token each is scored on (IGNORE:
        read but not scored): every position whose next token is a target (:mod:`.features` caches these)."""
        target = labels[1:]
        positions = (target != IGNORE).nonzero().squeeze(1)
        return positions, target[positions]

    def split_loss(self, sums: list[float], counts: list[int]) -> float:
        """A split's loss from its batches' :meth:`loss_terms`: the mean over every scored token."""
        return sum(sums) / max(sum(counts), 1)


class CausalProtocol(Protocol):
    """Score what follows the condition, condition only on what a deployed model has seen."""

    name = "causal"

    @torch.no_grad()
    def encode(
        self, records: list[Record], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
        max_length: int = 256, context_tokens: int = 32, source: str = "embeddings",
    ) -> Encoded:
        instruction_data = any(r.prompt for r in records)
        rows_ids, rows_labels, keep = [], [], []
        if instruction_data:
            prompts = tokenizer([r.prompt for r in records])["input_ids"]
            responses = tokenizer([r.response for r in records], add_special_tokens=False)["input_ids"]
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                full = (prompt + response + [tokenizer.eos_token_id])[:max_length]
                labels = [IGNORE] * len(prompt) + full[len(prompt) :]
                if len(full) > len(prompt):
                    rows_ids.append(full), rows_labels.append(labels[: len(full)]), keep.append(i)
        else:
            for i, ids in enumerate(tokenizer([r.text for r in records], max_length=max_length, truncation=True)["input_ids"]):
                if len(ids) > context_tokens:
                    rows_ids.append(ids), rows_labels.append([IGNORE] * context_tokens + ids[context_tokens:]), keep.append(i)
        kept = [records[i] for i in keep]
        if instruction_data:
            embed = self.embedding_settings(instruction_data, max_length, context_tokens, source)
            embeddings = embed_texts(model, tokenizer, [r.condition for r in kept], **embed, cache_dir=_cache(source))
        else:  # the first context_tokens are what a deployed model has seen before it must predict
            heads = torch.tensor([ids[:context_tokens] for ids in rows_ids], dtype=torch.long).reshape(-1, context_tokens)
            embeddings = embed_rows(model, heads, source, cache_dir=_cache(source))
        return Encoded(
            [torch.tensor(x) for x in rows_ids], [torch.tensor(x) for x in rows_labels], embeddings,
            [r.condition for r in kept], len(records) - len(kept),
        )


class PaperProtocol(Protocol):
    """The published code's protocol, flaws included (see the module docstring)."""

    name = "paper"
    transductive = True
    logits_to_keep = 1  # only the last position is scored
    loss_depends_on_batches = True

    def embedding_settings(
        self, instruction_data: bool, max_length: int, context_tokens: int, source: str = "embeddings"
    ) -> dict:
        return {"max_length": max_length, "mask_padding": False, "pad_to_max_length": True, **_source(source)}

    @torch.no_grad()
    def encode(
        self, records: list[Record], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
        max_length: int = 256, context_tokens: int = 32, source: str = "embeddings",
    ) -> Encoded:
        instruction_data = any(r.prompt for r in records)
        batch = tokenizer([r.text for r in records], max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        ids = batch["input_ids"]
        labels = ids.clone()
        if instruction_data:  # published Alpaca: nothing before the response marker is a target
            for row, prompt in zip(labels, tokenizer([r.prompt for r in records])["input_ids"]):
                row[: len(prompt)] = IGNORE
        last_is_pad = batch["attention_mask"][:, -1] == 0
        scored = (labels[:, -1] != PAPER_IGNORE_ID) & (labels[:, -1] != IGNORE)
        share = float((last_is_pad & scored).sum() / scored.sum().clamp(min=1))
        if instruction_data:
            embed = self.embedding_settings(instruction_data, max_length, context_tokens, source)
            embeddings = embed_texts(model, tokenizer, [r.condition for r in records], **embed, cache_dir=_cache(source))
        else:  # published WikiText: the whole (padded) row conditions, scored token included
            embeddings = embed_rows(model, ids, source, cache_dir=_cache(source))
        return Encoded(list(ids), list(labels), embeddings, [r.condition for r in records], 0, share)

    def collate(self, encoded: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """As published: every position whose id is not 0 is attended, padding (eos) included."""
        batch = super().collate(encoded, indices, pad_id)
        batch["attention_mask"] = (batch["input_ids"] != PAPER_IGNORE_ID).long()
        return batch

    def row_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last position, no shift: the target is the token the model has just read."""
        target = labels[:, -1]
        scored = (target != PAPER_IGNORE_ID) & (target != IGNORE)
        nll = F.cross_entropy(logits[:, -1].float(), target.clamp(min=0), reduction="none")
        return nll * scored, scored.long()

    def scored_positions(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last position, scored on the token it has just read unless that is masked or padding's id."""
        target = labels[-1:]
        scored = (target != PAPER_IGNORE_ID) & (target != IGNORE)
        return torch.tensor([len(labels) - 1]), torch.where(scored, target, torch.full_like(target, IGNORE))

    def split_loss(self, sums: list[float], counts: list[int]) -> float:
        """The mean of per-batch means, as published."""
        return float(np.mean([s / n for s, n in zip(sums, counts)]))


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PaperProtocol(), CausalProtocol())}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}") from None


# The same steps by protocol name, for notebooks and tests.
def encode(
    records: list[Record], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, protocol: str,
    max_length: int = 256, context_tokens: int = 32,
) -> Encoded:
    return get_protocol(protocol).encode(records, model, tokenizer, max_length, context_tokens)


def collate(encoded: Encoded, indices: list[int], protocol: str, pad_id: int) -> dict[str, torch.Tensor]:
    return get_protocol(protocol).collate(encoded, indices, pad_id)


def forward_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor], protocol: str) -> torch.Tensor:
    return get_protocol(protocol).forward_logits(model, batch)


def loss_terms(logits: torch.Tensor, labels: torch.Tensor, protocol: str) -> tuple[torch.Tensor, torch.Tensor]:
    return get_protocol(protocol).loss_terms(logits, labels)
