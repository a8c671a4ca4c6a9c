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
(:func:`~.serving.measure_serving`; the page runs as its own process): throughput, p50/p95 latency,
and every answer checked against the one its request gets alone. ``--sections serving`` re-measures
it alone, keeping the other sections of an existing ``--json`` file.

The variants timed and their correctness checks are in :mod:`.variants`, the clock and the memory
probes in :mod:`.timing`, the text and markdown of the results in :mod:`.report`. ``--quick`` runs
tiny models and first checks that every timed path computes what it claims.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import sklearn
import torch
import transformers
from transformers import PreTrainedModel

from .bundle import read_bundle_config
from .clustering import fit_clusters
from .bundle_set import open_bundle_set
from .embeddings import mean_embedding
from .models import load_model, resolve_device
from .serving import measure_serving
from .timing import measure, memory_method, paired_ratio, summarize, summarize_sweep, sweep_key
from .variants import (
    Variant, adapted, build_variants, check_paths, generate, head_step, randomize_adapters, score, sweep_variants,
    train_step,
)

EMBED_BATCH = 512  # rows embedded at a time, as embed_texts does
TOPICS, TOPIC_WORDS = 512, 64  # cluster structure of the synthetic clustering rows
ROW_TOKENS = 128  # clustering rows hold 1..128 tokens: 65 on average, as WikiText-2's lines in GPT-2 tokens
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
PAGE = Path(__file__).resolve().parents[1] / "app.py"  # the page lives beside the package, at the repository's root


def bench_serving(settings: BenchSettings) -> dict:
    """The app's scheduler serving ``settings.serving_set`` (real prompts on its real model) to each number
    of ``settings.serving_clients`` concurrent clients, in process and through the page's HTTP API (the page
    runs as its own process, as it does for visitors: this package never imports it)."""
    path = Path(settings.serving_set)
    model_name = read_bundle_config(path / "chameleon")["base_model"]
    bundle_set = open_bundle_set(model_name, bundle=path, build=False)
    with page(path, model_name) as url:
        result = measure_serving(bundle_set, clients=settings.serving_clients, max_new_tokens=settings.new_tokens,
                                 url=url)
    clients, minimum = SERVING_TARGET
    for run in result["runs"]:
        if run["mode"] != "one at a time" and run["clients"] == clients:
            run["target"] = {"target": f">= {minimum:g} x one at a time",
                             "met": run["speedup"] >= minimum and run["same_as_alone"] == run["requests"]}
    return {"machine": describe_machine(bundle_set.model.device), "measured": _now(), **result}


@contextmanager
def page(bundle_set: Path, model_name: str, timeout: float = 900.0) -> Iterator[str]:
    """``python app.py`` serving ``bundle_set`` on a free local port, in its own process: yields its URL once
    it answers a request (the models loaded), and stops it afterwards."""
    if not PAGE.is_file():
        raise ValueError(f"the serving section drives the page, {PAGE.name} beside the package, and there is none at "
                         f"{PAGE.parent}: run bench from a checkout of the repository, or leave serving out of --sections")
    from gradio_client import Client  # only the serving section needs it

    with socket.socket() as probe:  # a port free now; the page binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(PAGE), "--model", model_name, "--bundle", str(bundle_set), "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) as process:
        try:
            deadline = time.monotonic() + timeout
            while True:  # up once a request gets answers (until then: no server, or the models still loading)
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the page ({' '.join(command)}) did not start: {log.read()[-2000:]}")
                try:
                    Client(url, verbose=False).predict("Hi", "trained", 1, 1, "greedy", 0, api_name="/compare")
                    break
                except Exception:  # noqa: BLE001 (not up yet: connection refused, or the page's "loading" error)
                    time.sleep(1.0)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=60)


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
    result["head training"] = time_head_training(base, settings, ids, mask, work)
    result["clustering"] = time_clustering(base, settings)
    result["targets"] = evaluate_targets(result)
    return result


def time_head_training(base: PreTrainedModel, settings: BenchSettings, ids: torch.Tensor, mask: torch.Tensor,
                       work: int) -> dict:
    """The published configuration (``chameleon-head``) trained through the whole model, and on the transformer's
    cached hidden states (``--cached-features``), side by side: what caching saves per step."""
    model = adapted(base, "chameleon-head", settings.rank)
    randomize_adapters(model)
    with torch.no_grad():  # what the cache holds: the final hidden states, computed once
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    variants = {"chameleon-head": Variant(model, "hyper-LoRA head alone: the whole model, forward and backward"),
                "chameleon-head, cached": Variant(model, "the same head on the transformer's cached hidden states")}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = {"chameleon-head": partial(train_step, variants["chameleon-head"], optimizer, ids, mask),
             "chameleon-head, cached": partial(head_step, variants["chameleon-head, cached"], optimizer, ids, mask, hidden)}
    result = summarize(*measure(steps, settings.repeats, base.device), variants, work, "tokens/s", "chameleon-head")
    model.eval()
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






