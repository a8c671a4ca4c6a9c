"""The two evaluation protocols: how rows become tensors, what conditions, what is scored.

``paper`` reproduces the published code exactly (see the README's "What the paper's numbers
measure"): rows right-padded to ``max_length`` with pad = eos, attention mask ``ids != 0``,
loss on the *last* position with *no shift* (so the model is asked to copy the token it reads,
which is padding for most rows), conditioning on the mean over every position of the padded row,
metric = mean of per-batch mean losses.

``causal`` is a correct language-modelling protocol: next-token loss with shift, padding masked
and never attended, token-weighted mean NLL, and conditioning only on what is known before the
scored tokens (WikiText: the first ``context_tokens``; Alpaca: the instruction and input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Record
from .embeddings import embed_texts, mean_embedding

PROTOCOLS = ("paper", "causal")
IGNORE = -100
PAPER_IGNORE_ID = 0  # the published ignore_index (GPT-2's "!"), also applied to its attention mask


@dataclass
class Encoded:
    """One split under one protocol: variable-length rows, their labels and conditioning vectors."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]  # IGNORE where not scored
    cond: torch.Tensor  # (N, d) normalised conditioning embeddings
    texts: list[str]  # the conditioning text of each row, for display
    dropped: int  # rows with nothing left to score
    padding_share: float | None = None  # paper protocol: share of scored targets that are padding

    def __len__(self) -> int:
        return len(self.input_ids)


def embedding_settings(protocol: str, instruction_data: bool, max_length: int, context_tokens: int) -> dict:
    """``embed_texts`` keyword arguments that embed a new prompt exactly as training conditioned."""
    if protocol == "paper":
        return {"max_length": max_length, "mask_padding": False, "pad_to_max_length": True}
    return {"max_length": max_length if instruction_data else context_tokens, "mask_padding": True}


@torch.no_grad()
def encode(
    records: list[Record],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    protocol: str,
    max_length: int = 256,
    context_tokens: int = 32,
) -> Encoded:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    instruction_data = any(r.prompt for r in records)
    embed = embedding_settings(protocol, instruction_data, max_length, context_tokens)
    prompts = tokenizer([r.prompt for r in records])["input_ids"] if instruction_data else None
    if protocol == "paper":
        batch = tokenizer([r.text for r in records], max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        ids = batch["input_ids"]
        labels = ids.clone()
        if prompts is not None:  # published Alpaca: nothing before the response marker is a target
            for row, prompt in zip(labels, prompts):
                row[: len(prompt)] = IGNORE
        last_is_pad = batch["attention_mask"][:, -1] == 0
        scored = (labels[:, -1] != PAPER_IGNORE_ID) & (labels[:, -1] != IGNORE)
        share = float((last_is_pad & scored).sum() / scored.sum().clamp(min=1))
        if instruction_data:
            cond = embed_texts(model, tokenizer, [r.condition for r in records], **embed)
        else:  # published WikiText: the whole (padded) row conditions, scored token included
            device = model.get_input_embeddings().weight.device
            cond = torch.cat([mean_embedding(model, chunk.to(device)).cpu() for chunk in ids.split(512)])
        return Encoded(list(ids), list(labels), cond, [r.condition for r in records], 0, share)

    rows_ids, rows_labels, keep = [], [], []
    if instruction_data:
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
        cond = embed_texts(model, tokenizer, [r.condition for r in kept], **embed)
    else:  # the first context_tokens are what a deployed model has seen before it must predict
        device = model.get_input_embeddings().weight.device
        heads = torch.tensor([ids[:context_tokens] for ids in rows_ids], dtype=torch.long).reshape(-1, context_tokens)
        cond = torch.cat([mean_embedding(model, chunk.to(device)).cpu() for chunk in heads.split(512)]) if len(heads) else torch.empty(0, model.get_input_embeddings().embedding_dim)
    return Encoded(
        [torch.tensor(x) for x in rows_ids], [torch.tensor(x) for x in rows_labels], cond,
        [r.condition for r in kept], len(records) - len(kept),
    )


def collate(encoded: Encoded, indices: list[int], protocol: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the chosen rows into a batch with the protocol's attention mask."""
    rows = [encoded.input_ids[i] for i in indices]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for j, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        ids[j, :n], labels[j, :n], mask[j, :n] = encoded.input_ids[i], encoded.labels[i], 1
    if protocol == "paper":
        mask = (ids != PAPER_IGNORE_ID).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def forward_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor], protocol: str) -> torch.Tensor:
    """Only the last position's logits under ``paper`` (all its loss needs)."""
    keep = 1 if protocol == "paper" else 0
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits


def loss_terms(logits: torch.Tensor, labels: torch.Tensor, protocol: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of scored targets) of one batch."""
    if protocol == "paper":
        target = labels[:, -1]
        scored = (target != PAPER_IGNORE_ID) & (target != IGNORE)
        nll = F.cross_entropy(logits[:, -1].float(), target.clamp(min=0), reduction="none")
        return (nll * scored).sum(), scored.sum()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll, (target != IGNORE).sum()
