"""Producer/consumer overlap: run any batch iterator in a background thread, a bounded number of items ahead.

`Prefetcher(iterable, depth)` iterates `iterable` in one daemon thread (the producer) and hands its items,
in the same order, to whoever iterates the Prefetcher (the consumer), holding at most `depth` finished
items in between. When harvesting activations feeds training, the forward passes of the next batches
then run while the trainer steps on the current one, and the job takes about as long as the slower
of the two instead of their sum. Torch releases the GIL inside its kernels, so one Python thread is
enough.

Contract:
  * order and content: exactly the items of `iterable`, in its order (one producer, a FIFO queue);
  * errors: an exception raised by `iterable` is raised again, the same object, by the consumer's
    next ``next()`` after the items produced before it;
  * shutdown: `close()` (also on leaving a ``with`` block, or when the Prefetcher is garbage
    collected, e.g. after an early ``break`` or ``itertools.islice``) stops the producer at its next
    item, closes `iterable` in the producer thread (running a generator's ``finally`` blocks there)
    and joins the thread; no thread outlives the Prefetcher;
  * memory: `depth` items plus the one being produced and the one being consumed;
  * torch threads: with ``threads`` the producer sets its own intra-op thread count (torch's thread
    count is per thread; `split_threads` gives the sensible split of a budget between producer and
    consumer: on 2 cores, one each).
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

import torch

from featurekit.errors import FeaturekitError

T = TypeVar("T")
_POLL = 0.05  # seconds between checks of the stop flag while the producer waits for room


class _End:
    """Sentinel: the producer finished (``error`` is None) or failed with ``error``."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def split_threads(total: int) -> tuple[int, int]:
    """(producer, consumer) torch intra-op threads for a budget of `total`: the producer gets ⌊total/2⌋
    (at least 1), the consumer the rest (at least 1). On 2 cores that is one each: two single-threaded
    streams of work overlap, where two 2-thread pools would fight over the cores."""
    total = max(1, int(total))
    producer = max(1, total // 2)
    return producer, max(1, total - producer)


class Prefetcher(Generic[T]):
    """Iterator over the items of `iterable`, produced by a background thread up to `depth` items ahead
    (module docstring). `threads`: torch intra-op threads of the producer (None leaves torch's setting)."""

    def __init__(self, iterable: Iterable[T], depth: int = 2, threads: int | None = None, name: str = "featurekit-prefetch"):
        if depth < 1:
            raise FeaturekitError(f"Prefetcher depth must be >= 1 (got {depth})")
        if threads is not None and threads < 1:
            raise FeaturekitError(f"Prefetcher threads must be >= 1 or None (got {threads})")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread holds the queue, the flag and the source, never `self`: an abandoned Prefetcher is collected,
        # and its finalizer stops and joins the thread.
        self._thread = threading.Thread(target=_produce, args=(iter(iterable), self._queue, self._stop, threads),
                                        name=name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._thread, self._queue, self._stop)

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # cannot happen: the producer always ends with _End
                    self._done = True
                    raise FeaturekitError("the prefetch thread ended without finishing its stream") from None
        if isinstance(item, _End):
            self._done = True
            self._finalizer()  # joins the finished thread
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer, close the source iterator (in the producer thread) and join the thread. Idempotent."""
        self._done = True
        self._finalizer()

    @property
    def alive(self) -> bool:
        """True while the producer thread runs."""
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetch(iterable: Iterable[T], depth: int = 2, threads: int | None = None) -> Prefetcher[T]:
    """`Prefetcher(iterable, depth, threads)`."""
    return Prefetcher(iterable, depth=depth, threads=threads)


def _produce(source: Iterator, q: queue.Queue, stop: threading.Event, threads: int | None) -> None:
    end = _End()
    try:
        if threads is not None:
            torch.set_num_threads(threads)  # this thread's count (torch keeps one per thread)
        for item in source:
            if not _put(q, stop, item):
                return
    except BaseException as exc:  # noqa: BLE001 — handed to the consumer, which raises it
        end = _End(exc)
    finally:
        try:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a generator's finally blocks run here, in the thread that ran it
        except BaseException as exc:  # noqa: BLE001
            end = end if end.error is not None else _End(exc)
    _put(q, stop, end)


def _put(q: queue.Queue, stop: threading.Event, item: object) -> bool:
    """Put `item`, waiting for room; False when asked to stop first."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def _shutdown(thread: threading.Thread, q: queue.Queue, stop: threading.Event) -> None:
    stop.set()
    while True:  # drop what is queued so the producer is not holding memory while it notices the flag
        try:
            q.get_nowait()
        except queue.Empty:
            break
    if thread is not threading.current_thread():
        thread.join()
