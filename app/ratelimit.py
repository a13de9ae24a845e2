"""Request rate limits per API key: a fixed window of ``rate_limit_requests`` per
``rate_limit_window_s`` seconds.

With a Redis URL (``DMAE_RATE_LIMIT_URL``, or a ``redis://`` broker URL) the counters live in
Redis (one script call per request: ``INCR``, and ``EXPIRE`` when the window's counter is new),
so the limit holds across every API process and
host sharing that Redis. Without one (the embedded default) they live in this process's memory.
If Redis cannot be reached, the process falls back to its in-memory counters (logged): requests
are still limited, per process, until Redis answers again.

``hit`` is a coroutine: the Redis call is awaited on the event loop (``redis.asyncio``), so a
request's rate-limit check costs no worker thread.
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
    """Fixed-window counters in Redis, shared by every process using the same URL."""

    def __init__(self, url: str, limit: int, window_s: int, namespace: str = "") -> None:
        self.url, self.limit, self.window_s = url, limit, window_s
        self.prefix = f"{KEY_PREFIX}:{namespace}" if namespace else KEY_PREFIX
        self.fallback = MemoryLimiter(limit, window_s)
        self._warned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._count: Any = None

    def _script(self) -> Any:
        """The counting script on a client of the running event loop (an asyncio client's
        connections belong to the loop that opened them; a server has one loop per process)."""
        import redis.asyncio

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=0.5, socket_connect_timeout=0.5
            )
            # One round trip and no pipeline object per request: the counter and its expiry
            # in one server-side step.
            self._count = self._client.register_script(
                "local c = redis.call('INCR', KEYS[1]) "
                "if c == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end return c"
            )
        return self._count

    async def aclose(self) -> None:
        """Close the Redis connections (at the server's shutdown, on its loop)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._loop = self._client = self._count = None

    async def hit(self, client_id: int) -> float | None:
        import redis

        now = time.time()
        window = int(now // self.window_s)
        key = f"{self.prefix}:{client_id}:{window}"
        try:
            count = int(await self._script()(keys=[key], args=[self.window_s + 1]))
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
