"""Batch-aware clustering: k-means on input embeddings, and samplers that build batches from it.

Clusters are fitted on the training split; any other input is assigned to its nearest
training centroid, as a deployed model must do. ``fit_clusters`` on an evaluation split
reproduces the published (transductive) behaviour when that is what is wanted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans, kmeans_plusplus
from torch.utils.data import Sampler


@dataclass
class Clusters:
    centroids: torch.Tensor  # (k, d), float32

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def assign(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of each row: (labels, Euclidean distances)."""
        if embeddings.shape[-1] != self.centroids.shape[-1]:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[-1]}, clusters were fitted on {self.centroids.shape[-1]}"
            )
        distances = torch.cdist(embeddings.float(), self.centroids.to(embeddings.device))
        best = distances.min(dim=1)
        return best.indices, best.values


def default_k(n: int, batch_size: int) -> int:
    """The paper's choice: about one batch per cluster."""
    return max(1, n // batch_size)


def fit_clusters(
    embeddings: torch.Tensor, k: int | None = None, batch_size: int = 32, seed: int = 0, n_init: int = 2,
    max_iter: int = 5, seeding_rows: int | None = 2048,
) -> tuple[Clusters, torch.Tensor]:
    """Seeded k-means (scikit-learn, k-means++, best of ``n_init`` runs); returns the clusters and each row's label.

    At the paper's k = N / batch_size the textbook settings take minutes on WikiText-2's 36,718 lines:
    k-means++ makes k passes over the rows it seeds from, so each run seeds from ``seeding_rows``
    random rows (at least two per cluster; ``None``: all rows) with one candidate per centre (the
    original k-means++, not scikit-learn's greedy 2 + ln k candidates), and since Lloyd's first
    iterations do nearly all the work, runs stop after ``max_iter``. At that scale this ends within
    0.2 % of the inertia of seeding on all rows and iterating to convergence (``n_init=3,
    max_iter=100``), in a fortieth of the time. Inputs of at most ``seeding_rows`` rows seed from all
    their rows with scikit-learn's own k-means++.
    """
    n = embeddings.shape[0]
    k = default_k(n, batch_size) if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters from {n} inputs")
    rows = n if seeding_rows is None else min(n, max(seeding_rows, 2 * k))
    init = "k-means++" if rows == n else functools.partial(_seed_from_sample, rows=rows)
    kmeans = KMeans(n_clusters=k, init=init, n_init=n_init, max_iter=max_iter, random_state=seed)
    labels = kmeans.fit_predict(embeddings.float().cpu().numpy())
    return Clusters(torch.from_numpy(kmeans.cluster_centers_).float()), torch.from_numpy(labels).long()


def _seed_from_sample(x: np.ndarray, n_clusters: int, random_state: np.random.RandomState, rows: int) -> np.ndarray:
    """k-means++ centres among ``rows`` random rows, one candidate per centre, in float64 (scikit-learn
    upcasts float32 chunk by chunk)."""
    sample = x[random_state.choice(len(x), rows, replace=False)].astype(np.float64)
    return kmeans_plusplus(sample, n_clusters, random_state=random_state, n_local_trials=1)[0]


class _BatchSampler(Sampler[list[int]]):
    """Seeded, reshuffled each epoch (``set_epoch``), optionally sharded across processes.

    Sharding gives process ``rank`` every ``num_replicas``-th batch; the list is first padded by
    repeating batches so that every process takes the same number of steps.
    """

    def __init__(self, batch_size: int, seed: int, drop_last: bool, num_replicas: int, rank: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _chunk(self, indices: np.ndarray) -> list[list[int]]:
        batches = [indices[i : i + self.batch_size].tolist() for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _all_batches(self) -> list[list[int]]:
        batches = self._batches(np.random.default_rng([self.seed, self.epoch]))
        if self.num_replicas > 1 and batches:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = (batches * math.ceil(total / len(batches)))[:total]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._all_batches())

    def __len__(self) -> int:
        return len(self._all_batches())


class ClusterBatchSampler(_BatchSampler):
    """Every batch holds inputs of one cluster; batch order and membership reshuffle each epoch."""

    def __init__(
        self, labels: torch.Tensor | np.ndarray, batch_size: int, seed: int = 0, drop_last: bool = False,
        num_replicas: int = 1, rank: int = 0,
    ):
        super().__init__(batch_size, seed, drop_last, num_replicas, rank)
        labels = np.asarray(labels)
        self.members = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def _batches(self, rng: np.random.Generator) -> list[list[int]]:
        batches = [b for members in self.members for b in self._chunk(rng.permutation(members))]
        return [batches[i] for i in rng.permutation(len(batches))]


class RandomBatchSampler(_BatchSampler):
    """Plain shuffled batches that ignore clusters (the ablation)."""

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False, num_replicas: int = 1, rank: int = 0
    ):
        super().__init__(batch_size, seed, drop_last, num_replicas, rank)
        self.n = n

    def _batches(self, rng: np.random.Generator) -> list[list[int]]:
        return self._chunk(rng.permutation(self.n))
