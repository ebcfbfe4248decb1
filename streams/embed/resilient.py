"""Batching, bounded concurrency, retries and dead letters around any :class:`Embedder`.

:class:`EmbedQueue` takes texts one at a time (``submit``) and embeds them in batches:

1. Batches form one at a time: a free worker (of ``max_in_flight`` threads) takes the oldest
   waiting text, then keeps taking until it holds ``max_batch`` texts or ``max_wait_s`` has
   passed since the first, and sends it while the next free worker forms the next batch; so
   texts that trickle in are not split across idle workers, and at most ``max_in_flight``
   batches are at the provider at once. ``submit`` blocks while
   ``max_pending`` texts wait (backpressure instead of unbounded memory).
2. A batch that fails with a retryable error (:attr:`EmbedderError.retryable`: 429, 5xx,
   timeouts) is retried after ``backoff(attempt)``: exponential, capped, with jitter, and at
   least the provider's ``Retry-After``; up to ``RetryPolicy.max_attempts`` attempts.
3. A batch that fails with a non-retryable error (a 400 for one bad text, say) is split and
   each text is tried on its own, with the same retries, so one poison text does not sink the
   texts batched with it. A batch that still fails with a retryable error after its last
   attempt is not split: the provider is down, not the texts, and splitting would multiply
   the waiting by the batch size.
4. Every submitted text resolves to exactly one outcome: :class:`Embedded` (its vector) or
   :class:`EmbedFailed` (the last error's text, attempts made, whether it was retryable). A
   future never raises: the caller sends failures to ``dlq`` with ``error`` and goes on.

``close(drain=True)`` refuses new texts, embeds everything already submitted (retries
included) and joins the workers. ``close(drain=False)`` also refuses new texts, lets each
in-flight attempt finish, stops retrying, and resolves every text not yet embedded as
``EmbedFailed(retryable=True, error="shutdown ...")``: a host that has not committed their
source offsets re-reads them after a restart. Nothing is dropped without an outcome.

Time is injectable for tests: ``sleep`` waits between attempts (the default returns early on
``close(drain=False)``), ``rng`` draws the jitter.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from streams.embed.port import Embedder, EmbedderError

__all__ = [
    "EmbedFailed",
    "EmbedOutcome",
    "EmbedQueue",
    "Embedded",
    "RetryPolicy",
    "embed_with_retry",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts and backoff. Attempt ``k`` (1-based) failing retryably waits
    ``min(max_delay_s, base_delay_s * multiplier**(k-1)) * (1 - jitter * u)`` with ``u`` uniform
    in [0, 1), and never less than the provider's ``retry_after_s`` (capped at
    ``max_delay_s``)."""

    max_attempts: int = 5
    base_delay_s: float = 0.2
    multiplier: float = 2.0
    max_delay_s: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff(self, attempt: int, u: float, retry_after_s: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based); ``u`` in [0, 1)."""
        delay = min(self.max_delay_s, self.base_delay_s * self.multiplier ** (attempt - 1))
        delay *= 1.0 - self.jitter * u
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_delay_s))
        return delay


@dataclass(frozen=True, slots=True)
class Embedded:
    """A text embedded: its unit vector and the attempts it took."""

    vector: npt.NDArray[np.float32]
    attempts: int

    ok = True


@dataclass(frozen=True, slots=True)
class EmbedFailed:
    """A text that could not be embedded: the last error's message (what goes to ``dlq``),
    whether that error was retryable (provider down, shutdown) and the attempts made."""

    error: str
    retryable: bool
    attempts: int

    ok = False


EmbedOutcome = Embedded | EmbedFailed


def embed_with_retry(
    embedder: Embedder,
    texts: Sequence[str],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], object] = time.sleep,
    rng: Callable[[], float] = random.random,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[npt.NDArray[np.float32] | EmbedderError, int]:
    """``embedder.embed(texts)`` with retries of retryable errors: ``(vectors, attempts)`` or
    ``(last error, attempts)``. Errors that are not :class:`EmbedderError` are translated to a
    non-retryable one (a provider bug is data for the dead-letter topic, not a crash of the
    stream) and logged with their traceback. Stops retrying once ``should_stop()``."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return embedder.embed(texts), attempt
        except EmbedderError as exc:
            error = exc
        except Exception as exc:  # translated at this edge, logged with its traceback
            log.exception("embedder %s raised an unexpected error", embedder.name)
            error = EmbedderError(f"{type(exc).__name__}: {exc}")
        if not error.retryable or attempt >= policy.max_attempts or should_stop():
            return error, attempt
        sleep(policy.backoff(attempt, rng(), error.retry_after_s))
        if should_stop():
            return error, attempt


@dataclass(slots=True)
class _Item:
    text: str
    future: Future[EmbedOutcome] = field(default_factory=Future)


