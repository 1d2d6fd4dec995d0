"""Through ChaosProxy: drops at random byte offsets, resumed streams equal uninterrupted ones."""

from __future__ import annotations

import random
from urllib.parse import urlsplit

import pytest

from conftest import Resources, settle_resources
from sidechain import GatewayHTTPClient, IdleTimeout, RetryPolicy
from sidechain.chaos import ChaosProxy, FaultPlan

FAST = RetryPolicy(base_delay=0.002, max_delay=0.01, max_attempts=10)


@pytest.mark.parametrize("kind", ["fin", "rst"])
async def test_random_drops_resume_to_identical_stream(fault_server: str, kind: str) -> None:
    parts = urlsplit(fault_server)
    rng = random.Random(kind)
    baseline_client = GatewayHTTPClient(fault_server)
    async with baseline_client.stream_post("/s?n=60&chunk=event", {}) as s:
        baseline = [e async for e in s]
    before = Resources.now()
    for trial in range(15):
        offset = rng.randint(1, 6000)

        def plan(n: int, offset: int = offset) -> FaultPlan:
            return FaultPlan(kind, after_bytes=offset) if n == 1 else FaultPlan()  # type: ignore[arg-type]

        async with ChaosProxy(parts.hostname or "127.0.0.1", parts.port or 80, plan=plan) as proxy:
            client = GatewayHTTPClient(proxy.url, retry=FAST)
            async with client.stream_post_with_retry(f"/s?n=60&chunk=event&t={trial}", {},
                                                     expect_terminal={"done"}) as s:
                got = [e async for e in s]
            assert got == baseline, f"offset {offset}"
    after = await settle_resources(before)
    assert after.fds <= before.fds and after.tasks <= before.tasks


async def test_stall_through_proxy_caught_by_idle_timeout(fault_server: str) -> None:
    parts = urlsplit(fault_server)
    async with ChaosProxy(parts.hostname or "127.0.0.1", parts.port or 80,
                          plan=lambda n: FaultPlan("stall", after_bytes=300)) as proxy:
        client = GatewayHTTPClient(proxy.url, idle_timeout=0.3)
        with pytest.raises(IdleTimeout):
            async with client.stream_post("/s?n=60", {}) as s:
                async for _ in s:
                    pass
