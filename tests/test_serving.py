"""The scheduler: requests that arrive together share one mixed batch, and each gets exactly its own answer."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from chameleon_core import load_model
from chameleon_core.bundle_set import COMPARED, BundleSet
from chameleon_core.inference import InputError, Request, length_buckets
from chameleon_core.serving import Busy, Scheduler, Stopped, measure_serving

from conftest import LONG, MODEL, SIX_DOMAINS, make_bundle_set

COOKING, SPACE, SPORT, FINANCE, CODE, MEDICINE = SIX_DOMAINS
MORE_COOKING = "Simmer the onions slowly, then season the sauce with fresh thyme."
MORE_SPACE = "The astronomer measured the orbit of a distant binary star."
# Requests whose clusters overlap with different prompts in them: had two requests' prompts shared a
# group, the 'batch' conditioning (the mean of a group's embeddings) would mix them.
REQUESTS = [
    ([COOKING, SPACE, SPORT], {}),
    ([MORE_COOKING, MORE_SPACE, FINANCE], {}),
    ([COOKING, MORE_COOKING, CODE, MEDICINE], {"max_new_tokens": 5}),
    ([SPORT, MORE_SPACE, SPACE], {"cluster_source": "prompts", "k": 2}),
    ([SPACE, MORE_COOKING, FINANCE], {"decoding": "sample", "seed": 7}),
]


@pytest.fixture(scope="module")
def bundle_set(tmp_path_factory) -> BundleSet:
    path = make_bundle_set(tmp_path_factory.mktemp("bundles") / "tiny")
    return BundleSet.load(path, *load_model(MODEL))


def ask(prompts: list[str], **overrides) -> Request:
    """A request with the tests' short answers unless ``overrides`` say otherwise."""
    return Request.parse(prompts, **{"max_new_tokens": 8, **overrides})


def alone(bundle_set: BundleSet, prompts: list[str], **overrides):
    return bundle_set.compare(ask(prompts, **overrides))


def test_merged_requests_get_exactly_what_they_get_alone(bundle_set):
    with Scheduler(bundle_set, window=1.0) as scheduler:  # a long window: all five arrive within it
        jobs = [scheduler.submit(ask(prompts, **extra)) for prompts, extra in REQUESTS]
        merged = [job.result(timeout=60) for job in jobs]
    assert scheduler.batch_sizes == Counter({5: 1})  # one batch for all five requests
    solo = [alone(bundle_set, prompts, **extra) for prompts, extra in REQUESTS]
    for one, together in zip(solo, merged):
        assert together.rows() == one.rows()  # clusters, distances and the three continuations
        assert together.adapters == one.adapters
    members: dict[int, set] = {}  # trained cluster -> the prompts it holds in each request
    for (prompts, _), one in zip(REQUESTS, solo):
        if one.assignment.source == "trained":
            for cluster in set(one.assignment.labels.tolist()):
                members.setdefault(cluster, set()).add(frozenset(p for p, c in zip(prompts, one.assignment.labels) if c == cluster))
    assert max(map(len, members.values())) > 1, "some cluster should hold other prompts in another request"
    assert solo[4].generations != alone(bundle_set, REQUESTS[4][0]).generations  # the sampled request does sample


def test_a_sample_depends_on_its_seed_and_never_on_its_batch_mates(bundle_set):
    sampled = ([MORE_COOKING, SPORT, MORE_SPACE], {"decoding": "sample", "seed": 11})
    answers = []
    for mates in (REQUESTS[:2], REQUESTS[2:4], REQUESTS[4:]):
        with Scheduler(bundle_set, window=1.0) as scheduler:
            jobs = [scheduler.submit(ask(prompts, **extra)) for prompts, extra in [*mates, sampled]]
            answers.append(jobs[-1].result(timeout=60).rows())
        assert sum(scheduler.batch_sizes.values()) == 1
    assert answers[0] == answers[1] == answers[2] == alone(bundle_set, sampled[0], **sampled[1]).rows()
    assert answers[0] != alone(bundle_set, sampled[0], decoding="sample", seed=12).rows()


def test_the_window_merges_what_arrives_together_up_to_the_batch_cap(bundle_set):
    requests = [SIX_DOMAINS[i : i + 2] for i in (0, 2, 4)]
    for options, batches in (({"window": 1.0}, Counter({3: 1})), ({"window": 1.0, "max_batch": 4}, Counter({2: 1, 1: 1})),
                             ({"merge": False}, Counter({1: 3}))):
        with Scheduler(bundle_set, **options) as scheduler:
            for job in [scheduler.submit(ask(prompts, max_new_tokens=2)) for prompts in requests]:
                job.result(timeout=60)
        assert scheduler.batch_sizes == batches, options


def test_past_the_queue_cap_the_caller_is_told_to_come_back(bundle_set):
    scheduler = Scheduler(bundle_set, window=30.0, max_waiting=4)  # nothing runs for 30 s: the queue fills
    waiting = [scheduler.submit(ask(SIX_DOMAINS[:2])), scheduler.submit(ask(SIX_DOMAINS[2:4]))]
    with pytest.raises(Busy, match=re.escape(
        "The server is busy: 4 prompt(s) from 2 request(s) are waiting, and at most 4 may wait. Try again in a "
        "minute, or send fewer prompts."
    )):
        scheduler.submit(ask([SIX_DOMAINS[4]]))
    assert issubclass(Busy, InputError)  # the app shows it as a message, like bad input
    scheduler.close(timeout=10)
    assert not scheduler._worker.is_alive()  # its own worker (other tests' app engines may hold theirs)
    for job in waiting:
        with pytest.raises(Busy, match="shut down before this request ran; send it again"):
            job.result(timeout=1)
    with pytest.raises(Busy, match="shutting down"):
        scheduler.submit(ask(["hello"]))


