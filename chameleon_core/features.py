"""Cached hidden states for the head-only regimes: the frozen transformer run once per split, not every step.

``lora-head`` and ``chameleon-head`` (the published configuration) adapt the output head alone, so the
transformer's final hidden states at the scored positions are the same in every epoch, seed, arm and
learning rate. Computed once and kept on disk, they turn a training step into the head's ``d x V`` matmul
and its adapters: what makes converged head-only runs affordable on a CPU.

The transformer runs in eval mode here. For a model whose frozen body has dropout (GPT-2's 0.1), a run on
cached features therefore trains without that noise: the reason it is a setting a run records
(``TrainConfig.cached_features``), not a silent shortcut. SmolLM2 has no dropout, and both paths agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .models import body_fingerprint, default_cache_dir, model_fingerprint
from .protocols import IGNORE, Encoded, Protocol


@dataclass
class Features:
    """Per row, the final hidden state at each scored position and the token it is scored on."""

    hidden: list[torch.Tensor]  # row i: (n_i, d)
    targets: list[torch.Tensor]  # row i: (n_i,), IGNORE where a position is kept but not scored (published protocol)

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) hidden states, zero-padded, and (B, T) targets, IGNORE-padded, of the rows ``indices``."""
        width = max(len(self.targets[i]) for i in indices)
        dim = self.hidden[indices[0]].shape[1]
        hidden = torch.zeros(len(indices), width, dim, dtype=self.hidden[indices[0]].dtype)
        targets = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        for j, i in enumerate(indices):
            n = len(self.targets[i])
            hidden[j, :n], targets[j, :n] = self.hidden[i], self.targets[i]
        return hidden, targets

    def pack(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, N, d) hidden states of the rows ``indices`` one after another, no padding, their (N,) targets and
        (N,) row of each (0 to len(indices) - 1): for a head whose logits at a position depend on that position
        alone, the same numbers as :meth:`collate` without computing a padded position's vocabulary-wide logits."""
        lengths = torch.tensor([len(self.targets[i]) for i in indices])
        hidden = torch.cat([self.hidden[i] for i in indices])[None]
        targets = torch.cat([self.targets[i] for i in indices])
        return hidden, targets, torch.arange(len(indices)).repeat_interleave(lengths)


def row_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed loss and (B,) number of scored targets from the head's logits (B, T, V) at the cached positions:
    what :meth:`Protocol.row_terms` gives from the whole model's logits."""
    # flattened, the vocabulary is each position's contiguous last axis (about a third faster than (B, V, T))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view_as(targets)
    return nll.sum(1), (targets != IGNORE).sum(1)


def packed_row_terms(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_terms` of :meth:`Features.pack`'s layout: logits (1, N, V), targets and rows (N,)."""
    nll = F.cross_entropy(logits[0].float(), targets, ignore_index=IGNORE, reduction="none")  # (N,), 0 where ignored
    scored = (targets != IGNORE).long()
    return nll.new_zeros(n_rows).index_add(0, rows, nll), scored.new_zeros(n_rows).index_add(0, rows, scored)


@torch.no_grad()
def compute_features(
    model: PreTrainedModel, encoded: Encoded, protocol: Protocol, pad_id: int, batch_size: int = 16,
    progress: bool = False,
) -> Features:
    """Run the model's transformer (its ``base_model``, final norm included) over ``encoded`` as the protocol
    collates it, and keep the hidden state of every position the protocol scores."""
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    hidden, targets = [], []
    for start in tqdm(range(0, len(encoded), batch_size), desc="hidden states", disable=not progress, leave=False):
        indices = list(range(start, min(start + batch_size, len(encoded))))
        batch = protocol.collate(encoded, indices, pad_id)
        states = model.base_model(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device)).last_hidden_state  # (B, L, d)
        for j, i in enumerate(indices):
            positions, scored = protocol.scored_positions(encoded.labels[i])
            hidden.append(states[j, positions].float().cpu())
            targets.append(scored)
    model.train(was_training)
    return Features(hidden, targets)


def cached_features(
    model: PreTrainedModel, encoded: Encoded, protocol: Protocol, pad_id: int, cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Features:
    """:func:`compute_features`, read back from ``cache_dir`` (default: beside the models, ``features/``) when
    the same model has already run on the same rows: the key covers the weights' fingerprint, the protocol,
    the padding id and every row's token ids and labels, so a stale file cannot be read by mistake."""
    key = hashlib.blake2b(digest_size=16)
    key.update(json.dumps([model_fingerprint(model), body_fingerprint(model), protocol.name, pad_id]).encode())
    for ids, labels in zip(encoded.input_ids, encoded.labels):
        key.update(ids.numpy().tobytes() + b"|" + labels.numpy().tobytes() + b"\0")
    path = Path(cache_dir or default_cache_dir() / "features") / f"features-{key.hexdigest()}.safetensors"
    if path.is_file():
        stored = load_file(path)
        lengths = stored["lengths"].tolist()
        return Features(list(stored["hidden"].split(lengths)), list(stored["targets"].split(lengths)))
    features = compute_features(model, encoded, protocol, pad_id, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    dim = model.get_input_embeddings().embedding_dim
    save_file({"hidden": torch.cat(features.hidden) if features.hidden else torch.empty(0, dim),
               "targets": torch.cat(features.targets) if features.targets else torch.empty(0, dtype=torch.long),
               "lengths": torch.tensor([len(t) for t in features.targets], dtype=torch.long)}, tmp)
    tmp.replace(path)
    return features
