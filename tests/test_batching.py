"""serving/batching.py without a server: concurrent calls share batches, results keep their order, overload is a
503; and how the cores are shared out among workers and onnxruntime threads."""

import asyncio
import threading
import time

import pytest

from serving.batching import AdaptiveBatcher, Overloaded


class Recorder:
    """A batch function that remembers its batch sizes and the threads it ran on; slow enough to queue behind."""

    def __init__(self, seconds: float = 0.01):
        self.sizes, self.threads, self.seconds = [], set(), seconds

    def __call__(self, items: list) -> list:
        self.sizes.append(len(items))
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return [item * 10 for item in items]


async def call_all(batcher: AdaptiveBatcher, items) -> list:
    return await asyncio.gather(*(batcher(item) for item in items))


def test_concurrent_calls_are_batched_and_answered_in_order():
    run = Recorder()
    batcher = AdaptiveBatcher("t", run, max_batch_size=8, max_latency_ms=5000)
    results = asyncio.run(call_all(batcher, range(64)))
    assert results == [i * 10 for i in range(64)]
    assert sum(run.sizes) == 64 and max(run.sizes) > 1 and max(run.sizes) <= 8
    assert len(run.threads) == 1 and threading.get_ident() not in run.threads  # off the event loop, one thread


def test_disabled_batching_runs_each_call_alone():
    run = Recorder()
    batcher = AdaptiveBatcher("t", run, max_batch_size=8, max_latency_ms=5000, enabled=False)
    assert asyncio.run(call_all(batcher, range(12))) == [i * 10 for i in range(12)]
    assert run.sizes == [1] * 12


def test_every_batch_is_reported():
    seen = []
    batcher = AdaptiveBatcher("t", Recorder(), max_batch_size=8, max_latency_ms=5000, on_batch=seen.append)
    asyncio.run(call_all(batcher, range(20)))
    assert sum(seen) == 20


def test_requests_that_would_miss_the_latency_bound_are_refused():
    batcher = AdaptiveBatcher("t", Recorder(seconds=0.2), max_batch_size=1, max_latency_ms=300)

    async def flood():
        return await asyncio.gather(*(batcher(i) for i in range(30)), return_exceptions=True)

    outcomes = asyncio.run(flood())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert refused and len(refused) < 30
    assert all(o == i * 10 for i, o in enumerate(outcomes) if not isinstance(o, Exception))


def test_a_failing_batch_raises_in_every_caller():
    def broken(items):
        raise ValueError("bad batch")

    batcher = AdaptiveBatcher("t", broken, max_batch_size=4, max_latency_ms=5000)
    with pytest.raises(ValueError, match="bad batch"):
        asyncio.run(call_all(batcher, range(3)))


@pytest.mark.parametrize("cores, env, expected", [
    (2, {}, (1, 1, 2, 2)),  # one worker: two 1-thread batches at once; a lone request on both cores
    (8, {}, (1, 1, 8, 8)),
    (1, {}, (1, 1, 1, 1)),
    (2, {"AGEGROUP_WORKERS": "2"}, (2, 1, 1, 1)),
    (8, {"AGEGROUP_THREADS": "2"}, (1, 2, 4, 8)),
    (4, {"AGEGROUP_WORKERS": "2", "AGEGROUP_THREADS": "2"}, (2, 2, 1, 2)),
])
def test_serving_layout_shares_the_cores(monkeypatch, cores, env, expected):
    from serving import runtime

    monkeypatch.setattr(runtime.os, "cpu_count", lambda: cores)
    for name in ("AGEGROUP_WORKERS", "AGEGROUP_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    layout = runtime.serving_layout()
    assert (layout.workers, layout.threads, layout.concurrent_batches, layout.alone_threads) == expected


@pytest.mark.parametrize("value, alone, batches", [
    (None, True, False),  # the default: only a lone request's session spins
    ("alone", True, False),
    ("1", True, True),
    ("0", False, False),
])
def test_only_the_lone_request_session_spins_by_default(monkeypatch, value, alone, batches):
    from serving import runtime

    if value is None:
        monkeypatch.delenv("AGEGROUP_SPIN", raising=False)
    else:
        monkeypatch.setenv("AGEGROUP_SPIN", value)
    assert (runtime.spinning(alone=True), runtime.spinning()) == (alone, batches)
    for spin in (False, True):
        options = runtime.session_options(2, spin)
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")


def test_a_misspelt_spin_setting_is_refused(monkeypatch):
    from serving import runtime

    monkeypatch.setenv("AGEGROUP_SPIN", "yes")
    with pytest.raises(ValueError, match="AGEGROUP_SPIN must be 0, 1 or alone"):
        runtime.spinning()


def test_batches_run_side_by_side_when_asked():
    """concurrent=2: a second batch starts while the first still runs (on another thread)."""
    running, overlap = [], []

    def slow(items):
        running.append(1)
        overlap.append(len(running))
        time.sleep(0.05)
        running.pop()
        return items

    batcher = AdaptiveBatcher("t", slow, max_batch_size=2, max_latency_ms=5000, concurrent=2)
    assert asyncio.run(call_all(batcher, range(40))) == list(range(40))
    assert max(overlap) == 2
