"""The input representation used for clustering and for conditioning the hyper-network.

An input is embedded as the L2-normalised mean of its input-token embeddings (the published
``source``, ``"embeddings"``), or of the frozen model's final hidden states over its tokens
(``"hidden"``: what the model itself has read of the text, as Hyperdecoders condition on an
encoder's states). Padding is masked out: an embedding must not depend on how long the other rows
of its batch were. (The published code averaged over padding too; ``mask_padding=False,
pad_to_max_length=True`` reproduces it.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .lora import lora_disabled
from .models import body_fingerprint, model_fingerprint

CONDITION_SOURCES = ("embeddings", "hidden")  # what a condition's vector is the mean of
HIDDEN_BATCH = 32  # rows run through the transformer at a time for the hidden source


def mean_embedding(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, T) token ids -> (N, d) unit vectors; positions with ``attention_mask == 0`` are ignored.

    A plain float32 ``nn.Embedding`` on CPU or CUDA sums its rows with ``embedding_bag`` rather than
    building the (N, T, d) token tensor: the same sums, without the memory traffic that made
    embedding WikiText-2's training lines take tens of seconds on a CPU.
    """
    embedding = model.get_input_embeddings()
    weights = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).float()
    if _sums_in_place(embedding):
        summed = F.embedding_bag(input_ids, embedding.weight, mode="sum", per_sample_weights=weights)
    else:
        summed = (embedding(input_ids).float() * weights.unsqueeze(-1)).sum(1)
    return F.normalize(summed / weights.sum(1, keepdim=True).clamp(min=1.0), dim=-1)


@torch.no_grad()
def mean_hidden_state(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, T) token ids -> (N, d) unit vectors: the mean of the transformer's final hidden states (its
    ``base_model``, final norm included) over the positions ``weights`` counts (default: the attended ones).

    The layers' LoRA is switched off, so the condition is the frozen model's reading of the text,
    the same before, during and after training, and at inference.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with lora_disabled(model):
        states = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()  # (N, T, d)
    counted = (mask if weights is None else weights).float().unsqueeze(-1)
    return F.normalize((states * counted).sum(1) / counted.sum(1).clamp(min=1.0), dim=-1)


def embed_ids(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    mask_padding: bool = True, source: str = "embeddings",
) -> torch.Tensor:
    """(N, T) token ids -> (N, d) condition vectors from ``source`` (:data:`CONDITION_SOURCES`); with
    ``mask_padding=False`` every position counts in the mean (the model still attends as ``attention_mask`` says)."""
    if source == "embeddings":
        return mean_embedding(model, input_ids, attention_mask if mask_padding else None)
    if source == "hidden":
        return mean_hidden_state(model, input_ids, attention_mask, None if mask_padding else torch.ones_like(input_ids))
    raise ValueError(f"unknown condition source {source!r}; choose from {CONDITION_SOURCES}")


def _sums_in_place(embedding: nn.Module) -> bool:
    """Whether ``embedding_bag`` computes what the module would: a plain float32 table (MPS lacks the op)."""
    weight = getattr(embedding, "weight", None)
    return (
        type(embedding) is nn.Embedding and embedding.max_norm is None
        and weight.dtype == torch.float32 and weight.device.type in ("cpu", "cuda")
    )


@torch.no_grad()
def embed_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int = 256,
    mask_padding: bool = True,
    pad_to_max_length: bool = False,
    source: str = "embeddings",
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Embeddings of many texts, tokenized and embedded a batch at a time (default: :func:`_chunk`), cached on
    disk with ``cache_dir``.

    The cache key covers the model weights' fingerprint (the whole transformer's for the hidden source), the
    tokenizer, every text and every setting, so a stale cache cannot be read back by mistake.
    """
    if source not in CONDITION_SOURCES:
        raise ValueError(f"unknown condition source {source!r}; choose from {CONDITION_SOURCES}")
    batch_size = batch_size or _chunk(source)
    settings = dict(max_length=max_length, mask_padding=mask_padding, pad_to_max_length=pad_to_max_length)
    if source != "embeddings":  # the published source keeps its old keys, so its caches stay valid
        settings["source"] = source
    path = None
    if cache_dir is not None:
        key = _key(model, source, [type(tokenizer).__name__, len(tokenizer), settings])
        for text in texts:
            key.update(text.encode("utf-8") + b"\0")
        path = Path(cache_dir) / f"embeddings-{key.hexdigest()}.safetensors"
        if path.is_file():
            return load_file(path)["embeddings"]
    device = model.get_input_embeddings().weight.device
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding", disable=not progress, leave=False):
        batch = tokenizer(
            texts[start : start + batch_size],
            max_length=max_length,
            truncation=True,
            padding="max_length" if pad_to_max_length else True,
            return_tensors="pt",
        ).to(device)
        chunks.append(embed_ids(model, batch["input_ids"], batch["attention_mask"], mask_padding, source).cpu())
    dim = model.get_input_embeddings().embedding_dim
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, dim)
    if path is not None:
        _store(path, embeddings)
    return embeddings


def embed_rows(
    model: PreTrainedModel, ids: torch.Tensor, source: str = "embeddings", cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """(N, T) token ids, every position attended and counted -> (N, d) condition vectors from ``source``, a chunk
    of rows at a time (:func:`_chunk`); cached on disk with ``cache_dir``, keyed as :func:`embed_texts` keys."""
    embedding = model.get_input_embeddings()
    path = None
    if cache_dir is not None:
        key = _key(model, source, ["rows", source])
        key.update(ids.numpy().tobytes() + repr(tuple(ids.shape)).encode())
        path = Path(cache_dir) / f"rows-{key.hexdigest()}.safetensors"
        if path.is_file():
            return load_file(path)["embeddings"]
    found = (torch.cat([embed_ids(model, rows.to(embedding.weight.device), source=source).cpu()
                        for rows in ids.split(_chunk(source))]) if len(ids) else torch.empty(0, embedding.embedding_dim))
    if path is not None:
        _store(path, found)
    return found


def _chunk(source: str) -> int:
    """Rows embedded at a time: 512 from the embedding table, :data:`HIDDEN_BATCH` when the transformer runs."""
    return 512 if source == "embeddings" else HIDDEN_BATCH


def _key(model: PreTrainedModel, source: str, settings: list) -> "hashlib.blake2b":
    """A cache key started with the model's fingerprint and ``settings``; the hidden source reads every weight of
    the transformer, so its keys cover them all."""
    key = hashlib.blake2b(digest_size=16)
    key.update(json.dumps([model_fingerprint(model), *settings]).encode())
    if source != "embeddings":
        key.update(body_fingerprint(model).encode())
    return key


def _store(path: Path, embeddings: torch.Tensor) -> None:
    """Write ``embeddings`` to ``path`` through a temporary name, so a crash never leaves half a cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"embeddings": embeddings.contiguous()}, tmp)
    tmp.replace(path)
