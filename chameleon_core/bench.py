"""What ChameleonLLM costs next to the base model and static LoRA: ``python -m chameleon_core bench``.

The hyper-LoRA head adds ``r (d + V)`` multiply-adds per token to the head's ``d V`` (about 0.5 %
at GPT-2 scale) and the hyper-network runs once per group of rows, not per token, so the floor
is small. This measures the real cost of scoring, greedy generation and training, the memory
each needs, the clustering that forms the batches, and a naive head that builds ``W + dW``
(``V x d``) per cluster, which the factored head never does.

A shared machine drifts, so every repeat runs each variant once, in an order that rotates from
one repeat to the next; tables give medians, and ratios are medians of per-repeat ratios.
``--quick`` runs a tiny model and first checks that every timed path computes what it claims.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import sklearn
import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel

from .clustering import fit_clusters
from .embeddings import mean_embedding
from .hyper_head import HyperLoRAHead, conditioned, hyper_head
from .lora import lora_layers, merge_lora
from .models import load_model, resolve_device
from .regimes import AdapterConfig, apply_regime

EMBED_BATCH = 512  # rows embedded at a time, as embed_texts does
TOPICS, TOPIC_WORDS = 512, 64  # cluster structure of the synthetic clustering rows
ROW_TOKENS = 128  # clustering rows hold 1..128 tokens: 65 on average, as WikiText-2's lines in GPT-2 tokens
MIB = 2**20


@dataclass(frozen=True)
class BenchSettings:
    model: str = "random:gpt2"
    device: str = "auto"
    batch: int = 32
    seq: int = 128  # scored and trained tokens per row; generation prompts are seq // 4 long
    new_tokens: int = 32
    repeats: int = 3
    mixed_clusters: int = 4  # clusters sharing one batch in the mixed variants
    rank: int = 4
    cluster_rows: int = 36_718  # WikiText-2's training lines
    kmeans_reference: bool = False  # also time the slow reference k-means and compare inertia
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        return cls(model="random:tiny-gpt2", batch=8, seq=16, new_tokens=4, repeats=1, cluster_rows=1024, quick=True)

    def validate(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.seq < 4 or self.new_tokens < 1:
            raise ValueError(f"--seq must be >= 4 and --new-tokens >= 1, got {self.seq} and {self.new_tokens}")
        if self.batch < self.mixed_clusters:
            raise ValueError(f"--batch must hold the mixed batch's {self.mixed_clusters} clusters, got {self.batch}")


# Throughput ratios that decide whether serving ChameleonLLM is cheap: (section, variant, reference, minimum).
TARGETS = (
    ("scoring", "chameleon-merged", "base", 0.95),
    ("scoring", "chameleon-mixed", "chameleon-merged", 0.90),
    ("generation", "chameleon-merged", "base", 0.95),
    ("generation", "chameleon-mixed", "chameleon-merged", 0.90),
    ("training", "chameleon", "lora", 1 / 1.1),  # a step at most 1.1 x as long as static LoRA's
)
CLUSTERING_TARGET_S = 10.0


# ---------------------------------------------------------------- variants
@dataclass
class Variant:
    model: PreTrainedModel
    about: str
    conditioning: str = "batch"  # of a hyper head (hyper_head.CONDITIONING)
    cluster_ids: torch.Tensor | None = None


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


def adapted(base: PreTrainedModel, regime: str, rank: int) -> PreTrainedModel:
    model = copy.deepcopy(base)
    apply_regime(model, AdapterConfig(regime, rank=rank))
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


@torch.no_grad()
def randomize_adapters(model: PreTrainedModel) -> None:
    """Trained-like adapters: a fresh LoRA is the identity and a fresh hyper head barely moves the
    logits, which would let a wrong path pass a comparison with the base model."""
    for layer in lora_layers(model).values():
        layer.lora_B.normal_(std=0.1)
    head = hyper_head(model)
    if head is not None:
        head.hyper.net[-1].weight.normal_(std=0.2)


def build_variants(base: PreTrainedModel, settings: BenchSettings) -> dict[str, Variant]:
    lora, chameleon = adapted(base, "lora", settings.rank), adapted(base, "chameleon", settings.rank)
    randomize_adapters(lora)
    randomize_adapters(chameleon)
    served, naive = merged(chameleon), dense(merged(chameleon))
    mixed = torch.arange(settings.batch, device=base.device) % settings.mixed_clusters
    n = settings.mixed_clusters
    return {
        "base": Variant(base, "unadapted model"),
        "lora": Variant(lora, "static LoRA on layers and head, unmerged"),
        "lora-merged": Variant(merged(lora), "static LoRA folded into the weights (merge_lora)"),
        "chameleon": Variant(chameleon, "layer LoRA unmerged + factored hyper head, one cluster per batch"),
        "chameleon-merged": Variant(served, "layer LoRA merged + factored hyper head, one cluster per batch"),
        "chameleon-mixed": Variant(served, f"as chameleon-merged, {n} clusters in one batch", "batch", mixed),
        "naive": Variant(naive, "layer LoRA merged + dense W + dW head, one cluster per batch"),
        "naive-mixed": Variant(naive, f"as naive, {n} clusters in one batch (one V x d matrix each)", "batch", mixed),
    }


@contextmanager
def serving(variant: Variant, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """A hyper head's extra work per batch: embed the rows and generate their adapters."""
    if hyper_head(variant.model) is None:
        yield
        return
    embeddings = mean_embedding(variant.model, ids, mask)
    with conditioned(variant.model, embeddings, variant.conditioning, variant.cluster_ids):
        yield


