"""The implementations that ``bench`` times, and the checks that each computes what it claims to (``--quick``).

The base model, static LoRA (unmerged and merged), ChameleonLLM's factored hyper-LoRA head (one cluster
per batch, and several mixed in one batch), PEFT's mixed-adapter batch (one static head LoRA per
cluster, each row naming its own) and a naive head that builds ``W + dW`` (``V x d``) per cluster,
which the factored head never does: each a :class:`Variant`, scored, generated and trained the same way.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .embeddings import mean_embedding
from .hyper_head import ClusterLoRAHead, ConditionedHead, HyperLoRAHead, conditioned, conditioned_head, hyper_head
from .lora import lora_layers, merge_lora, output_head_name
from .regimes import AdapterConfig, apply_regime

if TYPE_CHECKING:
    from .bench import BenchSettings

# ---------------------------------------------------------------- variants
@dataclass
class Variant:
    model: PreTrainedModel
    about: str
    conditioning: str = "batch"  # of a conditioned head: hyper_head.CONDITIONING
    cluster_ids: torch.Tensor | None = None  # each row's cluster, in a batch that mixes clusters
    centroids: torch.Tensor | None = None  # what "centroid" conditioning reads
    named_adapters: bool = False  # PEFT: each row names its adapter in the forward call (adapter_names)


class DenseHead(ConditionedHead):
    """The naive head that the factored one avoids: the wrapped head's adapters applied as ``W + scale * B_g A_g``,
    built (V x d) for each group. Same parameters (those of the head it wraps), same outputs."""

    unconditioned_error = HyperLoRAHead.unconditioned_error

    def __init__(self, head: ConditionedHead):
        super().__init__(head.base, head.r, head.alpha)
        self.head = head
        self.weights: list[torch.Tensor] | None = None
        self.groups: torch.Tensor | None = None

    def adapters(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head.adapters(*args, **kwargs)

    def condition(self, *args, **kwargs) -> None:
        """As :meth:`ConditionedHead.condition`, then each group's ``W + scale * B_g A_g`` built in full."""
        A, B, groups = self.adapters(*args, **kwargs)
        self.weights = [self.base.weight + self.scale * (b @ a) for a, b in zip(A, B)]  # each (V, d)
        self.groups = groups.to(self.base.weight.device)

    def clear(self) -> None:
        self.weights = self.groups = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError(self.unconditioned_error)
        if len(self.weights) == 1:
            return F.linear(h, self.weights[0], self.base.bias)
        logits = h.new_empty(*h.shape[:-1], self.weights[0].shape[0])
        for group, weight in enumerate(self.weights):
            rows = self.groups == group
            logits[rows] = F.linear(h[rows], weight, self.base.bias)
        return logits


def adapted(base: PreTrainedModel, regime: str, rank: int, k: int = 0) -> PreTrainedModel:
    model = copy.deepcopy(base)
    apply_regime(model, AdapterConfig(regime, rank=rank, k=k))
    return model


def merged(model: PreTrainedModel) -> PreTrainedModel:
    model = copy.deepcopy(model)
    merge_lora(model)
    return model


def dense(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of a chameleon model whose head materialises its update (same parameters, same outputs)."""
    model = copy.deepcopy(model)
    model.set_output_embeddings(DenseHead(hyper_head(model)))
    return model


def adapter_name(cluster: int) -> str:
    return f"cluster{cluster}"


def peft_heads(base: PreTrainedModel, clusters: int, rank: int) -> PreTrainedModel:
    """PEFT's multi-adapter serving: one static LoRA on the head per cluster, each row choosing its own by name."""
    from peft import LoraConfig, get_peft_model  # imported here: only the bench needs PEFT

    config = LoraConfig(r=rank, lora_alpha=AdapterConfig().alpha, target_modules=[output_head_name(base)],
                        init_lora_weights=False)  # random B: a fresh adapter (B = 0) would not change the logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head is tied (it only reads the weight); a deprecation inside PEFT
        model = get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name(0))
        for cluster in range(1, clusters):
            model.add_adapter(adapter_name(cluster), config)
    return model.eval()


@torch.no_grad()
def randomize_adapters(model: PreTrainedModel) -> None:
    """Trained-like adapters: a fresh LoRA is the identity and a fresh hyper head barely moves the
    logits, which would let a wrong path pass a comparison with the base model."""
    for layer in lora_layers(model).values():
        layer.lora_B.normal_(std=0.1)
    head = conditioned_head(model)
    if isinstance(head, HyperLoRAHead):
        head.hyper.net[-1].weight.normal_(std=0.2)
    elif isinstance(head, ClusterLoRAHead):
        head.lora_B.normal_(std=0.1)


def rows_in_clusters(batch: int, clusters: int, device: torch.device) -> torch.Tensor:
    """Row ``i`` in cluster ``i mod clusters``: every cluster present, none a contiguous slice of the batch."""
    return torch.arange(batch, device=device) % clusters


