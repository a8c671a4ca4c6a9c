"""Timing and peak memory, measured side by side: every repeat runs each call once, in an order that rotates
from one repeat to the next (a shared machine drifts); ratios are medians of per-repeat ratios."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

MIB = 2**20

if TYPE_CHECKING:
    from .variants import Variant

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