@torch.inference_mode()
def score(variant: Variant, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with serving(variant, ids, mask):
        return variant.model(input_ids=ids, attention_mask=mask).logits


@torch.inference_mode()
def generate(variant: Variant, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, exactly ``new_tokens`` per row, so every variant does the same work."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with serving(variant, ids, mask):
        return variant.model.generate(
            input_ids=ids, attention_mask=mask, pad_token_id=variant.model.config.pad_token_id, **settings
        )


def train_step(variant: Variant, optimizer: torch.optim.Optimizer, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with serving(variant, ids, mask):
        loss = variant.model(input_ids=ids, attention_mask=mask, labels=ids).loss
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


def check_paths(base: PreTrainedModel, variants: dict[str, Variant], settings: BenchSettings,
                ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor) -> list[dict]:
    """Every timed path against the computation it stands for; raises :class:`BenchCheckError` on a mismatch."""
    logits = {name: score(v, ids, mask) for name, v in variants.items()}
    fresh = adapted(base, "lora", settings.rank)
    checks = [
        _check("fresh LoRA (B = 0) equals base", score(Variant(fresh, ""), ids, mask), logits["base"], 1e-6),
        _check("merged fresh LoRA equals base", score(Variant(merged(fresh), ""), ids, mask), logits["base"], 1e-6),
        _check("merged LoRA equals unmerged LoRA", logits["lora-merged"], logits["lora"], 1e-4),
        _check("chameleon with merged layers equals unmerged", logits["chameleon-merged"], logits["chameleon"], 1e-4),
        _check("factored head equals dense W + dW head", logits["chameleon-merged"], logits["naive"], 1e-4),
        _check("mixed factored head equals dense heads", logits["chameleon-mixed"], logits["naive-mixed"], 1e-4),
        _check("adapters change the logits (checks are not vacuous)", logits["chameleon"], logits["base"], 1e-2, False),
        _check("clusters get different adapters", logits["chameleon-mixed"], logits["chameleon-merged"], 1e-2, False),
    ]
    mixed = variants["chameleon-mixed"]
    together = generate(mixed, prompt, torch.ones_like(prompt), settings.new_tokens)
    for cluster in range(settings.mixed_clusters):
        rows = mixed.cluster_ids == cluster
        alone = Variant(mixed.model, "")
        checks.append(_check(f"mixed batch equals cluster {cluster} run alone (scoring)",
                             logits["chameleon-mixed"][rows], score(alone, ids[rows], mask[rows]), 1e-4))
        generated = generate(alone, prompt[rows], torch.ones_like(prompt[rows]), settings.new_tokens)
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


def summarize(seconds: dict, memory: dict, variants: dict[str, Variant], work: int, unit: str, reference: str) -> dict:
    """Medians, throughput, and the median over repeats of each variant's throughput ratio to ``reference``."""
    rows = {}
    for name, times in seconds.items():
        rows[name] = {
            "about": variants[name].about,
            "seconds": times,
            "median_s": statistics.median(times),
            "throughput": work / statistics.median(times),
            "ratio": paired_ratio(seconds[reference], times),
            "peak_memory_mib": memory[name],
            "weights_mib": weights_mib(variants[name].model),
        }
    return {"unit": unit, "work_per_call": work, "reference": reference, "variants": rows}


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


def run_bench(settings: BenchSettings) -> dict:
    """Measure every variant; with ``settings.quick`` first check every path (raises on a failure)."""
    settings.validate()
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    base, _ = load_model(settings.model, device=str(device), seed=settings.seed)
    variants = build_variants(base, settings)
    g = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(base.config.vocab_size, (settings.batch, settings.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    prompt = ids[:, : settings.seq // 4]  # equal lengths, so generate needs no padding
    result = {"machine": describe_machine(device), "settings": asdict(settings), "memory_method": memory_method(device)}
    result["checks"] = check_paths(base, variants, settings, ids, mask, prompt) if settings.quick else []

    scoring = {name: (lambda v=v: score(v, ids, mask)) for name, v in variants.items()}
    result["scoring"] = summarize(*measure(scoring, settings.repeats, device), variants,
                                  settings.batch * settings.seq, "tokens/s", "base")
    generation = {name: (lambda v=v: generate(v, prompt, torch.ones_like(prompt), settings.new_tokens))
                  for name, v in variants.items()}
    result["generation"] = summarize(*measure(generation, settings.repeats, device), variants,
                                     settings.batch * settings.new_tokens, "new tokens/s", "base")
    trained = {name: variants[name] for name in ("lora", "chameleon")}
    steps = {}
    for name, variant in trained.items():
        variant.model.train()
        optimizer = torch.optim.AdamW([p for p in variant.model.parameters() if p.requires_grad], lr=1e-4)
        steps[name] = lambda v=variant, o=optimizer: train_step(v, o, ids, mask)
    result["training"] = summarize(*measure(steps, settings.repeats, device), trained,
                                   settings.batch * settings.seq, "tokens/s", "lora")
    for variant in trained.values():
        variant.model.eval()
    result["clustering"] = time_clustering(base, settings)
    result["targets"] = evaluate_targets(result)
    return result


def evaluate_targets(result: dict) -> list[dict]:
    targets = []
    for section, variant, reference, minimum in TARGETS:
        rows = result[section]["variants"]
        ratio = paired_ratio(rows[reference]["seconds"], rows[variant]["seconds"])
        targets.append({"section": section, "variant": variant, "reference": reference, "value": ratio,
                        "target": f">= {minimum:.3g} x {reference}", "met": ratio >= minimum})
    c = result["clustering"]
    seconds = c["fit_s"] + c["assign_s"]
    targets.append({"section": "clustering", "variant": "k-means fit + assignment", "reference": None, "value": seconds,
                    "target": f"< {CLUSTERING_TARGET_S:g} s", "met": seconds < CLUSTERING_TARGET_S})
    return targets


# ---------------------------------------------------------------- report and command
def format_report(result: dict) -> str:
    settings = result["settings"]
    machine = result["machine"]
    lines = [
        f"{settings['model']} on {machine['device']} ({machine['cpu']}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}); "
        f"median of {settings['repeats']} interleaved repeats",
        f"peak MiB: {result['memory_method'] or 'not measured on this device'}",
    ]
    targets = {(t["section"], t["variant"]): t for t in result["targets"]}
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
    return "\n".join(lines)


def bench_markdown(result: dict) -> str:
    """The README's cost section: the machine, every variant's throughput and ratio, the targets."""
    settings, machine, c = result["settings"], result["machine"], result["clustering"]
    threads = f"{machine['cores']} cores, {machine['torch_threads']} torch threads"
    where = machine["accelerator"] or f"{machine['cpu']}, {threads}"
    lines = [
        f"`{settings['model']}` on {machine['device']} ({where}; torch {machine['torch']}): "
        f"batch {settings['batch']} x {settings['seq']} tokens scored and trained, prompts of "
        f"{settings['seq'] // 4} tokens extended by {settings['new_tokens']} greedy tokens; "
        f"median of {settings['repeats']} interleaved repeats, ratios are medians of per-repeat ratios.",
        "",
        "| Section | Variant | What it runs | Throughput | x reference | Peak MiB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for section in ("scoring", "generation", "training"):
        table = result[section]
        for name, row in table["variants"].items():
            memory = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:,.0f}"
            lines.append(f"| {section} | {name} | {row['about']} | {row['throughput']:,.1f} {table['unit']} | "
                         f"{row['ratio']:.3f} x {table['reference']} | {memory} |")
    lines += ["", "| Target | Measured | Met |", "|---|---:|---|"]
    for target in result["targets"]:
        subject = f"{target['section']}: {target['variant']} {target['target']}"
        value = f"{target['value']:.2f} s" if target["reference"] is None else f"{target['value']:.3f}"
        lines.append(f"| {subject} | {value} | {'yes' if target['met'] else '**no**'} |")
    lines += ["", f"Clustering {c['rows']:,} embeddings of dimension {c['dim']} into k = {c['k']:,} clusters: "
              f"embedding {c['embed_s']:.2f} s, k-means {c['fit_s']:.2f} s, assignment {c['assign_s']:.2f} s."]
    if "reference" in c:
        ref = c["reference"]
        lines.append(f"The reference k-means ({ref['about']}) takes {ref['fit_s']:.1f} s; the fast fit's inertia is "
                     f"{ref['inertia_ratio']:.4f} x the reference's.")
    return "\n".join(lines) + "\n"
