"""Request rate limits per API key: a fixed window of ``rate_limit_requests`` per
``rate_limit_window_s`` seconds.

With a Redis URL (``DMAE_RATE_LIMIT_URL``, or a ``redis://`` broker URL) the counters live in
Redis (a script's ``INCR``, and ``EXPIRE`` when the window's counter is new), so the limit
holds across every API process and host sharing that Redis. Without one (the embedded default)
they live in this process's memory. If Redis cannot be reached, the process falls back to its
in-memory counters (logged): requests are still limited, per process, until Redis answers again.

``hit`` is a coroutine: the Redis call is awaited on the event loop (``redis.asyncio``), so a
request's rate-limit check costs no worker thread; concurrent requests' counts share one script
call (:class:`RedisLimiter`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from domain.config import Settings
from domain.errors import ServiceError

log = logging.getLogger("dmae.api")

KEY_PREFIX = "dmae:ratelimit"


class Limiter(Protocol):
    async def hit(self, client_id: int) -> float | None:
        """Count one request of ``client_id``; None if allowed, else seconds to wait."""
        ...


class MemoryLimiter:
    """Fixed-window counters in this process (thread-safe)."""

    def __init__(self, limit: int, window_s: int, clock: Callable[[], float] = time.time) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._counts: dict[int, tuple[int, int]] = {}  # client -> (window index, count)
        self._lock = threading.Lock()

    async def hit(self, client_id: int) -> float | None:
        return self.count(client_id)

    def count(self, client_id: int) -> float | None:
        """Count one request of ``client_id``; None if allowed, else seconds to wait."""
        now = self.clock()
        window = int(now // self.window_s)
        with self._lock:
            if len(self._counts) > 100_000:  # forget windows that are over
                self._counts = {k: v for k, v in self._counts.items() if v[0] == window}
            index, count = self._counts.get(client_id, (window, 0))
            if index != window:
                count = 0
            count += 1
            self._counts[client_id] = (window, count)
        if count <= self.limit:
            return None
        return (window + 1) * self.window_s - now


class RedisLimiter:
    """Fixed-window counters in Redis, shared by every process using the same URL.

    Concurrent requests are counted together: while one script call is on its way, the hits
    that arrive wait for it and then go as the next batch, one call for all their keys (each
    key's ``INCR``, and ``EXPIRE`` when its window's counter is new). Under load that is one
    round trip for many requests instead of one each; a hit alone costs one round trip, as
    before. Every hit is still counted in Redis before its request goes on.
    """

    BATCH = 256  # keys per script call at most
    SCRIPT = (
        "local out = {} "
        "for i, key in ipairs(KEYS) do "
        "local c = redis.call('INCR', key) "
        "if c == 1 then redis.call('EXPIRE', key, ARGV[1]) end "
        "out[i] = c end "
        "return out"
    )

    def __init__(self, url: str, limit: int, window_s: int, namespace: str = "") -> None:
        self.url, self.limit, self.window_s = url, limit, window_s
        self.prefix = f"{KEY_PREFIX}:{namespace}" if namespace else KEY_PREFIX
        self.fallback = MemoryLimiter(limit, window_s)
        self._warned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._count: Any = None
        self._waiting: list[tuple[str, asyncio.Future[int]]] = []
        self._sender: asyncio.Task[None] | None = None

    def _bind(self) -> asyncio.AbstractEventLoop:
        """The running loop, with this limiter's client and script on it (an asyncio client's
        connections belong to the loop that opened them; a server has one loop per process)."""
        import redis.asyncio

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=0.5, socket_connect_timeout=0.5
            )
            self._count = self._client.register_script(self.SCRIPT)
            self._waiting, self._sender = [], None
        return loop

    async def aclose(self) -> None:
        """Close the Redis connections (at the server's shutdown, on its loop)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._loop = self._client = self._count = self._sender = None

    async def _counted(self, key: str) -> int:
        """``key``'s counter with this hit, sent together with the other hits waiting."""
        loop = self._bind()
        counted: asyncio.Future[int] = loop.create_future()
        self._waiting.append((key, counted))
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return await counted

    async def _send(self) -> None:
        """Send the waiting hits in batches until none is left. A failed call is the error of
        its hits and of those that arrived during it (they fall back to memory, so a hit waits
        for at most one failing call); cancelled (at shutdown), it cancels them."""
        batch: list[tuple[str, asyncio.Future[int]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.BATCH], self._waiting[self.BATCH :]
                try:
                    counts = await self._count(
                        keys=[key for key, _ in batch], args=[self.window_s + 1]
                    )
                except Exception as exc:  # those that came meanwhile fall back too, at once
                    batch, self._waiting = batch + self._waiting, []
                    for _, counted in batch:
                        if not counted.done():
                            counted.set_exception(exc)
                    continue
                for (_, counted), count in zip(batch, counts, strict=True):
                    if not counted.done():  # its request may have gone meanwhile
                        counted.set_result(int(count))
        finally:
            self._sender = None
            for _, counted in batch + self._waiting:  # all done by now unless cancelled
                counted.cancel()

    async def hit(self, client_id: int) -> float | None:
        import redis

        now = time.time()
        window = int(now // self.window_s)
        key = f"{self.prefix}:{client_id}:{window}"
        try:
            count = await self._counted(key)
        except (redis.exceptions.RedisError, OSError) as exc:
            if not self._warned:
                log.warning("rate limiter: Redis unavailable (%s); counting in memory", exc)
                self._warned = True
            return self.fallback.count(client_id)
        self._warned = False
        if count <= self.limit:
            return None
        return (window + 1) * self.window_s - now


def make_limiter(settings: Settings) -> Limiter | None:
    """The limiter the settings ask for (None: no rate limit)."""
    if settings.rate_limit_requests <= 0:
        return None
    if settings.rate_limit_redis:
        return RedisLimiter(
            settings.rate_limit_redis,
            settings.rate_limit_requests,
            settings.rate_limit_window_s,
            namespace=settings.queue,
        )
    return MemoryLimiter(settings.rate_limit_requests, settings.rate_limit_window_s)


async def check(limiter: Limiter | None, client_id: int, limit: int, window_s: int) -> None:
    """429 with Retry-After when ``client_id`` is over its limit."""
    if limiter is None:
        return
    wait = await limiter.hit(client_id)
    if wait is not None:
        retry = max(1, math.ceil(wait))
        raise ServiceError(
            429,
            f"rate limit exceeded: at most {limit} requests per {window_s} s for one API key; "
            f"retry in {retry} s",
            {"Retry-After": str(retry)},
        )
