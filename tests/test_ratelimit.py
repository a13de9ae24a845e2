"""The Redis rate limiter on a real Redis: concurrent hits are counted exactly, across
limiters (API processes) too, in a few script calls rather than one each; a Redis that cannot
be reached falls back to memory for every waiting hit; a hit whose request went away does not
hold up the others. (The HTTP side, 429 and Retry-After, is in test_service_abuse.py.)"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from service_support import REDIS_URL

from app.ratelimit import RedisLimiter


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"dmae:ratelimit:{name}:*"):
        client.delete(key)
    client.close()


def count_calls(limiter: RedisLimiter) -> list[int]:
    """Wrap the limiter's bound script (after its first hit) to record each call's key count."""
    calls: list[int] = []
    script = limiter._count

    async def counted(*, keys: list[str], args: list[Any]) -> Any:
        calls.append(len(keys))
        return await script(keys=keys, args=args)

    limiter._count = counted
    return calls


def test_concurrent_hits_are_counted_exactly_in_a_few_calls(namespace: str) -> None:
    async def run() -> tuple[list[float | None], list[int]]:
        limiter = RedisLimiter(REDIS_URL, limit=100, window_s=60, namespace=namespace)
        assert await limiter.hit(7) is None  # binds the client and script to this loop
        calls = count_calls(limiter)
        waits = await asyncio.gather(*(limiter.hit(7) for _ in range(300)))
        await limiter.aclose()
        return list(waits), calls

    waits, calls = asyncio.run(run())
    assert waits.count(None) == 99  # 100 allowed with the first
    assert all(w is not None and 0 < w <= 60 for w in waits if w is not None)
    # One call per batch (256 keys at most), not one per hit: 300 hits -> 2 calls.
    assert sum(calls) == 300 and len(calls) <= 3, calls
    ttl = redis.Redis.from_url(REDIS_URL)
    (key,) = ttl.scan_iter(f"dmae:ratelimit:{namespace}:7:*")
    assert int(ttl.get(key) or 0) == 301 and 0 < ttl.ttl(key) <= 61
    ttl.close()


def test_two_limiters_sharing_redis_share_one_limit(namespace: str) -> None:
    """Two API processes' limiters, hits interleaved: 100 allowed in all, not 100 each."""

    async def run() -> list[float | None]:
        one, two = (RedisLimiter(REDIS_URL, 100, 60, namespace) for _ in range(2))
        waits = await asyncio.gather(*((one if i % 2 else two).hit(3) for i in range(240)))
        await one.aclose()
        await two.aclose()
        return list(waits)

    assert asyncio.run(run()).count(None) == 100


def test_redis_down_falls_back_to_memory_for_every_waiting_hit() -> None:
    async def run() -> list[float | None]:
        limiter = RedisLimiter("redis://127.0.0.1:1/0", limit=3, window_s=60)
        waits = await asyncio.gather(*(limiter.hit(5) for _ in range(10)))
        await limiter.aclose()
        return list(waits)

    assert asyncio.run(run()).count(None) == 3  # still limited, in this process


def test_a_hit_whose_request_went_away_does_not_hold_up_the_others(namespace: str) -> None:
    async def run() -> tuple[list[Any], int]:
        limiter = RedisLimiter(REDIS_URL, limit=10, window_s=60, namespace=namespace)
        tasks = [asyncio.ensure_future(limiter.hit(9)) for _ in range(5)]
        await asyncio.sleep(0)  # every hit is waiting for the batch now
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        after = await limiter.hit(9)  # and the limiter still works
        await limiter.aclose()
        return list(done), 0 if after is None else 1

    done, refused = asyncio.run(run())
    assert isinstance(done[2], asyncio.CancelledError)
    assert [d for i, d in enumerate(done) if i != 2] == [None] * 4 and refused == 0


def test_hits_arriving_during_a_failing_call_fall_back_with_it() -> None:
    """A Redis that accepts connections but never answers: each call fails after the 0.5 s
    socket timeout. Hits that arrive while a call is failing fall back with it, rather than
    waiting for a second timeout of their own."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # connections complete in the backlog; nothing ever answers

    async def run() -> tuple[list[float | None], list[int]]:
        limiter = RedisLimiter(f"redis://127.0.0.1:{hung.getsockname()[1]}/0", 4, 60)
        await limiter.hit(1)  # binds the script (and times out: counted in memory)
        calls = count_calls(limiter)
        early = [asyncio.ensure_future(limiter.hit(1)) for _ in range(3)]
        await asyncio.sleep(0.2)  # the early hits' call is on its way
        late = [asyncio.ensure_future(limiter.hit(1)) for _ in range(3)]
        waits = await asyncio.gather(*early, *late)
        await limiter.aclose()
        return list(waits), calls

    try:
        waits, calls = asyncio.run(run())
    finally:
        hung.close()
    assert calls == [3], calls  # the late hits made no call of their own
    assert waits.count(None) == 3  # 4 allowed in memory, the first hit included
