"""Adaptive batching inside the API process, in front of one onnxruntime session.

BentoML's adaptive batching is its CorkDispatcher: the algorithm `@bentoml.api(batchable=True)` runs in the
server of a service of its own. Used here, in the process that parses the requests, a request reaches the
model with no second HTTP hop, no serialization and no second process competing for the same cores
(bench/profile_serving.py measured that hop and the second process at about a quarter of the served CPU).
Batches run off the event loop, on `concurrent` threads of their own (BentoML's dispatcher takes a shared
semaphore for that), so the loop keeps parsing the next requests while the cores compute.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from bentoml._internal.marshal.dispatcher import CorkDispatcher, NonBlockSema


class Overloaded(Exception):
    """BentoML's dispatcher dropped the request: it would have missed max_latency_ms (answer 503)."""


def _overloaded() -> Any:
    raise Overloaded("the server is overloaded; try again shortly")


class AdaptiveBatcher:
    """`await batcher(item)` -> that item's result, computed in a batch with whatever else is waiting.

    `run_batch` maps a list of items to a list of results, one each, in order. With `enabled` False every
    item runs alone (for benchmarks: what batching is worth). `on_batch(size)` is called for every batch.
    """

    def __init__(self, name: str, run_batch: Callable[[list], Sequence], *, max_batch_size: int,
                 max_latency_ms: int, enabled: bool = True, on_batch: Callable[[int], None] | None = None,
                 concurrent: int = 1):
        self.run_batch, self.on_batch = run_batch, on_batch
        # `concurrent` batches at a time, each on its own thread (BentoML's dispatcher runs one).
        self.executor = ThreadPoolExecutor(concurrent, thread_name_prefix=f"batch-{name}")
        self.dispatch = None
        if enabled:
            dispatcher = CorkDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size,
                                        fallback=_overloaded, get_batch_size=lambda _item: 1,
                                        shared_sema=NonBlockSema(concurrent))
            no_queue_wait(dispatcher)
            self.dispatch = dispatcher(self._run)

    async def _run(self, items: Sequence) -> Sequence:
        if self.on_batch is not None:
            self.on_batch(len(items))
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, list(items))

    async def __call__(self, item):
        if self.dispatch is None:
            return (await self._run([item]))[0]
        return await self.dispatch(item)


def no_queue_wait(dispatcher: CorkDispatcher) -> None:
    """Make the dispatcher release a batch as soon as a batch slot is free, taking whatever waits (up to the
    maximum size), instead of corking it for the mean wait of earlier batches.

    BentoML's cork holds a request back for about the average time the first request of the last 50 batches
    waited, and that average counts the time they queued behind busy batch slots: after a burst at 32 clients
    it was ~0.3 s, so a lone client then waited 120 ms more per request, and the waits it logged kept the
    average up (bench/quantization.py measured 139 ms p50 against 22 ms in-process). Logging a wait of 0 keeps
    its cost model and its 503 on expected lateness; batches still form under load, from the requests that
    arrive while both slots compute."""
    log_outbound = dispatcher.optimizer.log_outbound
    dispatcher.optimizer.log_outbound = lambda n, wait, duration: log_outbound(n=n, wait=0.0, duration=duration)
