"""Hyper-LoRA head: a hyper-network turns a conditioning embedding into the head's LoRA.

``logits = W h + (alpha / r) * B_c (A_c h)`` where ``(A_c, B_c) = hyper(c)`` and ``c`` is the
conditioning vector of the row's group: the mean of the rows batched with it (``batch``, the paper),
its cluster's centroid (``centroid``) or the row itself (``example``) — :data:`CONDITIONING`.
The update is applied in factored form, so no ``V x d`` matrix is ever built, and a batch that
mixes groups runs in one pass: each row gathers its own group's ``A_g`` and ``B_g`` (as BGMV
kernels do), so the work is that of one adapter however many groups the batch holds.

Every head with a per-row update derives from :class:`ConditionedHead` and shares that pass:
:class:`HyperLoRAHead` (``chameleon``; with a constant hyper-network input, ``chameleon-constant``)
and :class:`ClusterLoRAHead` (``lora-per-cluster``: one static LoRA per training cluster).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LORA_INITS, features

# How a row's conditioning vector is formed: one vocabulary from the head up to the app.
CONDITIONING = ("batch", "centroid", "example")
# How the hyper-network's output layer starts: "paper", weights and bias N(0, 1e-3), a generated update near zero
# for every condition (published); "lora", weights zero and bias a PEFT-initialised LoRA (A Kaiming-uniform,
# B zero), so every condition starts from a working static LoRA and learns how to depart from it (Text-to-LoRA).
HYPER_INITS = ("paper", "lora")


class HyperNetwork(nn.Module):
    """MLP ``vectors -> (A, B)``; defaults are the published ``d -> 64 -> 32 -> r (d + V)``."""

    def __init__(
        self,
        embedding_dim: int,
        in_features: int,
        out_features: int,
        r: int,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.5,
        init: str = "paper",
    ):
        super().__init__()
        if init not in HYPER_INITS:
            raise ValueError(f"unknown hyper-network init {init!r}; choose from {HYPER_INITS}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        layers: list[nn.Module] = []
        width = embedding_dim
        for size in hidden:
            linear = nn.Linear(width, size)
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU(), nn.Dropout(dropout)]
            width = size
        out = nn.Linear(width, r * (in_features + out_features))
        if init == "paper":  # small outputs: the generated update starts near zero
            nn.init.normal_(out.weight, std=1e-3)
            nn.init.normal_(out.bias, std=1e-3)
        else:  # every condition starts from one PEFT-initialised LoRA: A as LoRALayer's, B = 0
            nn.init.zeros_(out.weight)
            A = torch.empty(r, in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            with torch.no_grad():
                out.bias.copy_(torch.cat([A.flatten(), torch.zeros(out_features * r)]))
        self.net = nn.Sequential(*layers, out)

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``vectors``: (G, embedding_dim) -> A: (G, r, in), B: (G, out, r)."""
        flat = self.net(vectors)
        split = self.r * self.in_features
        A = flat[:, :split].reshape(-1, self.r, self.in_features)
        B = flat[:, split:].reshape(-1, self.out_features, self.r)
        return A, B