def random_centroids(base: PreTrainedModel, count: int, seed: int) -> torch.Tensor:
    """Unit vectors, as the normalised embeddings k-means groups: what ``centroid`` conditioning reads."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(count, base.get_input_embeddings().embedding_dim, generator=g)
    return F.normalize(centroids, dim=1).to(base.device)


def build_variants(base: PreTrainedModel, settings: BenchSettings) -> dict[str, Variant]:
    """The variants timed one by one; the mixed ones hold ``settings.mixed_clusters`` clusters."""
    lora, chameleon = adapted(base, "lora", settings.rank), adapted(base, "chameleon", settings.rank)
    randomize_adapters(lora)
    randomize_adapters(chameleon)
    served, naive = merged(chameleon), dense(merged(chameleon))
    n = settings.mixed_clusters
    mixed = dict(conditioning="centroid", cluster_ids=rows_in_clusters(settings.batch, n, base.device),
                 centroids=random_centroids(base, settings.batch, settings.seed))
    return {
        "base": Variant(base, "unadapted model"),
        "lora": Variant(lora, "static LoRA on layers and head, unmerged"),
        "lora-merged": Variant(merged(lora), "static LoRA folded into the weights (merge_lora)"),
        "chameleon": Variant(chameleon, "layer LoRA unmerged + factored hyper head, one cluster per batch"),
        "chameleon-merged": Variant(served, "layer LoRA merged + factored hyper head, one cluster per batch"),
        "chameleon-mixed": Variant(served, f"as chameleon-merged, {n} clusters in one batch", **mixed),
        "naive": Variant(naive, "layer LoRA merged + dense W + dW head, one cluster per batch"),
        "naive-mixed": Variant(naive, f"as naive, {n} clusters in one batch (one V x d matrix each)", **mixed),
    }


def sweep_variants(base: PreTrainedModel, variants: dict[str, Variant],
                   settings: BenchSettings) -> dict[str, dict[int, Variant]]:
    """Each mixed-batch head at each point of the sweep: ``{variant: {distinct clusters: Variant}}``.

    Every layer does the base model's work (LoRA merged, or none), so only the heads differ; the heads
    are those of ``chameleon-merged`` and ``naive``, and static heads holding an adapter per row of the batch.
    """
    per_cluster = adapted(base, "lora-per-cluster", settings.rank, k=settings.batch)
    randomize_adapters(per_cluster)
    merge_lora(per_cluster)
    peft = peft_heads(base, settings.batch, settings.rank)
    heads = {
        "chameleon-mixed": (variants["chameleon-merged"].model,
                            "ChameleonLLM: each row gathers its cluster's generated A and B, one pass"),
        "lora-per-cluster": (per_cluster, "a static head LoRA per cluster, gathered per row the same way, one pass"),
        "peft-mixed": (peft, "PEFT: a static head LoRA per cluster, forward(adapter_names=...): "
                             "a LoRA pass per adapter over its rows"),
        "naive-mixed": (variants["naive"].model, "W + dW built (V x d) per cluster; each cluster's rows through it"),
    }
    centroids = variants["chameleon-mixed"].centroids
    return {name: {n: Variant(model, about, "centroid", rows_in_clusters(settings.batch, n, base.device), centroids,
                              named_adapters=model is peft)
                   for n in settings.sweep}
            for name, (model, about) in heads.items()}


def alone(variant: Variant, cluster: int) -> Variant:
    """``variant`` for one cluster's rows in a batch of their own, with that cluster's adapter: what the mixed
    batch must give those rows. PEFT's is its active adapter (no ``adapter_names``), left active afterwards."""
    if variant.named_adapters:
        variant.model.set_adapter(adapter_name(cluster))
        return replace(variant, cluster_ids=None)
    return replace(variant, cluster_ids=variant.cluster_ids[variant.cluster_ids == cluster])


