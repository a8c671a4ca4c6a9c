"""k-means on input embeddings, nearest-centroid assignment, and cluster-homogeneous batch samplers."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from chameleon_core import ClusterBatchSampler, RandomBatchSampler, default_k, embed_texts, fit_clusters
from chameleon_core.data import synthetic_records

SIZES = (7, 12, 3, 20)  # uneven clusters: full batches, short batches, a cluster smaller than a batch
BATCH = 5


def blobs(n_per_blob: int = 40, k: int = 4, dim: int = 16, noise: float = 0.05) -> tuple[torch.Tensor, np.ndarray]:
    centers = torch.nn.functional.normalize(torch.randn(k, dim), dim=-1) * 3
    truth = np.repeat(np.arange(k), n_per_blob)
    return centers[truth] + noise * torch.randn(len(truth), dim), truth


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(len(SIZES)), SIZES))


def purity(truth, labels) -> float:
    pairs = Counter(zip(np.asarray(labels).tolist(), truth))
    best = Counter()
    for (cluster, _), count in pairs.items():
        best[cluster] = max(best[cluster], count)
    return sum(best.values()) / len(truth)


def test_well_separated_blobs_are_recovered():
    embeddings, truth = blobs()
    clusters, labels = fit_clusters(embeddings, k=4)
    assert clusters.centroids.shape == (4, 16) and clusters.centroids.dtype == torch.float32
    assert adjusted_rand_score(truth, labels.numpy()) == 1.0


def test_synthetic_domains_cluster_far_above_chance(tiny):
    """Even random token embeddings separate the six vocabularies (chance purity is 1/6)."""
    model, tokenizer = tiny
    records = synthetic_records(n_per_domain=20)
    _, labels = fit_clusters(embed_texts(model, tokenizer, [r.text for r in records]), k=6)
    assert purity([r.label for r in records], labels) > 0.5


def test_default_k_is_one_batch_per_cluster():
    assert default_k(100, 32) == 3 and default_k(10, 32) == 1
    clusters, labels = fit_clusters(torch.randn(100, 8), batch_size=32)
    assert clusters.k == 3 and set(labels.tolist()) == {0, 1, 2}


def test_impossible_k_raises():
    with pytest.raises(ValueError, match="cannot make 11 clusters from 10 inputs"):
        fit_clusters(torch.randn(10, 4), k=11)


def test_fitting_is_seeded():
    embeddings = torch.randn(90, 8)
    first, again, other = (fit_clusters(embeddings, k=5, seed=s) for s in (1, 1, 2))
    assert torch.equal(first[0].centroids, again[0].centroids) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0].centroids, other[0].centroids)


def test_assign_returns_the_nearest_centroid():
    clusters, fitted = fit_clusters(torch.randn(60, 8), k=6)
    new = torch.randn(200, 8)
    labels, distances = clusters.assign(new)
    squared = ((new[:, None, :] - clusters.centroids[None]) ** 2).sum(-1)
    assert torch.equal(labels, squared.argmin(1))
    torch.testing.assert_close(distances, squared.min(1).values.sqrt())
    assert torch.equal(clusters.assign(clusters.centroids)[0], torch.arange(6))


def test_assign_rejects_another_dimension():
    clusters, _ = fit_clusters(torch.randn(20, 8), k=2)
    with pytest.raises(ValueError, match="dimension 9, clusters were fitted on 8"):
        clusters.assign(torch.randn(3, 9))


def batches(sampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_cluster_sampler_covers_every_index_once_in_single_cluster_batches(labels):
    sampler = ClusterBatchSampler(torch.from_numpy(labels), BATCH)
    epoch = batches(sampler)
    assert sorted(i for b in epoch for i in b) == list(range(len(labels)))
    assert all(len(set(labels[b])) == 1 for b in epoch)
    assert len(sampler) == len(epoch) == sum(math.ceil(s / BATCH) for s in SIZES)


def test_cluster_sampler_reshuffles_per_epoch_and_is_seeded(labels):
    sampler = ClusterBatchSampler(labels, BATCH, seed=3)
    first = batches(sampler)
    sampler.set_epoch(1)
    second = batches(sampler)
    assert sorted(map(sorted, first)) != sorted(map(sorted, second))  # membership changes
    cluster_order = [[labels[b[0]] for b in epoch] for epoch in (first, second)]
    assert cluster_order[0] != sorted(cluster_order[0]) and cluster_order[0] != cluster_order[1]  # so does order
    again = ClusterBatchSampler(labels, BATCH, seed=3)
    again.set_epoch(1)
    assert batches(again) == second
    assert batches(ClusterBatchSampler(labels, BATCH, seed=4)) != first


def test_cluster_sampler_drop_last_drops_only_short_batches(labels):
    epoch = batches(ClusterBatchSampler(labels, BATCH, drop_last=True))
    assert all(len(b) == BATCH for b in epoch)
    assert len(epoch) == sum(s // BATCH for s in SIZES)
    kept = Counter(labels[[i for b in epoch for i in b]].tolist())
    assert all(kept[c] == s - s % BATCH for c, s in enumerate(SIZES))


@pytest.mark.parametrize("sampler_cls", [ClusterBatchSampler, RandomBatchSampler])
def test_sharding_gives_equal_lengths_and_covers_every_batch(labels, sampler_cls):
    source = labels if sampler_cls is ClusterBatchSampler else len(labels)
    whole = batches(sampler_cls(source, BATCH, seed=1))
    shards = [batches(sampler_cls(source, BATCH, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(whole) / 2)
    assert {tuple(b) for shard in shards for b in shard} == {tuple(b) for b in whole}
    assert len(shards[0]) + len(shards[1]) - len(whole) == len(whole) % 2  # padded by repeats only as needed


def test_sampler_arguments_are_checked(labels):
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ClusterBatchSampler(labels, BATCH, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        RandomBatchSampler(10, 0)


def test_random_sampler_basics():
    sampler = RandomBatchSampler(23, BATCH, seed=0)
    epoch = batches(sampler)
    assert sorted(i for b in epoch for i in b) == list(range(23))
    assert len(sampler) == 5 and [len(b) for b in epoch] == [5, 5, 5, 5, 3]
    assert epoch != list(map(list, np.arange(25).reshape(5, 5)))  # shuffled
    assert batches(RandomBatchSampler(23, BATCH, seed=0)) == epoch
    sampler.set_epoch(1)
    assert batches(sampler) != epoch
    assert [len(b) for b in RandomBatchSampler(23, BATCH, drop_last=True)] == [5, 5, 5, 5]


def test_sampler_drives_a_dataloader(labels):
    loader = torch.utils.data.DataLoader(torch.arange(len(labels)), batch_sampler=ClusterBatchSampler(labels, BATCH))
    assert all(len(set(labels[b.numpy()])) == 1 for b in loader)
