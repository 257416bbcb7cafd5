"""Fan-out from one producer to many viewers: each viewer reads its own bounded mailbox.

    engine thread: relay.publish(frame) -> every viewer's Mailbox.put (never waits; full: drop the oldest, count it)
    event loop:    await mailbox.get()   -> the viewer's next item

`put` may be called from any thread. It takes a short lock, never waits for a reader, and wakes a waiting reader
with `loop.call_soon_threadsafe`, at most one wake-up per wait, so the loop's own callback queue stays bounded too:
the engine thread meets the event loop only through these bounded mailboxes. A slow viewer skips items (counted in
`dropped`) and never stalls the producer or the other viewers (unlike aiortc's MediaRelay, whose queues are unbounded).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Generic, TypeVar

from framecast.models.errors import ConfigError, SessionClosed

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A bounded queue with one async reader: `put` from any thread never waits; when full it drops the oldest item.

    capacity 1 is a latest-frame mailbox; a few slots smooth out a reader that is late by a frame or two.
    Create it on the event loop that reads it (it binds to the running loop).
    """

    def __init__(self, capacity: int = 1, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity={capacity!r} must be an integer >= 1")
        self.capacity = capacity
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._is_closed = False
        self.put_count = 0  # items offered
        self.dropped = 0  # items pushed out unread by newer ones

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Offer an item (any thread; never waits). Ignored once closed."""
        with self._lock:
            if self._is_closed:
                return
            if len(self._items) == self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.put_count += 1
            waiter, self._waiter = self._waiter, None
        self._wake(waiter)

    def _wake(self, waiter: asyncio.Future[None] | None) -> None:
        if waiter is None:
            return
        try:
            self._loop.call_soon_threadsafe(_resolve, waiter)
        except RuntimeError:  # the loop is closed: nobody is left to read
            pass

    async def get(self) -> T:
        """The oldest unread item; waits for one. Raises SessionClosed once closed and empty."""
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                if self._is_closed:
                    raise SessionClosed("mailbox is closed")
                if self._waiter is not None:
                    raise RuntimeError("a Mailbox has one reader; get() is already waiting")
                waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None

    def close(self) -> None:
        """Stop accepting items (any thread; idempotent); the reader gets what is left, then SessionClosed."""
        with self._lock:
            self._is_closed = True
            waiter, self._waiter = self._waiter, None
        self._wake(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # the reader may have been cancelled meanwhile
        waiter.set_result(None)


class Relay(Generic[T]):
    """One producer, many viewers. `publish` (any thread) puts into every subscriber's mailbox and never waits.

    `dropped_total` counts the items every viewer, past ones included, skipped because it read too slowly.
    """

    def __init__(self, capacity: int = 1) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity={capacity!r} must be an integer >= 1")
        self.capacity = capacity
        self._viewers: set[Mailbox[T]] = set()
        self._lock = threading.Lock()
        self._is_closed = False
        self._dropped_by_departed = 0
        self.published = 0

    def subscribe(self, capacity: int | None = None) -> Mailbox[T]:
        """A new viewer's mailbox (call on the event loop that reads it); it gets items published from now on.

        Raises:
            SessionClosed: the relay is closed.
        """
        mailbox: Mailbox[T] = Mailbox(self.capacity if capacity is None else capacity)
        with self._lock:
            if self._is_closed:
                raise SessionClosed("relay is closed")
            self._viewers.add(mailbox)
        return mailbox

    def unsubscribe(self, mailbox: Mailbox[T]) -> None:
        """Remove a viewer and close its mailbox (idempotent)."""
        with self._lock:
            if mailbox in self._viewers:
                self._viewers.discard(mailbox)
                self._dropped_by_departed += mailbox.dropped
        mailbox.close()

    def publish(self, item: T) -> None:
        """Offer an item to every viewer (any thread; never waits)."""
        with self._lock:
            viewers = tuple(self._viewers)
            self.published += 1
        for mailbox in viewers:
            mailbox.put(item)

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    @property
    def dropped_total(self) -> int:
        with self._lock:
            return self._dropped_by_departed + sum(mailbox.dropped for mailbox in self._viewers)

    def close(self) -> None:
        """Close every mailbox; later subscribes raise SessionClosed (idempotent, any thread)."""
        with self._lock:
            self._is_closed = True
            viewers, self._viewers = tuple(self._viewers), set()
            self._dropped_by_departed += sum(mailbox.dropped for mailbox in viewers)
        for mailbox in viewers:
            mailbox.close()
