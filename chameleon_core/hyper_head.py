"""Hyper-LoRA head: a hyper-network turns a conditioning embedding into the head's LoRA.

``logits = W h + (alpha / r) * B_c (A_c h)`` where ``(A_c, B_c) = hyper(c)`` and ``c`` is the
conditioning vector of the row's group (the whole batch, its cluster, or the row itself).
The update is applied in factored form, so no ``V x d`` matrix is ever built, and a batch that
mixes groups runs in one pass: each row's low-rank code ``A_g h`` lands in its group's block
of a ``G * r`` wide vector, and one matmul with all ``B_g`` side by side finishes the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .lora import features

CONDITIONING_MODES = ("batch", "cluster", "example")


class HyperNetwork(nn.Module):
    """MLP ``cond -> (A, B)``; defaults are the published ``d -> 64 -> 32 -> r (d + V)``."""

    def __init__(
        self,
        cond_dim: int,
        in_features: int,
        out_features: int,
        r: int,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.5,
    ):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        layers: list[nn.Module] = []
        width = cond_dim
        for size in hidden:
            linear = nn.Linear(width, size)
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU(), nn.Dropout(dropout)]
            width = size
        out = nn.Linear(width, r * (in_features + out_features))
        # Small outputs so the generated update starts near zero (published: N(0, 1e-3)).
        nn.init.normal_(out.weight, std=1e-3)
        nn.init.normal_(out.bias, std=1e-3)
        self.net = nn.Sequential(*layers, out)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cond``: (G, cond_dim) -> A: (G, r, in), B: (G, out, r)."""
        flat = self.net(cond)
        split = self.r * self.in_features
        A = flat[:, :split].reshape(-1, self.r, self.in_features)
        B = flat[:, split:].reshape(-1, self.out_features, self.r)
        return A, B


class HyperLoRAHead(nn.Module):
    """Wraps the frozen output head; the update comes from :class:`HyperNetwork`.

    The wrapped head keeps its own (possibly tied) weight and is only read, never written.
    Call :meth:`condition` (or use :func:`conditioned`) before each forward pass.
    """

    def __init__(
        self,
        base: nn.Module,
        cond_dim: int,
        r: int,
        alpha: float,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.5,
    ):
        super().__init__()
        self.base = base
        in_features, out_features = features(base)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.hyper = HyperNetwork(cond_dim, in_features, out_features, r, hidden, dropout)
        self.hyper.to(device=base.weight.device, dtype=base.weight.dtype)
        self._A: torch.Tensor | None = None
        self._B: torch.Tensor | None = None
        self._groups: torch.Tensor | None = None

    def condition(self, cond: torch.Tensor, groups: torch.Tensor) -> None:
        """Generate one adapter per row of ``cond`` (G, d); row ``n`` of the batch uses ``groups[n]``."""
        if cond.dim() != 2:
            raise ValueError(f"conditioning must be (groups, dim), got shape {tuple(cond.shape)}")
        weight = self.base.weight  # embeddings are often kept on the CPU; the adapter lives beside the head
        self._A, self._B = self.hyper(cond.to(weight))
        self._groups = groups.to(weight.device)

    def clear(self) -> None:
        self._A = self._B = self._groups = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._A is None:
            raise RuntimeError(
                "the ChameleonLLM head has no conditioning: run the model inside "
                "`with conditioned(model, embeddings, ...)` so the hyper-network can generate its adapter"
            )
        logits = self.base(h)
        A, B, groups = self._A, self._B, self._groups
        n_groups, rows = A.shape[0], h.shape[0]
        if groups.numel() != rows:  # generate() may expand rows (num_return_sequences, beams)
            if rows % groups.numel():
                raise ValueError(f"{rows} rows cannot share adapters of {groups.numel()} conditioned rows")
            groups = groups.repeat_interleave(rows // groups.numel())
        if n_groups == 1:
            low = h @ A[0].T  # (..., r)
            B_cat = B[0]  # (V, r)
        else:
            low = torch.einsum("ntd,grd->ntgr", h, A)
            low = low * F.one_hot(groups, n_groups).to(low.dtype)[:, None, :, None]
            low = low.flatten(-2)  # (N, T, G*r): each row fills only its group's block
            B_cat = B.permute(1, 0, 2).reshape(B.shape[1], n_groups * self.r)  # (V, G*r)
        flat = logits.reshape(-1, logits.shape[-1])
        # In place: the head's output is not saved for backward, and a second V-wide tensor would
        # cost a copy of every logit (about a tenth of the head's time on a CPU at GPT-2 scale).
        flat.addmm_(low.reshape(-1, low.shape[-1]), B_cat.T, alpha=self.scale)
        return flat.view_as(logits)


def condition_groups(
    embeddings: torch.Tensor,
    mode: str = "batch",
    cluster_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning vectors and each row's group index.

    ``batch``: the mean of the batch's embeddings (the paper). ``cluster``: the mean of the rows
    that share a cluster id, or the cluster's centroid when ``centroids`` is given; a batch that
    holds one cluster gets exactly the ``batch`` adapter. ``example``: each row on its own.
    """
    n = embeddings.shape[0]
    if mode == "batch":
        return embeddings.mean(0, keepdim=True), torch.zeros(n, dtype=torch.long, device=embeddings.device)
    if mode == "example":
        return embeddings, torch.arange(n, device=embeddings.device)
    if mode != "cluster":
        raise ValueError(f"unknown conditioning mode {mode!r}; choose from {CONDITIONING_MODES}")
    if cluster_ids is None:
        raise ValueError("conditioning mode 'cluster' needs the rows' cluster ids")
    unique, groups = torch.unique(cluster_ids.to(embeddings.device), return_inverse=True)
    if centroids is not None:
        return centroids.to(embeddings)[unique], groups
    sums = torch.zeros(len(unique), embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, groups, embeddings)
    counts = torch.bincount(groups, minlength=len(unique)).to(embeddings.dtype)
    return sums / counts[:, None], groups


def hyper_head(model: nn.Module) -> HyperLoRAHead | None:
    head = model.get_output_embeddings()
    return head if isinstance(head, HyperLoRAHead) else None


@contextmanager
def conditioned(
    model: nn.Module,
    embeddings: torch.Tensor,
    mode: str = "batch",
    cluster_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
) -> Iterator[None]:
    """Run ``model`` with adapters generated from ``embeddings`` (N, d); a no-op without a hyper head."""
    head = hyper_head(model)
    if head is None:
        yield
        return
    head.condition(*condition_groups(embeddings, mode, cluster_ids, centroids))
    try:
        yield
    finally:
        head.clear()