def test_a_failing_request_fails_alone(bundle_set):
    with Scheduler(bundle_set, window=1.0) as scheduler:
        bad, good = (scheduler.submit(ask(prompts)) for prompts in ([LONG, "hello"], SIX_DOMAINS[:2]))
        with pytest.raises(InputError, match="This request needs 1,024 tokens"):
            bad.result(timeout=60)
        assert good.result(timeout=60).rows() == alone(bundle_set, SIX_DOMAINS[:2]).rows()
    with pytest.raises(InputError, match="at least one prompt"):
        ask([])


def test_updates_stream_each_answer_as_it_grows(bundle_set):
    with Scheduler(bundle_set) as scheduler:
        stages = list(scheduler.submit(ask(SIX_DOMAINS[:3], max_new_tokens=6)).updates(timeout=60))
    final = alone(bundle_set, SIX_DOMAINS[:3], max_new_tokens=6)
    assert stages[-1].rows() == final.rows() and stages[-1].complete and not stages[-1].stopped
    assert stages[0].generations == {} and not any(stage.complete for stage in stages[:-1])
    streamed = [stage for stage in stages if stage.running is not None]
    assert len(streamed) > len(COMPARED)  # tokens arrive in pieces, not one column at a time
    assert [stage.running for stage in streamed] == sorted((stage.running for stage in streamed), key=list(COMPARED).index)
    for stage in streamed:  # every piece is the start of the answer the model finally gives
        for regime, texts in stage.generations.items():
            assert all(final.generations[regime][row].startswith(text) for row, text in enumerate(texts)), regime
    done = [[regime for regime in stage.generations if regime != stage.running] for stage in stages]
    assert [list(d) for d in dict.fromkeys(map(tuple, done))] == [[], ["base"], ["base", "lora"], list(COMPARED)]


def test_stop_ends_one_request_and_leaves_its_batch_mates_alone(bundle_set):
    kept, halted = (SIX_DOMAINS[:2], {"max_new_tokens": 24}), (SIX_DOMAINS[2:5], {"max_new_tokens": 24, "decoding": "sample"})
    requests = [ask(prompts, **extra) for prompts, extra in (kept, halted)]
    stop = set()

    def report(i, comparison):  # as Scheduler.stop does: a flag the batch reads at its next decoding step
        if i == 1 and comparison.running is not None:
            stop.add(i)

    rest, stopped = bundle_set.compare_batch(requests, report, lambda i: i in stop)
    assert rest.rows() == alone(bundle_set, kept[0], **kept[1]).rows() and not rest.stopped
    whole = alone(bundle_set, halted[0], **halted[1])
    assert stopped.stopped and stopped.complete and stopped.adapters == [] and list(stopped.generations) == ["base"]
    assert [row["lora"] for row in stopped.rows()] == [None] * 3  # the later models never ran it
    ours, theirs = stopped.generations["base"], whole.generations["base"]
    assert all(b.startswith(a) for a, b in zip(ours, theirs)) and max(map(len, ours)) < max(map(len, theirs))


def test_a_request_stopped_while_it_waits_never_runs(bundle_set):
    with Scheduler(bundle_set, window=1.0) as scheduler:
        first, second = (scheduler.submit(ask(prompts, max_new_tokens=4)) for prompts in (SIX_DOMAINS[:2], SIX_DOMAINS[2:3]))
        scheduler.stop(first)
        with pytest.raises(Stopped, match="before the models started"):
            first.result(timeout=60)
        assert second.result(timeout=60).rows() == alone(bundle_set, SIX_DOMAINS[2:3], max_new_tokens=4).rows()
    assert scheduler.batch_sizes == Counter({1: 1})


def test_rows_are_bucketed_by_new_tokens_and_by_length_only_where_padding_dominates():
    assert length_buckets([10, 12, 11, 9], [8] * 4) == [[0, 1, 2, 3]]
    assert length_buckets([10, 12, 100, 11], [8] * 4) == [[0, 1, 3], [2]]  # 400 tokens padded for 133 real
    assert length_buckets([10, 19], [8, 8]) == [[0, 1]]  # padding 9 tokens of 38
    assert length_buckets([10, 12, 11], [8, 4, 8]) == [[0, 2], [1]]


def test_measure_serving_reports_throughput_latency_and_unchanged_answers(bundle_set):
    result = measure_serving(bundle_set, clients=(1, 3), requests_per_client=2, max_new_tokens=4,
                             prompts=SIX_DOMAINS)
    json.dumps(result)  # plain data
    runs = {(run["mode"], run["clients"]): run for run in result["runs"]}
    assert set(runs) == {(mode, n) for mode in ("one at a time", "merged") for n in (1, 3)}
    for (mode, n), run in runs.items():
        assert run["requests"] == 2 * n and run["prompts"] == 4 * n
        assert run.get("same_as_alone", run["requests"]) == run["requests"], (mode, n)
        assert 0 < run["latency_p50_s"] <= run["latency_p95_s"] and run["requests_per_s"] > 0
        assert 0 < run["first_token_p50_s"] <= run["first_token_p95_s"] and run["first_token_p50_s"] < run["latency_p50_s"]
    assert "same_as_alone" in runs["merged", 1] and "same_as_alone" not in runs["one at a time", 1]
    assert runs["one at a time", 3]["batches"] == 6 and runs["merged", 3]["batches"] < 6