_STOP = object()  # one per worker, queued by close()


class EmbedQueue:
    """Texts in, :data:`EmbedOutcome` futures out; see the module docstring for the contract.

    ``embedder`` must be safe to call from ``max_in_flight`` threads at once (every provider
    here is). The queue does not close the embedder.
    """

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        max_in_flight: int = 2,
        max_pending: int = 10_000,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], object] | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or max_pending < 1 or max_wait_s < 0:
            raise ValueError("max_batch, max_in_flight, max_pending >= 1 and max_wait_s >= 0")
        self.embedder = embedder
        self.policy = policy or RetryPolicy()
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._abort = threading.Event()
        self._sleep: Callable[[float], object] = sleep or self._abort.wait
        self._rng: Callable[[], float] = rng or random.Random().random
        self._queue: queue.Queue[_Item | object] = queue.Queue(max_pending)
        self._closing = threading.Lock()  # submit vs close: no item after the stop markers
        self._forming = threading.Lock()  # held by the worker that is filling a batch
        self._closed = False
        self._workers = [
            threading.Thread(target=self._run, name=f"embed-{i}", daemon=True)
            for i in range(max_in_flight)
        ]
        for w in self._workers:
            w.start()

    def submit(self, text: str) -> Future[EmbedOutcome]:
        """Queue ``text``; blocks while ``max_pending`` texts wait. Raises
        :class:`EmbedderError` after :meth:`close`."""
        item = _Item(text)
        while True:
            with self._closing:
                if self._closed:
                    raise EmbedderError("embed queue is closed")
                try:
                    self._queue.put(item, timeout=0.05)
                    return item.future
                except queue.Full:
                    pass  # release the lock so close() can run, then try again

    def submit_many(self, texts: Sequence[str]) -> list[Future[EmbedOutcome]]:
        return [self.submit(t) for t in texts]

    def embed_all(self, texts: Sequence[str]) -> list[EmbedOutcome]:
        """Submit ``texts`` and wait for their outcomes, in order."""
        return [f.result() for f in self.submit_many(texts)]

    def close(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop taking texts; with ``drain`` embed everything already submitted, else resolve
        what is left as shutdown failures. Waits for the workers (up to ``timeout_s`` each)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                if not drain:
                    self._abort.set()
                for _ in self._workers:
                    self._queue.put(_STOP)  # FIFO: behind every submitted text
        for w in self._workers:
            w.join(timeout_s)

    def __enter__(self) -> EmbedQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=True)

    # -- workers -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._forming:  # one batch forms at a time: idle workers do not split it
                first = self._queue.get()
                if first is _STOP:
                    return
                assert isinstance(first, _Item)
                batch = [first]
                stop_after = self._fill(batch)
            try:
                self._process(batch)
            except BaseException as exc:  # never leave a future unresolved
                log.exception("embed worker failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_result(EmbedFailed(f"internal: {exc!r}", False, 0))
                raise
            if stop_after:
                return

    def _fill(self, batch: list[_Item]) -> bool:
        """Take more texts into ``batch`` until it is full or ``max_wait_s`` has passed; returns
        True when a stop marker was taken (the worker ends after this batch)."""
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                remaining = deadline - time.monotonic()
                nxt = (
                    self._queue.get_nowait() if remaining <= 0 else self._queue.get(True, remaining)
                )
            except queue.Empty:
                return False
            if nxt is _STOP:
                return True
            assert isinstance(nxt, _Item)
            batch.append(nxt)
        return False

    def _process(self, batch: list[_Item]) -> None:
        if self._abort.is_set():
            self._fail(batch, EmbedderError("shutdown before embedding", retryable=True), 0)
            return
        result, attempts = self._attempt([i.text for i in batch])
        if not isinstance(result, EmbedderError):
            for item, row in zip(batch, result, strict=True):
                item.future.set_result(Embedded(row, attempts))
            return
        if len(batch) == 1 or result.retryable:
            self._fail(batch, result, attempts)
            return
        for item in batch:  # a non-retryable batch error: find the texts that cause it
            self._process([item])

    def _attempt(self, texts: list[str]) -> tuple[npt.NDArray[np.float32] | EmbedderError, int]:
        result, attempts = embed_with_retry(
            self.embedder,
            texts,
            self.policy,
            sleep=self._sleep,
            rng=self._rng,
            should_stop=self._abort.is_set,
        )
        if not isinstance(result, EmbedderError) and result.shape[0] != len(texts):
            return EmbedderError(
                f"{self.embedder.name} returned {result.shape[0]} rows for {len(texts)} texts"
            ), attempts
        return result, attempts

    @staticmethod
    def _fail(batch: list[_Item], error: EmbedderError, attempts: int) -> None:
        for item in batch:
            item.future.set_result(EmbedFailed(str(error), error.retryable, attempts))