class ConstantHyperNetwork(HyperNetwork):
    """The hyper-network with its input replaced by one learned vector: the same generator, no conditioning.

    Whatever it is given, every group gets the adapter generated from ``input``. ``input`` starts as
    a random unit vector, like the normalised embeddings ``chameleon`` reads. (At zero the first
    layer would output its zero bias, every ReLU would sit at 0 with zero gradient, and only the last
    layer's bias would ever learn: a static LoRA, not the same architecture.)
    """

    def __init__(
        self,
        embedding_dim: int,
        in_features: int,
        out_features: int,
        r: int,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.5,
        init: str = "paper",
    ):
        super().__init__(embedding_dim, in_features, out_features, r, hidden, dropout, init)
        self.input = nn.Parameter(F.normalize(torch.randn(embedding_dim), dim=0))

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``vectors``: (G, embedding_dim), read only for G -> A: (G, r, in), B: (G, out, r), one adapter repeated."""
        A, B = super().forward(self.input[None])
        return A.expand(len(vectors), -1, -1), B.expand(len(vectors), -1, -1)


class ConditionedHead(nn.Module):
    """The frozen output head plus a rank-``r`` update chosen per row: ``W h + scale * B_g (A_g h)``.

    Subclasses say where each group's adapter comes from (:meth:`adapters`); the forward pass is
    shared. The wrapped head keeps its own (possibly tied) weight and is only read, never written.
    Call :meth:`condition` (or use :func:`conditioned`) before each forward pass.
    """

    unconditioned_error: str  # what a forward pass outside ``conditioned(...)`` says to do instead

    def __init__(self, base: nn.Module, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = features(base)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self._A: torch.Tensor | None = None
        self._B: torch.Tensor | None = None
        self._groups: torch.Tensor | None = None

    def adapters(
        self,
        embeddings: torch.Tensor,
        conditioning: str = "batch",
        cluster_ids: torch.Tensor | None = None,
        centroids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A: (G, r, d), B: (G, V, r), one adapter per group, and groups: (N,), each row's group."""
        raise NotImplementedError

    def condition(
        self,
        embeddings: torch.Tensor,
        conditioning: str = "batch",
        cluster_ids: torch.Tensor | None = None,
        centroids: torch.Tensor | None = None,
    ) -> None:
        """Choose the adapters of the rows of ``embeddings`` (N, d) for the next forward passes."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (rows, dim), got shape {tuple(embeddings.shape)}")
        self._A, self._B, groups = self.adapters(embeddings, conditioning, cluster_ids, centroids)
        self._groups = groups.to(self._A.device)

    def clear(self) -> None:
        self._A = self._B = self._groups = None

    @property
    def shared(self) -> bool:
        """Whether the chosen adapters are one for every row, so that each position's logits depend on its hidden
        state alone (positions of different rows may then be packed together: features.Features.pack)."""
        return self._A is not None and self._A.shape[0] == 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._A is None:
            raise RuntimeError(self.unconditioned_error)
        logits = self.base(h)
        A, B, groups = self._A, self._B, self._groups
        # In place: the head's output is not saved for backward, and a second V-wide tensor would
        # cost a copy of every logit (about a tenth of the head's time on a CPU at GPT-2 scale).
        if A.shape[0] == 1:  # one adapter for every row (however the rows are laid out): two plain matmuls
            flat = logits.reshape(-1, logits.shape[-1])
            flat.addmm_((h @ A[0].T).reshape(-1, self.r), B[0].T, alpha=self.scale)  # (N*T, r) @ (r, V)
            return flat.view_as(logits)
        rows = h.shape[0]
        if groups.numel() != rows:  # generate() may expand rows (num_return_sequences, beams)
            if rows % groups.numel():
                raise ValueError(f"{rows} rows cannot share adapters of {groups.numel()} conditioned rows")
            groups = groups.repeat_interleave(rows // groups.numel())
        # Mixed batch: each row gathers its own group's A and B, so the cost does not grow with G.
        low = torch.einsum("ntd,nrd->ntr", h, A[groups])  # (N, T, r)
        logits.baddbmm_(low, B[groups].transpose(1, 2), alpha=self.scale)  # (N, T, V) += (N, T, r) @ (N, r, V)
        return logits


class HyperLoRAHead(ConditionedHead):
    """``chameleon``: the update comes from :class:`HyperNetwork`, one adapter per group of rows.

    ``constant=True`` (``chameleon-constant``) feeds the hyper-network one learned vector instead of
    the conditioning (:class:`ConstantHyperNetwork`): the same architecture, without conditioning.
    """

    unconditioned_error = (
        "the ChameleonLLM head has no conditioning: run the model inside "
        "`with conditioned(model, embeddings, ...)` so the hyper-network can generate its adapter"
    )

    def __init__(
        self,
        base: nn.Module,
        embedding_dim: int,
        r: int,
        alpha: float,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.5,
        constant: bool = False,
        init: str = "paper",
    ):
        super().__init__(base, r, alpha)
        network = ConstantHyperNetwork if constant else HyperNetwork
        self.hyper = network(embedding_dim, self.in_features, self.out_features, r, hidden, dropout, init)
        self.hyper.to(device=base.weight.device, dtype=base.weight.dtype)

    def adapters(
        self,
        embeddings: torch.Tensor,
        conditioning: str = "batch",
        cluster_ids: torch.Tensor | None = None,
        centroids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One adapter generated per conditioning vector of :func:`condition_groups`."""
        vectors, groups = condition_groups(embeddings, conditioning, cluster_ids, centroids)
        weight = self.base.weight  # embeddings are often kept on the CPU; the adapter lives beside the head
        A, B = self.hyper(vectors.to(weight))
        return A, B, groups


