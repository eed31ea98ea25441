"""Produce the next tensor of a writer's sequence while the current one is written.

A conversion reads a tensor, then writes it: done in turn, the disk (or the page cache copy) idles
half the time. :class:`Prefetcher` loads item ``i + 1`` in a background thread while the caller
writes item ``i``, but only when both fit in ``budget`` bytes (by default the largest item), so a
conversion still holds at most about one largest tensor. Loads never overlap each other (the
converters' sources cache their last whole tensor and are not thread-safe): a prefetch runs only
while the caller writes, and a request for anything else first waits for it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Prefetcher:
    """``get(key)`` returns ``loads[key]()``; keys are expected in the order of ``keys``."""

    def __init__(
        self,
        keys: Sequence[Hashable],
        loads: Callable[[Hashable], Any],
        sizes: Callable[[Hashable], int],
        budget: int | None = None,
    ) -> None:
        self.keys, self.loads, self.sizes = list(keys), loads, sizes
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.budget = budget if budget is not None else max(map(sizes, self.keys), default=0)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yuanlfa-prefetch")
        self._ahead: tuple[Hashable, Future] | None = None

    def get(self, key: Hashable) -> Any:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            value = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel() or ahead[1].exception()  # wait; never two loads at once
                del ahead
            value = self.loads(key)
        i = self.position.get(key)
        if i is not None and i + 1 < len(self.keys):
            following = self.keys[i + 1]
            if self.sizes(key) + self.sizes(following) <= self.budget:
                self._ahead = (following, self._pool.submit(self.loads, following))
        return value

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel() or self._ahead[1].exception()
            self._ahead = None
        self._pool.shutdown()
