"""Serving a bundle set to many clients: requests that arrive together are answered in one mixed batch.

Run one at a time, concurrent requests leave the models idle between small batches, or (with
several workers) fight over the same cores. The :class:`Scheduler` collects what arrives within a
short window, and each model runs all of it as one mixed-cluster batch
(:meth:`~.bundle_set.BundleSet.compare_batch`): every request keeps its own clusters, conditioning and
sampling seeds, so it gets exactly the answer it gets alone. :func:`measure_serving` measures what
that buys (throughput and latency with merging on and off, and through the app's HTTP API) and
checks that every answer is unchanged.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import numpy as np

from .bundle_set import COMPARED, BundleSet, Comparison
from .inference import InputError, Request

WINDOW = 0.05  # seconds a batch stays open after its first request arrives, for others to join
MAX_BATCH = 64  # prompts in one merged batch (SmolLM2's KV cache for 64 rows of 640 tokens: about 2 GB)
MAX_WAITING = 256  # prompts queued behind the running batch (four full batches); past that, Busy


class Busy(InputError):
    """The server cannot take the request now (its queue is full, or it is closing): try again later."""


class Stopped(InputError):
    """The request was stopped (:meth:`Scheduler.stop`) before any model ran it."""


class Job:
    """One submitted request: its comparison after each stage (:meth:`updates`), then its result."""

    def __init__(self, request: Request):
        self.request = request
        self.arrived = time.monotonic()
        self.future: Future[Comparison] = Future()
        self.stopped = False  # set by Scheduler.stop: its rows end at the next decoding step
        self._stages: queue.SimpleQueue[Comparison | None] = queue.SimpleQueue()

    def publish(self, comparison: Comparison) -> None:
        self._stages.put(comparison)

    def finish(self, result: Comparison | BaseException) -> None:
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)
        self._stages.put(None)

    def updates(self, timeout: float | None = None, latest: bool = False) -> Iterator[Comparison]:
        """The comparison once assigned, as its answers grow token by token, after each model and
        complete (a page fills in as they come); the request's error, if it failed, is raised at the
        end. ``latest`` skips the stages that queued while the consumer was busy (each holds all the
        earlier ones), so a slow page never falls behind the models. Read by one consumer."""
        while (comparison := self._stages.get(timeout=timeout)) is not None:
            while latest and not self._stages.empty():
                if (newer := self._stages.get()) is None:
                    self._stages.put(None)  # the end: yield the last comparison, then stop
                    break
                comparison = newer
            yield comparison
        self.future.result()

    def result(self, timeout: float | None = None) -> Comparison:
        return self.future.result(timeout)


class Scheduler:
    """Merges requests that arrive within ``window`` seconds into one batch for every model.

    One worker thread runs the batches, one at a time: the first waiting request opens a batch,
    which takes whatever else arrives within ``window`` (and, after a long batch, everything that
    queued meanwhile), up to ``max_batch`` prompts; the rest wait for the next. More than
    ``max_waiting`` queued prompts, and :meth:`submit` raises :class:`Busy`. ``merge=False`` runs
    one request per batch in arrival order: the baseline merging is measured against.
    ``batch_sizes`` counts the batches run by how many requests each merged.
    """

    def __init__(self, bundle_set: BundleSet, window: float = WINDOW, max_batch: int = MAX_BATCH,
                 max_waiting: int = MAX_WAITING, merge: bool = True):
        self.bundle_set, self.window, self.max_batch, self.max_waiting, self.merge = (
            bundle_set, window, max_batch, max_waiting, merge)
        self.batch_sizes: Counter[int] = Counter()
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="chameleon-scheduler", daemon=True)
        self._worker.start()

    def submit(self, request: Request) -> Job:
        """Queue a request; a :class:`Busy` says when there is no room for it now."""
        job = Job(request)
        with self._changed:
            if self._closed:
                raise Busy("The server is shutting down; send the request again once it is back.")
            waiting = sum(len(queued.request.prompts) for queued in self._waiting)
            if waiting + len(job.request.prompts) > self.max_waiting:
                raise Busy(f"The server is busy: {waiting} prompt(s) from {len(self._waiting)} request(s) are waiting, "
                           f"and at most {self.max_waiting} may wait. Try again in a minute, or send fewer prompts.")
            self._waiting.append(job)
            self._changed.notify()
        return job

    def compare(self, request: Request) -> Comparison:
        """:meth:`~.bundle_set.BundleSet.compare` through the queue: the same answer, merged with whatever else arrives."""
        return self.submit(request).result()

    def stop(self, job: Job) -> None:
        """End ``job`` now: a waiting job fails with :class:`Stopped`; a running one keeps what its models
        have written, its rows end at the next decoding step (the rest of its batch goes on) and its
        comparison completes as ``stopped``. A finished job is left as it is."""
        with self._changed:
            job.stopped = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.finish(Stopped("Stopped before the models started on this request."))

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests: the running batch finishes, waiting ones fail with :class:`Busy`, the worker ends."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._worker.join(timeout)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while batch := self._next_batch():
            self.batch_sizes[len(batch)] += 1
            try:
                results = self.bundle_set.compare_batch([job.request for job in batch],
                                                        lambda i, comparison: batch[i].publish(comparison),
                                                        lambda i: batch[i].stopped)
            except Exception as err:  # noqa: BLE001 (a bug: each waiting caller gets it, and the worker goes on)
                results = [err] * len(batch)
            for job, result in zip(batch, results):
                job.finish(result)

    def _next_batch(self) -> list[Job]:
        """The next batch, once its window closes; an empty one when the scheduler closes."""
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            deadline = self._waiting[0].arrived + self.window if self._waiting else 0.0
            while self.merge and not self._closed and self._prompts(self._waiting) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if self._closed:
                for job in self._waiting:
                    job.finish(Busy("The server shut down before this request ran; send it again once it is back."))
                self._waiting.clear()
                return []
            batch = [self._waiting.popleft()]
            while (self.merge and self._waiting
                   and self._prompts(batch) + len(self._waiting[0].request.prompts) <= self.max_batch):
                batch.append(self._waiting.popleft())
            return batch

    @staticmethod
    def _prompts(jobs: Sequence[Job]) -> int:
        return sum(len(job.request.prompts) for job in jobs)


# ---------------------------------------------------------------- measuring it
# Short instructions of twelve kinds for the measurement's clients (SmolLM2's bundles are trained on Alpaca).
PROMPTS = (
    "Name three rivers in Europe.",
    "Write one sentence about the sea at night.",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a title for a story about a lost robot.",
    "Explain photosynthesis to a child.",
    "Give two tips for a job interview.",
    "Translate 'thank you very much' into Spanish.",
    "What is 12 times 13?",
    "Describe a sunrise in the mountains.",
    "List three uses of baking soda.",
    "Why do cats purr?",
    "Write a limerick about a clumsy chef.",
)
Answer = list[list[str]]  # per prompt: the base, static LoRA and ChameleonLLM continuations


def measure_serving(
    bundle_set: BundleSet, clients: Sequence[int] = (1, 8, 24), requests_per_client: int = 2,
    prompts_per_request: int = 2, max_new_tokens: int = 32, window: float = WINDOW, url: str | None = None,
    prompts: Sequence[str] = PROMPTS,
) -> dict:
    """Throughput and latency of ``clients`` concurrent clients, with merging on and off; every answer checked.

    Each client (a thread) sends ``requests_per_client`` requests one after another, each of
    ``prompts_per_request`` prompts from ``prompts`` (every other request sampled, with its own
    seed). ``one at a time`` runs them through a :class:`Scheduler` that never merges, so each
    request runs alone: its answers are the reference. ``merged`` uses a scheduler with ``window``;
    with ``url`` (the app serving this set, e.g. ``app.running``), ``http`` sends the same requests
    to its ``/compare`` endpoint through ``gradio_client``. Returns plain data: the settings and one
    record per (mode, clients) with its throughput, p50/p95 latency to the whole answer and to the
    first streamed token (None when every answer was empty), model batches (in-process),
    ``speedup`` over one at a time and, for ``merged`` and ``http``, ``same_as_alone``: how many of
    its requests got exactly their reference answers.
    """
    workload = {n: [[_request(prompts, prompts_per_request, max_new_tokens, c * requests_per_client + j)
                     for j in range(requests_per_client)] for c in range(n)] for n in clients}
    reference: dict[Request, Answer] = {}
    runs = []
    for n in clients:
        for mode, merge in (("one at a time", False), ("merged", True)):
            with Scheduler(bundle_set, window, merge=merge) as scheduler:
                scheduler.compare(_request(prompts, prompts_per_request, max_new_tokens, 0))  # warm-up, not timed
                scheduler.batch_sizes.clear()
                run = _run_clients(workload[n], [_scheduler_call(scheduler)] * n, reference if merge else None)
                run["batches"] = sum(scheduler.batch_sizes.values())
            if not merge:
                reference.update(run.pop("answers"))
            runs.append({"mode": mode, "clients": n, **run})
    if url is not None:
        for n in clients:
            calls = [_http_call(url) for _ in range(n)]  # connected before the clock starts
            runs.append({"mode": "http", "clients": n, **_run_clients(workload[n], calls, reference)})
    alone = {run["clients"]: run["requests_per_s"] for run in runs if run["mode"] == "one at a time"}
    for run in runs:
        run["speedup"] = run["requests_per_s"] / alone[run["clients"]]
        run.pop("answers", None)
    return {"settings": {"model": bundle_set.chameleon.base_model, "bundle_set": bundle_set.path.name,
                         "clients": list(clients), "requests_per_client": requests_per_client,
                         "prompts_per_request": prompts_per_request, "max_new_tokens": max_new_tokens,
                         "window_s": window, "max_batch": MAX_BATCH},
            "runs": runs}


def _request(prompts: Sequence[str], size: int, max_new_tokens: int, number: int) -> Request:
    """The ``number``-th request of a measurement (odd ones sampled, each request with its own seed)."""
    chosen = [prompts[(number * size + i) % len(prompts)] for i in range(size)]
    return Request.parse(chosen, "trained", 3, max_new_tokens, number, "sample" if number % 2 else "greedy")


Call = Callable[[Request], tuple[Answer, float]]  # a request -> its answers and its time to first token (s)


def _scheduler_call(scheduler: Scheduler) -> Call:
    def call(request: Request) -> tuple[Answer, float]:
        began, first = time.perf_counter(), None
        for comparison in scheduler.submit(request).updates():
            if first is None and any(any(texts) for texts in comparison.generations.values()):
                first = time.perf_counter() - began
        rows = comparison.rows()
        return [[row[regime] for regime in COMPARED] for row in rows], first if first is not None else float("nan")
    return call


def _http_call(url: str) -> Call:
    from gradio_client import Client  # only the HTTP clients need it

    client = Client(url, verbose=False)

    def call(request: Request) -> tuple[Answer, float]:
        began, first = time.perf_counter(), None
        job = client.submit("\n".join(request.prompts), request.cluster_source, request.k, request.max_new_tokens,
                            "sample" if request.do_sample else "greedy", request.seed, api_name="/compare")
        for output in job:  # each streamed update, as it arrives
            cells = [cell for row in (output[2] or {}).get("data", []) for cell in row[2:]] if len(output) > 2 else []
            if first is None and any(cell not in ("", "…") for cell in cells if isinstance(cell, str)):
                first = time.perf_counter() - began
        generations = job.result()[2]
        return [row[2:] for row in generations["data"]], first if first is not None else float("nan")
    return call


def _run_clients(workload: list[list[Request]], calls: list[Call], reference: dict[Request, Answer] | None) -> dict:
    """Every client sends its requests one after another, all clients at once; the wall time, latencies
    (to the whole answer and to its first token) and answers."""
    start = threading.Barrier(len(workload) + 1)
    latencies: list[float] = []
    first_tokens: list[float] = []
    answers: dict[Request, Answer] = {}

    def client(requests: list[Request], call: Call) -> None:
        start.wait()
        for request in requests:
            began = time.perf_counter()
            answer, first_token = call(request)
            latencies.append(time.perf_counter() - began)  # list.append is atomic
            first_tokens.append(first_token)
            answers[request] = answer

    threads = [threading.Thread(target=client, args=(requests, call)) for requests, call in zip(workload, calls)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    requests = sum(map(len, workload))
    prompts = sum(len(request.prompts) for sent in workload for request in sent)
    if len(latencies) != requests:
        raise RuntimeError(f"{requests - len(latencies)} of {requests} requests failed; see the errors above")
    p50, p95 = np.percentile(latencies, [50, 95]).tolist()
    first50, first95 = np.nanpercentile(first_tokens, [50, 95]).tolist() if not np.isnan(first_tokens).all() else [None] * 2
    run = {"requests": requests, "prompts": prompts, "seconds": seconds, "requests_per_s": requests / seconds,
           "prompts_per_s": prompts / seconds, "latency_p50_s": p50, "latency_p95_s": p95,
           "first_token_p50_s": first50, "first_token_p95_s": first95, "answers": answers}
    if reference is not None:
        run["same_as_alone"] = sum(answers[request] == reference[request] for request in answers)
    return run