class ClusterLoRAHead(ConditionedHead):
    """``lora-per-cluster``: ``k`` static head LoRAs, one per training cluster; each row uses its cluster's.

    Initialised as PEFT does each adapter (``init="peft"``: A Kaiming-uniform, B zero, so a fresh
    head is the base head) or as the published code (``"paper"``: both ``0.01 * N(0, 1)``).
    Rows are routed by cluster id alone, whatever the conditioning: condition it with the rows' cluster ids.
    """

    unconditioned_error = (
        "the lora-per-cluster head has no conditioning: run the model inside "
        "`with conditioned(model, embeddings, \"centroid\", cluster_ids, centroids)` so each row gets its cluster's adapter"
    )

    def __init__(self, base: nn.Module, k: int, r: int, alpha: float, init: str = "peft"):
        super().__init__(base, r, alpha)
        if k < 1:
            raise ValueError(f"lora-per-cluster needs at least one cluster, got {k}")
        if init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {init!r}; choose from {LORA_INITS}")
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(k, r, self.in_features, **like))  # (k, r, d)
        self.lora_B = nn.Parameter(torch.zeros(k, self.out_features, r, **like))  # (k, V, r)
        with torch.no_grad():
            for A, B in zip(self.lora_A, self.lora_B):  # each (r, d) on its own: fan-in d, as LoRALayer's
                if init == "peft":
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                else:
                    nn.init.normal_(A, std=0.01)
                    nn.init.normal_(B, std=0.01)

    def adapters(
        self,
        embeddings: torch.Tensor,
        conditioning: str = "centroid",
        cluster_ids: torch.Tensor | None = None,
        centroids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapters of the clusters present in the batch; the embeddings themselves are not read."""
        if cluster_ids is None:
            raise ValueError(
                "lora-per-cluster routes each row to its training cluster's adapter: condition it with the rows' cluster ids"
            )
        k = self.lora_A.shape[0]
        ids = cluster_ids.to(self.lora_A.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
            raise ValueError(f"cluster ids must lie in [0, {k}) for a head with {k} cluster adapters, "
                             f"got {int(ids.min())}..{int(ids.max())}")
        unique, groups = torch.unique(ids, return_inverse=True)
        return self.lora_A[unique], self.lora_B[unique], groups

    def extra_repr(self) -> str:
        return f"k={self.lora_A.shape[0]}, r={self.r}, alpha={self.alpha}"


def condition_groups(
    embeddings: torch.Tensor,
    conditioning: str = "batch",
    cluster_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning vectors and each row's group index.

    ``batch``: the mean of the rows batched together (the paper). With ``cluster_ids``, each
    cluster's rows count as one batch, so a batch mixing clusters gets what batches of one cluster
    each would. ``centroid``: each cluster's centroid (needs ``cluster_ids`` and ``centroids``).
    ``example``: each row on its own.
    """
    n = embeddings.shape[0]
    if conditioning not in CONDITIONING:
        raise ValueError(f"unknown conditioning {conditioning!r}; choose from {CONDITIONING}")
    if conditioning == "example":
        return embeddings, torch.arange(n, device=embeddings.device)
    if cluster_ids is None:
        if conditioning == "centroid":
            raise ValueError("conditioning 'centroid' needs the rows' cluster ids and the centroids")
        return embeddings.mean(0, keepdim=True), torch.zeros(n, dtype=torch.long, device=embeddings.device)
    unique, groups = torch.unique(cluster_ids.to(embeddings.device), return_inverse=True)
    if conditioning == "centroid":
        if centroids is None:
            raise ValueError("conditioning 'centroid' needs the centroids as well as the rows' cluster ids")
        return centroids.to(embeddings)[unique], groups
    sums = torch.zeros(len(unique), embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, groups, embeddings)
    counts = torch.bincount(groups, minlength=len(unique)).to(embeddings.dtype)
    return sums / counts[:, None], groups


def hyper_head(model: nn.Module) -> HyperLoRAHead | None:
    """The model's head if a hyper-network generates its update (``chameleon``, ``chameleon-constant``)."""
    head = model.get_output_embeddings()
    return head if isinstance(head, HyperLoRAHead) else None


def conditioned_head(model: nn.Module) -> ConditionedHead | None:
    """The model's head if its update is chosen per row: it then runs only inside :func:`conditioned`."""
    head = model.get_output_embeddings()
    return head if isinstance(head, ConditionedHead) else None


@contextmanager
def conditioned(
    model: nn.Module,
    embeddings: torch.Tensor,
    conditioning: str = "batch",
    cluster_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
) -> Iterator[None]:
    """Run ``model`` with the adapters chosen for ``embeddings`` (N, d); a no-op without a conditioned head."""
    head = conditioned_head(model)
    if head is None:
        yield
        return
    head.condition(embeddings, conditioning, cluster_ids, centroids)
    try:
        yield
    finally:
        head.clear()


@torch.no_grad()
def adapter_diversity(head: ConditionedHead, centroids: torch.Tensor) -> dict:
    """How much the head's adapters differ across the training clusters (cluster ``c`` conditioned on its centroid).

    With ``dW_c = scale * B_c A_c`` (V x d): the mean and minimum cosine similarity over pairs of
    clusters, and the spread ``sqrt(mean_c ||dW_c - mean dW||^2) / mean_c ||dW_c||``. Cosine 1 and
    spread 0: one adapter for every cluster, whatever the conditioning. No V x d matrix is built:
    ``<B_i A_i, B_j A_j>_F = tr((B_i^T B_j)(A_j A_i^T))`` takes r x r products, in float64 so that
    identical adapters give cosine 1 and spread 0 to rounding. An all-zero adapter counts as orthogonal.
    """
    was_training = head.training
    head.eval()  # the adapters the head serves: no dropout
    try:
        A, B, _ = head.adapters(centroids, "centroid", torch.arange(len(centroids)), centroids)
    finally:
        head.train(was_training)
    k = A.shape[0]
    A, B = A.double(), B.double()  # (k, r, d), (k, V, r)
    BtB = torch.einsum("ivr,jvs->ijrs", B, B)  # (k, k, r, r): B_i^T B_j
    AAt = torch.einsum("ird,jsd->ijrs", A, A)  # (k, k, r, r): A_i A_j^T, the transpose of A_j A_i^T
    gram = head.scale**2 * (BtB * AAt).sum((2, 3))  # (k, k): <dW_i, dW_j>_F
    norms = gram.diagonal().clamp(min=0).sqrt()  # (k,): ||dW_c||_F
    tiny = torch.finfo(gram.dtype).tiny
    cosine = gram / (norms[:, None] * norms[None, :]).clamp(min=tiny)
    pairs = cosine[tuple(torch.triu_indices(k, k, 1))]  # i < j
    spread = (gram.diagonal().mean() - gram.mean()).clamp(min=0).sqrt()  # sqrt(mean_c ||dW_c - mean dW||^2)
    return {
        "clusters": k,
        "mean_cosine": pairs.mean().item() if k > 1 else None,
        "min_cosine": pairs.min().item() if k > 1 else None,
        "relative_spread": (spread / norms.mean().clamp(min=tiny)).item(),
        "mean_norm": norms.mean().item(),
    }
