"""What ChameleonLLM costs next to the base model, static LoRA and PEFT: ``python -m chameleon_core bench``.

The hyper-LoRA head adds ``r (d + V)`` multiply-adds per token to the head's ``d V`` (about 0.5 %
at GPT-2 scale) and the hyper-network runs once per group of rows, not per token, so the floor
is small. This measures the real cost of scoring, greedy generation and training, the memory
each needs, the clustering that forms the batches, and a naive head that builds ``W + dW``
(``V x d``) per cluster, which the factored head never does.

Serving mixes clusters in one batch, so scoring is also swept over the number of distinct clusters
in a batch (1, 4, 16, every row its own), as multi-adapter serving systems (Punica, S-LoRA, vLLM)
report it: ChameleonLLM's gathered head, ``lora-per-cluster``'s, PEFT's ``adapter_names`` batch
with one static head LoRA per cluster, and the naive head. ``--models`` measures several shapes in
one run (GPT-2 small's and SmolLM2-135M's), each on its own.

The ``serving`` section serves a trained bundle set to 1, 8 and 24 concurrent clients through the
app's scheduler, with merging on and off, in process and through the page's HTTP API
(:func:`~.serving.measure_serving`): throughput, p50/p95 latency, and every answer checked against
the one its request gets alone. ``--sections serving`` re-measures it alone, keeping the other
sections of an existing ``--json`` file.

A shared machine drifts, so every repeat runs each variant once, in an order that rotates from
one repeat to the next; tables give medians, and ratios are medians of per-repeat ratios.
``--quick`` runs tiny models and first checks that every timed path computes what it claims.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import importlib.util
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import sklearn
import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel

from .bundle import read_bundle_config
from .clustering import fit_clusters
from .demo import open_bundle_set
from .embeddings import mean_embedding
from .hyper_head import ClusterLoRAHead, HyperLoRAHead, conditioned, conditioned_head, hyper_head
from .lora import lora_layers, merge_lora, output_head_name
from .models import load_model, resolve_device
from .regimes import AdapterConfig, apply_regime
from .serving import measure_serving

EMBED_BATCH = 512  # rows embedded at a time, as embed_texts does
TOPICS, TOPIC_WORDS = 512, 64  # cluster structure of the synthetic clustering rows
ROW_TOKENS = 128  # clustering rows hold 1..128 tokens: 65 on average, as WikiText-2's lines in GPT-2 tokens
MIB = 2**20
SWEEP = (1, 4, 16)  # distinct clusters in a scored batch; the sweep ends with every row its own cluster
SECTIONS = ("shapes", "serving")  # shapes: every --models shape measured; serving: a bundle set served to clients
SERVING_TARGET = (24, 2.5)  # 24 concurrent clients served at >= 2.5 x the one-at-a-time rate, answers unchanged


@dataclass(frozen=True)
class BenchSettings:
    models: tuple[str, ...] = ("random:gpt2",)  # each measured on its own, one after the other
    device: str = "auto"
    batch: int = 32
    seq: int = 128  # scored and trained tokens per row; generation prompts are seq // 4 long
    new_tokens: int = 32
    repeats: int = 3
    mixed_clusters: int = 4  # clusters sharing one batch in the mixed generation variants
    rank: int = 4
    cluster_rows: int = 36_718  # WikiText-2's training lines
    kmeans_reference: bool = False  # also time the slow reference k-means and compare inertia
    sections: tuple[str, ...] = ("shapes",)
    serving_set: str = "assets/bundles/smollm2-alpaca"  # the bundle set the serving section serves
    serving_clients: tuple[int, ...] = (1, 8, 24)  # concurrent clients, each sending 2 requests of 2 prompts
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        """Both architectures (GPT-2's and Llama's heads and PEFT wrappers differ), and 20 rows, so that the
        sweep's last point (every row its own cluster) is not its 16-cluster point."""
        return cls(models=("random:tiny-gpt2", "random:tiny-llama"), batch=20, seq=16, new_tokens=4, repeats=1,
                   cluster_rows=1024, serving_clients=(1, 2), quick=True)

    @property
    def sweep(self) -> tuple[int, ...]:
        """Distinct clusters in the batch at each point of the sweep."""
        return tuple(dict.fromkeys((*SWEEP, self.batch)))

    def validate(self) -> None:
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"--models must name one or more different models, got {','.join(self.models)!r}")
        if "shapes" in self.sections and importlib.util.find_spec("peft") is None:
            raise ValueError("the shapes section compares with PEFT's mixed-adapter batches: pip install peft "
                             "(or chameleon-llm[bench]), or measure --sections serving alone")
        if not self.sections or not set(self.sections) <= set(SECTIONS):
            raise ValueError(f"--sections must name some of {', '.join(SECTIONS)}, got {','.join(self.sections)!r}")
        if "serving" in self.sections and not (Path(self.serving_set) / "chameleon").is_dir():
            raise ValueError(f"--serving-set {self.serving_set} is not a bundle set (no chameleon/ in it); "
                             "build one with `python app.py --build-only`")
        if not self.serving_clients or min(self.serving_clients) < 1:
            raise ValueError(f"serving clients must be >= 1, got {self.serving_clients}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.seq < 4 or self.new_tokens < 1:
            raise ValueError(f"--seq must be >= 4 and --new-tokens >= 1, got {self.seq} and {self.new_tokens}")
        if self.batch < max(SWEEP):
            raise ValueError(f"--batch must be >= {max(SWEEP)} (the sweep mixes {', '.join(map(str, SWEEP))} clusters "
                             f"in a batch, then one per row), got {self.batch}")


# Throughput ratios that decide whether serving ChameleonLLM is cheap: (section, variant, reference, minimum).
TARGETS = (
    ("generation", "chameleon-merged", "base", 0.95),
    ("generation", "chameleon-mixed", "chameleon-merged", 0.90),
    ("training", "chameleon", "lora", 1 / 1.1),  # a step at most 1.1 x as long as static LoRA's
)
# Issue 12's, met only if met at every point of the sweep: a mixed batch costs about what the base
# model's does, and no more than PEFT's mixed-adapter batch: (variant, reference, minimum).
SWEEP_TARGETS = (
    ("chameleon-mixed", "base", 0.98),
    ("chameleon-mixed", "peft-mixed", 1.0),
    ("lora-per-cluster", "base", 0.98),
    ("lora-per-cluster", "peft-mixed", 1.0),
)
SCORED = ("base", "lora", "lora-merged", "chameleon")  # scored alone; the mixed heads are scored in the sweep
CLUSTERING_TARGET_S = 10.0


# ---------------------------------------------------------------- variants
@dataclass
class Variant:
    model: PreTrainedModel
    about: str
    conditioning: str = "batch"  # of a conditioned head: hyper_head.CONDITIONING
    cluster_ids: torch.Tensor | None = None  # each row's cluster, in a batch that mixes clusters
    centroids: torch.Tensor | None = None  # what "centroid" conditioning reads
    named_adapters: bool = False  # PEFT: each row names its adapter in the forward call (adapter_names)


class DenseHyperLoRAHead(HyperLoRAHead):
    """The naive head that the factored one avoids: ``W + scale * B_g A_g`` built (V x d) for each group."""

    def condition(
        self,
        embeddings: torch.Tensor,
        conditioning: str = "batch",
        cluster_ids: torch.Tensor | None = None,
        centroids: torch.Tensor | None = None,
    ) -> None:
        super().condition(embeddings, conditioning, cluster_ids, centroids)
        self._weights = [self.base.weight + self.scale * (B @ A) for A, B in zip(self._A, self._B)]

    def clear(self) -> None:
        super().clear()
        self._weights = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if len(self._weights) == 1:
            return F.linear(h, self._weights[0], self.base.bias)
        logits = h.new_empty(*h.shape[:-1], self._weights[0].shape[0])
        for group, weight in enumerate(self._weights):
            rows = self._groups == group
            logits[rows] = F.linear(h[rows], weight, self.base.bias)
        return logits


def adapted(base: PreTrainedModel, regime: str, rank: int, clusters: int = 0) -> PreTrainedModel:
    model = copy.deepcopy(base)
    apply_regime(model, AdapterConfig(regime, rank=rank, clusters=clusters))
    return model


def merged(model: PreTrainedModel) -> PreTrainedModel:
    model = copy.deepcopy(model)
    merge_lora(model)
    return model


def dense(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of a chameleon model whose head materialises its update (same parameters, same outputs)."""
    model = copy.deepcopy(model)
    hyper_head(model).__class__ = DenseHyperLoRAHead
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
    per_cluster = adapted(base, "lora-per-cluster", settings.rank, clusters=settings.batch)
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


# ---------------------------------------------------------------- timing and memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_method(device: torch.device) -> str | None:
    if device.type == "cuda":
        return "growth of torch.cuda.max_memory_allocated over the variant's first (warm-up) call"
    if device.type == "cpu" and os.access("/proc/self/clear_refs", os.W_OK) and platform.libc_ver()[0] == "glibc":
        return ("growth of the process's peak resident set (VmHWM - VmRSS) over the variant's first (warm-up) call, "
                "after malloc_trim and a peak reset through /proc/self/clear_refs: every byte the call touches "
                "(activations, logits, materialised weights, the optimiser state of the first training step), "
                "not the weights the model already holds")
    return None


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def peak_memory(call: Callable[[], object], device: torch.device) -> float | None:
    """MiB that one call needs on top of what is already held (see :func:`memory_method`)."""
    method = memory_method(device)
    if method is None:
        call()
        return None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages must fault in again, or reuse hides them
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) / 1024


def weights_mib(model: PreTrainedModel) -> float:
    """Memory the model's tensors hold, shared storage (a tied head, an unmerged copy) counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()) / MIB


def measure(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Each call's peak memory (on its first, untimed call) and its seconds in each of ``repeats`` rotating rounds."""
    gc.collect()  # once: a full collection takes most of a second with transformers loaded
    memory = {name: peak_memory(call, device) for name, call in calls.items()}
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        start = repeat % len(names)
        for name in names[start:] + names[:start]:
            synchronize(device)
            began = time.perf_counter()
            calls[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - began)
    return seconds, memory


def paired_ratio(reference: list[float], times: list[float]) -> float:
    """Throughput relative to ``reference``: the median of the per-repeat ratios, which cancels drift."""
    return statistics.median(r / t for r, t in zip(reference, times))


def timing(times: list[float], reference: list[float], work: int) -> dict:
    """Seconds per call, their median, throughput, and the median over repeats of the ratio to ``reference``."""
    median = statistics.median(times)
    return {"seconds": times, "median_s": median, "throughput": work / median, "ratio": paired_ratio(reference, times)}


def summarize(seconds: dict, memory: dict, variants: dict[str, Variant], work: int, unit: str, reference: str) -> dict:
    """Each variant's timing (:func:`timing`, the ratio to ``reference``), peak memory and weights."""
    rows = {name: {"about": variant.about, **timing(seconds[name], seconds[reference], work),
                   "peak_memory_mib": memory[name], "weights_mib": weights_mib(variant.model)}
            for name, variant in variants.items()}
    return {"unit": unit, "work_per_call": work, "reference": reference, "variants": rows}


def sweep_key(name: str, clusters: int) -> str:
    """A sweep point's name among the calls timed side by side."""
    return f"{name} @ {clusters}"


def summarize_sweep(seconds: dict, memory: dict, sweep: dict[str, dict[int, Variant]], work: int) -> dict:
    """Each mixed head's timing at each point of the sweep, its ratio to ``base`` timed in the same rounds."""
    rows = {}
    for name, points in sweep.items():
        first = next(iter(points.values()))
        rows[name] = {"about": first.about, "weights_mib": weights_mib(first.model), "points": [
            {"clusters": n, **timing(seconds[sweep_key(name, n)], seconds["base"], work),
             "peak_memory_mib": memory[sweep_key(name, n)]} for n in points]}
    clusters = list(next(iter(sweep.values())))
    return {"unit": "tokens/s", "work_per_call": work, "reference": "base", "clusters": clusters, "variants": rows}


# ---------------------------------------------------------------- clustering
def topical_rows(vocab: int, settings: BenchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with cluster structure, as text has: each row draws about half its tokens from one of
    ``TOPICS`` small vocabularies; lengths are uniform in [1, ROW_TOKENS], the padding masked."""
    g = torch.Generator().manual_seed(settings.seed)
    n, length = settings.cluster_rows, ROW_TOKENS
    words = torch.randint(vocab, (TOPICS, TOPIC_WORDS), generator=g)
    topic = torch.randint(TOPICS, (n, 1), generator=g)
    on_topic = words[topic, torch.randint(TOPIC_WORDS, (n, length), generator=g)]
    anywhere = torch.randint(vocab, (n, length), generator=g)
    ids = torch.where(torch.rand(n, length, generator=g) < 0.5, on_topic, anywhere)
    lengths = torch.randint(1, length + 1, (n, 1), generator=g)
    return ids, (torch.arange(length) < lengths).long()


def time_clustering(model: PreTrainedModel, settings: BenchSettings) -> dict:
    """Embedding, k-means (k = rows // 32) and nearest-centroid assignment of every row."""
    ids, mask = topical_rows(model.config.vocab_size, settings)
    device = model.device
    began, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        chunks = [mean_embedding(model, ids[i : i + EMBED_BATCH].to(device), mask[i : i + EMBED_BATCH].to(device)).cpu()
                  for i in range(0, len(ids), EMBED_BATCH)]
    embeddings = torch.cat(chunks)
    embedded = time.perf_counter()
    clusters, _ = fit_clusters(embeddings, seed=settings.seed)  # the paper's k: one cluster per 32 rows
    fitted = time.perf_counter()
    _, distances = clusters.assign(embeddings)
    assigned = time.perf_counter()
    result = {
        "rows": len(ids), "dim": embeddings.shape[1], "k": clusters.k, "mean_tokens": mask.sum(1).float().mean().item(),
        "embed_s": embedded - began, "fit_s": fitted - embedded, "assign_s": assigned - fitted,
        "total_s": assigned - began, "inertia": (distances.double() ** 2).sum().item(),
        "cpu_s": time.process_time() - cpu,  # all threads: on a busy machine, wall time also counts waiting
    }
    if settings.kmeans_reference:
        began = time.perf_counter()
        reference, _ = fit_clusters(embeddings, seed=settings.seed, n_init=3, max_iter=100, seeding_rows=None)
        result["reference"] = {
            "about": "best of 3 runs seeded on all rows, up to 100 Lloyd iterations",
            "fit_s": time.perf_counter() - began,
            "inertia": (reference.assign(embeddings)[1].double() ** 2).sum().item(),
        }
        result["reference"]["inertia_ratio"] = result["inertia"] / result["reference"]["inertia"]
    return result


# ---------------------------------------------------------------- serving
def bench_serving(settings: BenchSettings) -> dict:
    """The app's scheduler serving ``settings.serving_set`` (real prompts on its real model) to each number
    of ``settings.serving_clients`` concurrent clients, in process and through the page's HTTP API."""
    try:
        import app  # the page lives beside the package, at the repository's root
    except ModuleNotFoundError:
        raise ValueError("the serving section drives the page in app.py: run bench from the repository's root, "
                         "or leave serving out of --sections") from None
    path = Path(settings.serving_set)
    model_name = read_bundle_config(path / "chameleon")["base_model"]
    bundle_set = open_bundle_set(model_name, bundle=path, build=False)
    with app.running(app.Engine.serving(bundle_set)) as url:
        result = measure_serving(bundle_set, clients=settings.serving_clients, max_new_tokens=settings.new_tokens,
                                 url=url)
    clients, minimum = SERVING_TARGET
    for run in result["runs"]:
        if run["mode"] != "one at a time" and run["clients"] == clients:
            run["target"] = {"target": f">= {minimum:g} x one at a time",
                             "met": run["speedup"] >= minimum and run["same_as_alone"] == run["requests"]}
    return {"machine": describe_machine(bundle_set.model.device), "measured": _now(), **result}


# ---------------------------------------------------------------- the whole run
def describe_machine(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "device": str(device),
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def describe_shape(model: PreTrainedModel) -> dict:
    config = model.config
    return {"architecture": config.model_type, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "vocab": config.vocab_size, "parameters": sum(p.numel() for p in model.parameters())}


def run_bench(settings: BenchSettings) -> dict:
    """Measure each section of ``settings.sections``; ``settings.quick`` first checks every path (raises if one fails)."""
    settings.validate()
    device = resolve_device(settings.device)
    result = {"machine": describe_machine(device), "settings": asdict(settings), "measured": _now()}
    if "shapes" in settings.sections:
        began = time.perf_counter()
        # Every model loaded first, so that a bad name fails before the first model's long run, not after it.
        bases = {name: load_model(name, device=str(device), seed=settings.seed)[0] for name in settings.models}
        result |= {"memory_method": memory_method(device),
                   "shapes": {name: bench_shape(base, settings) for name, base in bases.items()},
                   "wall_seconds": time.perf_counter() - began}
    if "serving" in settings.sections:
        began = time.perf_counter()
        result["serving"] = bench_serving(settings)  # on the device load_model picks
        result["serving"]["wall_seconds"] = time.perf_counter() - began
    return result


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def merge_runs(previous: dict, result: dict) -> dict:
    """``result`` with the sections it did not measure taken from ``previous`` (an earlier ``--json``), so
    that one section can be re-measured alone; each section keeps the machine and settings it was measured
    with (the serving section carries its own)."""
    merged = dict(result)
    if "shapes" not in result and "shapes" in previous:
        for key in ("machine", "settings", "measured", "memory_method", "shapes", "wall_seconds"):  # the shapes' own
            merged.pop(key, None)
            if key in previous:
                merged[key] = previous[key]
    if "serving" not in result and "serving" in previous:
        merged["serving"] = previous["serving"]
    return merged


def bench_shape(base: PreTrainedModel, settings: BenchSettings) -> dict:
    """Every section for one model: its ratios compare runs of this model only, made side by side."""
    device = base.device
    torch.manual_seed(settings.seed)
    variants = build_variants(base, settings)
    sweep = sweep_variants(base, variants, settings)
    g = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(base.config.vocab_size, (settings.batch, settings.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    prompt = ids[:, : settings.seq // 4]  # equal lengths, so generate needs no padding
    result = {"shape": describe_shape(base)}
    result["checks"] = check_paths(base, variants, sweep, settings, ids, mask, prompt) if settings.quick else []

    scored = {name: variants[name] for name in SCORED}
    scoring = {name: partial(score, v, ids, mask) for name, v in scored.items()}
    scoring |= {sweep_key(name, n): partial(score, v, ids, mask) for name, points in sweep.items()
                for n, v in points.items()}
    seconds, memory = measure(scoring, settings.repeats, device)  # base and the sweep side by side
    work = settings.batch * settings.seq
    result["scoring"] = summarize(seconds, memory, scored, work, "tokens/s", "base")
    result["sweep"] = summarize_sweep(seconds, memory, sweep, work)
    generation = {name: partial(generate, v, prompt, torch.ones_like(prompt), settings.new_tokens)
                  for name, v in variants.items()}
    result["generation"] = summarize(*measure(generation, settings.repeats, device), variants,
                                     settings.batch * settings.new_tokens, "new tokens/s", "base")
    trained = {name: variants[name] for name in ("lora", "chameleon")}
    steps = {}
    for name, variant in trained.items():
        variant.model.train()
        optimizer = torch.optim.AdamW([p for p in variant.model.parameters() if p.requires_grad], lr=1e-4)
        steps[name] = partial(train_step, variant, optimizer, ids, mask)
    result["training"] = summarize(*measure(steps, settings.repeats, device), trained, work, "tokens/s", "lora")
    for variant in trained.values():
        variant.model.eval()
    result["clustering"] = time_clustering(base, settings)
    result["targets"] = evaluate_targets(result)
    return result


def _sweep_seconds(result: dict, name: str) -> list[list[float]]:
    """``name``'s seconds at each point of the sweep; the reference, timed once, stands beside every point."""
    sweep = result["sweep"]
    if name == sweep["reference"]:
        return [result["scoring"]["variants"][name]["seconds"]] * len(sweep["clusters"])
    return [point["seconds"] for point in sweep["variants"][name]["points"]]


def _target(section: str, variant: str, reference: str | None, value: float, minimum: float, **where) -> dict:
    return {"section": section, "variant": variant, "reference": reference, **where, "value": value,
            "target": f">= {minimum:.3g} x {reference}", "met": value >= minimum}


def evaluate_targets(result: dict) -> list[dict]:
    """One model's targets: :data:`TARGETS`, :data:`SWEEP_TARGETS` at each point, and the clustering time."""
    targets = []
    for section, variant, reference, minimum in TARGETS:
        rows = result[section]["variants"]
        targets.append(_target(section, variant, reference, paired_ratio(rows[reference]["seconds"],
                                                                         rows[variant]["seconds"]), minimum))
    for variant, reference, minimum in SWEEP_TARGETS:
        points = zip(result["sweep"]["clusters"], _sweep_seconds(result, reference), _sweep_seconds(result, variant))
        targets += [_target("sweep", variant, reference, paired_ratio(ref, times), minimum, clusters=n)
                    for n, ref, times in points]
    c = result["clustering"]
    seconds = c["fit_s"] + c["assign_s"]
    targets.append({"section": "clustering", "variant": "k-means fit + assignment", "reference": None, "value": seconds,
                    "target": f"< {CLUSTERING_TARGET_S:g} s", "met": seconds < CLUSTERING_TARGET_S})
    return targets


def sweep_targets(result: dict) -> dict[str, list[dict]]:
    """One model's sweep targets, grouped: ``{"variant >= m x reference": [one target per point]}``."""
    grouped: dict[str, list[dict]] = {}
    for target in result["targets"]:
        if target["section"] == "sweep":
            grouped.setdefault(f"{target['variant']} {target['target']}", []).append(target)
    return grouped


def _missed(points: list[dict]) -> str:
    """``yes`` when every point meets its target, else the points (distinct clusters) that miss it."""
    missed = [str(t["clusters"]) for t in points if not t["met"]]
    return f"no at {', '.join(missed)}" if missed else "yes"


def _shape_title(shape: dict) -> str:
    return (f"{shape['architecture']}, {shape['layers']} layers x {shape['hidden']}, "
            f"vocabulary {shape['vocab']:,}, {shape['parameters'] / 1e6:.1f} M parameters")


# ---------------------------------------------------------------- report and command
def format_report(result: dict) -> str:
    lines = []
    if "shapes" in result:
        settings, machine = result["settings"], result["machine"]
        lines += [f"{machine['device']} ({machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch "
                  f"threads, torch {machine['torch']}); median of {settings['repeats']} interleaved repeats",
                  f"peak MiB: {result['memory_method'] or 'not measured on this device'}"]
        for name, shape in result["shapes"].items():
            lines += ["", f"== {name}: {_shape_title(shape['shape'])}", *_shape_report(shape)]
    if "serving" in result:
        lines += ["", *_serving_report(result["serving"])]
    lines += ["", targets_summary(result).replace("**", "").replace("`", "")]
    return "\n".join(lines).strip("\n")


def _serving_report(serving: dict) -> list[str]:
    s = serving["settings"]
    lines = [f"== serving {s['bundle_set']} ({s['model']}): {s['requests_per_client']} requests of "
             f"{s['prompts_per_request']} prompts per client, {s['max_new_tokens']} new tokens, window {s['window_s']} s",
             f"{'clients':>7} {'mode':14} {'requests/s':>10} {'x alone':>8} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>8} "
             f"{'TTFT p95':>8} {'batches':>7} {'same':>5}  target"]
    for run in serving["runs"]:
        same = f"{run['same_as_alone']}/{run['requests']}" if "same_as_alone" in run else ""
        target = run.get("target")
        goal = f"{target['target']}: {'yes' if target['met'] else 'NO'}" if target else ""
        first = [f"{run[key]:8.2f}" if run.get(key) is not None else f"{'-':>8}"
                 for key in ("first_token_p50_s", "first_token_p95_s")]  # absent in runs measured before streaming
        lines.append(f"{run['clients']:7} {run['mode']:14} {run['requests_per_s']:10.3f} {run['speedup']:8.2f} "
                     f"{run['latency_p50_s']:7.2f} {run['latency_p95_s']:7.2f} {' '.join(first)} "
                     f"{run.get('batches', ''):>7} {same:>5}  {goal}")
    return lines


def _shape_report(result: dict) -> list[str]:
    lines = []
    targets = {(t["section"], t["variant"]): t for t in result["targets"] if t["section"] != "sweep"}
    for section in ("scoring", "generation", "training"):
        table = result[section]
        lines += ["", f"{section}: {table['unit']}, {table['work_per_call']} tokens per call",
                  f"{'variant':18} {table['unit']:>13} {'x ' + table['reference']:>8} {'peak MiB':>9} "
                  f"{'weights MiB':>11}  {'target':28} met"]
        for name, row in table["variants"].items():
            target = targets.get((section, name))
            goal = f"{target['target']} ({target['value']:.3f})" if target else ""
            met = ("yes" if target["met"] else "NO") if target else ""
            memory = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
            lines.append(f"{name:18} {row['throughput']:13,.1f} {row['ratio']:8.3f} {memory:>9} "
                         f"{row['weights_mib']:11.0f}  {goal:28} {met}")
        if section == "scoring":
            sweep = result["sweep"]
            lines += ["", f"sweep: scoring throughput x base, by distinct clusters in a batch of "
                          f"{sweep['clusters'][-1]} rows",
                      f"{'variant':41} " + " ".join(f"{n:>7}" for n in sweep["clusters"])]
            lines += [f"{name:41} " + " ".join(f"{p['ratio']:7.3f}" for p in row["points"])
                      for name, row in sweep["variants"].items()]
            lines += [f"{'target ' + subject:41} " + " ".join(f"{t['value']:7.3f}" for t in points)
                      + f"  {_missed(points)}" for subject, points in sweep_targets(result).items()]
    c = result["clustering"]
    target = targets[("clustering", "k-means fit + assignment")]
    lines += ["", f"clustering: {c['rows']:,} rows x {c['dim']} (mean {c['mean_tokens']:.0f} tokens), k = {c['k']:,}",
              f"embed {c['embed_s']:.2f} s + k-means {c['fit_s']:.2f} s + assign {c['assign_s']:.2f} s "
              f"= {c['total_s']:.2f} s; fit + assign {target['value']:.2f} s (target {target['target']}: "
              f"{'yes' if target['met'] else 'NO'}); "
              f"{c['cpu_s']:.2f} CPU s; inertia {c['inertia']:.1f}"]
    if "reference" in c:
        ref = c["reference"]
        lines.append(f"reference k-means ({ref['about']}): {ref['fit_s']:.1f} s, inertia {ref['inertia']:.1f} "
                     f"(fast / reference = {ref['inertia_ratio']:.4f})")
    if result["checks"]:
        lines += ["", f"correctness: {len(result['checks'])} checks passed"]
    return lines


def bench_markdown(result: dict) -> str:
    """The README's cost section: the machine, then for each model the sweep and its targets, every other
    variant's throughput and ratio, the other targets and the clustering; then serving."""
    summary = targets_summary(result)
    lines = [summary, ""] if summary else []
    if "shapes" in result:
        settings, machine = result["settings"], result["machine"]
        lines += [
            f"On {_where(machine)}: batches of {settings['batch']} rows x {settings['seq']} tokens scored and "
            f"trained, prompts of {settings['seq'] // 4} tokens extended by {settings['new_tokens']} greedy tokens; "
            f"median of {settings['repeats']} interleaved repeats, ratios are medians of per-repeat ratios"
            + (f"; {result['wall_seconds'] / 60:.0f} min in all." if "wall_seconds" in result else ".")
        ]
        for name, shape in result["shapes"].items():
            lines += ["", f"### `{name}`: {_shape_title(shape['shape'])}", "", *_shape_markdown(shape)]
    if "serving" in result:
        lines += ["", *_serving_markdown(result["serving"])]
    return "\n".join(lines).strip("\n") + "\n"


def targets_summary(result: dict) -> str:
    """One sentence: how many of the measured targets are met, and which are not (each shape's sweep
    target counts once, met only if met at every point); empty when nothing measured has a target."""
    verdicts = []  # (subject, met)
    for name, shape in result.get("shapes", {}).items():
        verdicts += [(f"{name} sweep: {subject}", _missed(points) == "yes")
                     for subject, points in sweep_targets(shape).items()]
        verdicts += [(f"{name} {t['section']}: {t['variant']} {t['target']}", t["met"])
                     for t in shape["targets"] if t["section"] != "sweep"]
    verdicts += [(f"serving, {run['clients']} clients, {run['mode']}: {run['target']['target']}", run["target"]["met"])
                 for run in result.get("serving", {}).get("runs", []) if "target" in run]
    if not verdicts:
        return ""
    missed = [subject for subject, met in verdicts if not met]
    text = f"**Targets: {len(verdicts) - len(missed)} of {len(verdicts)} met.**"
    return text + (f" Not met: {'; '.join(f'`{m}`' for m in missed)}." if missed else "")


def _where(machine: dict) -> str:
    where = machine["accelerator"] or f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads"
    return f"{machine['device']} ({where}; torch {machine['torch']})"


def _serving_markdown(serving: dict) -> list[str]:
    s = serving["settings"]
    lines = [
        f"### Serving `{s['bundle_set']}` ({s['model']}) to concurrent clients",
        "",
        f"On {_where(serving['machine'])}"
        + (f", {serving['wall_seconds'] / 60:.0f} min in all" if "wall_seconds" in serving else "")
        + f". Each client sends {s['requests_per_client']} requests of "
        f"{s['prompts_per_request']} prompts one after another (every other one sampled with its own seed; "
        f"{s['max_new_tokens']} new tokens from each of base, static LoRA and ChameleonLLM); all clients start "
        f"together. *One at a time*: the scheduler never merges, so each request runs alone, and its answers are "
        f"the reference. *Merged*: requests arriving within {s['window_s'] * 1000:g} ms, or while a batch runs, share "
        f"one mixed-cluster batch per model (at most {s['max_batch']} prompts). *HTTP*: the same requests through the "
        "page's `/compare` API (Gradio's queue in front of the merging scheduler).",
        "",
        "| Clients | Mode | Requests/s | x one at a time | p50 latency | p95 latency | p50 first token | "
        "p95 first token | Model batches | Answers as alone |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in serving["runs"]:
        same = f"{run['same_as_alone']} / {run['requests']}" if "same_as_alone" in run else "(reference)"
        first = [f"{run[key]:.1f} s" if run.get(key) is not None else "-"  # "-": measured before answers streamed
                 for key in ("first_token_p50_s", "first_token_p95_s")]
        lines.append(f"| {run['clients']} | {run['mode']} | {run['requests_per_s']:.3f} | {run['speedup']:.2f} | "
                     f"{run['latency_p50_s']:.1f} s | {run['latency_p95_s']:.1f} s | {first[0]} | {first[1]} | "
                     f"{run.get('batches', '-')} | {same} |")
    targeted = [run for run in serving["runs"] if "target" in run]
    if targeted:
        clients = targeted[0]["clients"]
        lines += ["", f"| Target: {clients} clients | Measured | Met |", "|---|---:|---|"]
        lines += [f"| {run['mode']}: {run['target']['target']}, every answer as alone | {run['speedup']:.2f}, "
                  f"{run['same_as_alone']} / {run['requests']} | {'yes' if run['target']['met'] else '**no**'} |"
                  for run in targeted]
    return lines


def _shape_markdown(result: dict) -> list[str]:
    sweep, c = result["sweep"], result["clustering"]
    clusters = sweep["clusters"]
    base = result["scoring"]["variants"]["base"]
    columns = [f"{n} (every row)" if n == clusters[-1] else str(n) for n in clusters]
    lines = [
        f"Scoring with n distinct clusters in one batch (row i in cluster i mod n): throughput as a multiple of the "
        f"base model's ({base['throughput']:,.1f} {sweep['unit']}), timed in the same rounds.",
        "",
        f"| Variant | What it runs | {' | '.join(columns)} | Peak MiB at {clusters[-1]} |",
        "|---|---|" + "---:|" * (len(clusters) + 1),
    ]
    for name, row in sweep["variants"].items():
        memory = row["points"][-1]["peak_memory_mib"]
        lines.append(f"| {name} | {row['about']} | " + " | ".join(f"{p['ratio']:.3f}" for p in row["points"])
                     + f" | {'-' if memory is None else f'{memory:,.0f}'} |")
    lines += ["", f"| Target, at every point | {' | '.join(map(str, clusters))} | Met |",
              "|---|" + "---:|" * len(clusters) + "---|"]
    for subject, points in sweep_targets(result).items():
        met = _missed(points)
        lines.append(f"| {subject} | " + " | ".join(f"{t['value']:.3f}" for t in points)
                     + f" | {met if met == 'yes' else f'**{met}**'} |")
    noise = result["scoring"]["variants"].get("lora-merged")
    if noise is not None:
        lines += ["", f"How much two runs of the same work differ here: `lora-merged` does exactly the base model's "
                      f"work and scored {noise['ratio']:.3f} x base in the same rounds."]
    lines += ["", "| Section | Variant | What it runs | Throughput | x reference | Peak MiB |",
              "|---|---|---|---:|---:|---:|"]
    for section in ("scoring", "generation", "training"):
        table = result[section]
        for name, row in table["variants"].items():
            memory = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:,.0f}"
            lines.append(f"| {section} | {name} | {row['about']} | {row['throughput']:,.1f} {table['unit']} | "
                         f"{row['ratio']:.3f} x {table['reference']} | {memory} |")
    lines += ["", "| Target | Measured | Met |", "|---|---:|---|"]
    for target in result["targets"]:
        if target["section"] == "sweep":
            continue
        subject = f"{target['section']}: {target['variant']} {target['target']}"
        value = f"{target['value']:.2f} s" if target["reference"] is None else f"{target['value']:.3f}"
        lines.append(f"| {subject} | {value} | {'yes' if target['met'] else '**no**'} |")
    lines += ["", f"Clustering {c['rows']:,} embeddings of dimension {c['dim']} into k = {c['k']:,} clusters: "
              f"embedding {c['embed_s']:.2f} s, k-means {c['fit_s']:.2f} s, assignment {c['assign_s']:.2f} s."]
    if "reference" in c:
        ref = c["reference"]
        lines.append(f"The reference k-means ({ref['about']}) takes {ref['fit_s']:.1f} s; the fast fit's inertia is "
                     f"{ref['inertia_ratio']:.4f} x the reference's.")
    return lines