@contextmanager
def serving(variant: Variant, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[dict]:
    """A variant's own work per batch, yielding what its forward pass takes besides the tokens: a conditioned
    head embeds the rows (as a server must, to assign them) and chooses their adapters; PEFT takes each row's
    adapter name."""
    if variant.named_adapters:
        names = None if variant.cluster_ids is None else [adapter_name(c) for c in variant.cluster_ids.tolist()]
        yield {} if names is None else {"adapter_names": names}
    elif conditioned_head(variant.model) is None:
        yield {}
    else:
        embeddings = mean_embedding(variant.model, ids, mask)
        with conditioned(variant.model, embeddings, variant.conditioning, variant.cluster_ids, variant.centroids):
            yield {}


@torch.inference_mode()
def score(variant: Variant, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with serving(variant, ids, mask) as extra:
        return variant.model(input_ids=ids, attention_mask=mask, **extra).logits


@torch.inference_mode()
def generate(variant: Variant, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, exactly ``new_tokens`` per row, so every variant does the same work."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with serving(variant, ids, mask) as extra:
        return variant.model.generate(
            input_ids=ids, attention_mask=mask, pad_token_id=variant.model.config.pad_token_id, **settings, **extra
        )


def train_step(variant: Variant, optimizer: torch.optim.Optimizer, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with serving(variant, ids, mask) as extra:
        loss = variant.model(input_ids=ids, attention_mask=mask, labels=ids, **extra).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def head_step(variant: Variant, optimizer: torch.optim.Optimizer, ids: torch.Tensor, mask: torch.Tensor,
              hidden: torch.Tensor) -> None:
    """A head-only regime's training step on the transformer's cached hidden states (``hidden``, (B, T, d);
    :mod:`.features`): the head's logits, its adapters and their gradients, nothing of the transformer."""
    with serving(variant, ids, mask):  # a conditioned head: the rows' condition
        logits = variant.model.get_output_embeddings()(hidden)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- correctness (--quick)
class BenchCheckError(AssertionError):
    """A timed path does not compute what it claims to."""


def _check(name: str, a: torch.Tensor, b: torch.Tensor, bound: float, equal: bool = True) -> dict:
    diff = (a.float() - b.float()).abs().max().item()
    return {"name": name, "max_abs_diff": diff, "bound": bound, "kind": "<=" if equal else ">=",
            "passed": diff <= bound if equal else diff >= bound}


def per_cluster(variant: Variant, mixed: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed batch's logits ``mixed`` and each cluster's rows scored alone (:func:`alone`), grouped by cluster."""
    clusters = variant.cluster_ids.unique().tolist()
    together = torch.cat([mixed[variant.cluster_ids == c] for c in clusters])
    apart = [score(alone(variant, c), ids[variant.cluster_ids == c], mask[variant.cluster_ids == c]) for c in clusters]
    return together, torch.cat(apart)


def check_paths(base: PreTrainedModel, variants: dict[str, Variant], sweep: dict[str, dict[int, Variant]],
                settings: BenchSettings, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor) -> list[dict]:
    """Every timed path against the computation it stands for; raises :class:`BenchCheckError` on a mismatch."""
    logits = {name: score(v, ids, mask) for name, v in variants.items()}
    fresh = adapted(base, "lora", settings.rank)
    checks = [
        _check("fresh LoRA (B = 0) equals base", score(Variant(fresh, ""), ids, mask), logits["base"], 1e-6),
        _check("merged fresh LoRA equals base", score(Variant(merged(fresh), ""), ids, mask), logits["base"], 1e-6),
        _check("merged LoRA equals unmerged LoRA", logits["lora-merged"], logits["lora"], 1e-4),
        _check("chameleon with merged layers equals unmerged", logits["chameleon-merged"], logits["chameleon"], 1e-4),
        _check("factored head equals dense W + dW head", logits["chameleon-merged"], logits["naive"], 1e-4),
        _check("adapters change the logits (checks are not vacuous)", logits["chameleon"], logits["base"], 1e-2, False),
        _check("clusters get different adapters", logits["chameleon-mixed"], logits["chameleon-merged"], 1e-2, False),
    ]
    for name, points in sweep.items():
        swept = {n: score(variant, ids, mask) for n, variant in points.items()}
        for n, variant in points.items():
            checks.append(_check(f"{name}: {n} clusters in a batch equal each cluster run alone",
                                 *per_cluster(variant, swept[n], ids, mask), 1e-4))
        if name == "naive-mixed":
            checks += [_check(f"naive-mixed equals chameleon-mixed, {n} clusters", swept[n],
                              score(sweep["chameleon-mixed"][n], ids, mask), 1e-4) for n in points]
        else:  # every row its own cluster vs all rows in cluster 0
            first, last = settings.sweep[0], settings.sweep[-1]
            checks.append(_check(f"{name}: clusters get different adapters", swept[last], swept[first], 1e-2, False))
    mixed = variants["chameleon-mixed"]
    together = generate(mixed, prompt, torch.ones_like(prompt), settings.new_tokens)
    for cluster in mixed.cluster_ids.unique().tolist():
        rows = mixed.cluster_ids == cluster
        generated = generate(alone(mixed, cluster), prompt[rows], torch.ones_like(prompt[rows]), settings.new_tokens)
        checks.append(_check(f"mixed batch equals cluster {cluster} run alone (greedy tokens)",
                             together[rows], generated, 0.0))
    failed = [c for c in checks if not c["passed"]]
    if failed:
        lines = [f"  {c['name']}: max |diff| {c['max_abs_diff']:.3g}, not {c['kind']} {c['bound']:g}" for c in failed]
        raise BenchCheckError(f"{len(failed)} correctness check(s) failed:\n" + "\n".join(lines))
    return checks
