"""The input representation used for clustering and for conditioning the hyper-network.

An input is embedded as the L2-normalised mean of its input-token embeddings. Padding is
masked out: an embedding must not depend on how long the other rows of its batch were.
(The published code averaged over padding too; ``mask_padding=False, pad_to=...`` reproduces it.)
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

from .models import model_fingerprint


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
    batch_size: int = 512,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Embeddings of many texts, tokenized and embedded a batch at a time, cached on disk.

    The cache key covers the model weights' fingerprint, the tokenizer, every text and every
    setting, so a stale cache cannot be read back by mistake.
    """
    settings = dict(max_length=max_length, mask_padding=mask_padding, pad_to_max_length=pad_to_max_length)
    path = None
    if cache_dir is not None:
        key = hashlib.blake2b(digest_size=16)
        key.update(json.dumps([model_fingerprint(model), type(tokenizer).__name__, len(tokenizer), settings]).encode())
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
        mask = batch["attention_mask"] if mask_padding else None
        chunks.append(mean_embedding(model, batch["input_ids"], mask).cpu())
    dim = model.get_input_embeddings().embedding_dim
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, dim)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"embeddings": embeddings.contiguous()}, tmp)
        tmp.replace(path)
    return embeddings
