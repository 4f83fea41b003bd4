"""The load balancer SIGKILLed mid-burst: the restarted actor counts what still runs and keeps the pins.

Real Ray actors: the balancer, and rollout servers that hold every request until the test lets it finish
(``RecordingServer(gated=True)``, a double: real replicas finish on their own time, so the balancer's counts
could not be compared with what the replicas run at one instant). The clients are the overlay's own.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from omegaconf import OmegaConf
from recording_server import RecordingServer

from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerClient
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer

pytestmark = pytest.mark.integration

KEYS = [f"g{i}" for i in range(6)]  # sent copy by copy by client A
GROUPS = ["h0", "h1"]  # sent as whole groups of 3 by client B


def _client(lb) -> OmniLLMServerClient:
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "recording_test", "full_determinism": False}}})
    return OmniLLMServerClient(config=config, load_balancer_handle=lb)


async def _until(condition, what: str, timeout_s: float = 60.0):
    """Poll ``condition`` (a coroutine function returning a value or None) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := await condition()):
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)
    return value


async def _in_flight(servers) -> dict[str, list[str]]:
    return {sid: await server.in_flight.remote() for sid, server in servers.items()}


async def test_balancer_killed_mid_burst_recovers_counts_and_pins(ray_local):
    servers = {f"s{i}": RecordingServer.remote(f"s{i}", gated=True) for i in range(2)}
    lb = (
        ray.remote(OmniRequestLoadBalancer)
        .options(max_restarts=1, max_task_retries=1)
        .remote(servers=servers, routing=RolloutServerRoutingConfig(policy="prompt_uid_affinity"))
    )
    a, b = _client(lb), _client(lb)

    def copy(key: str, i: int):
        return asyncio.ensure_future(a.generate(f"{key}-{i}", prompt_ids=[i], sampling_params={}, routing_key=key))

    first = [copy(key, 0) for key in KEYS]
    groups = [
        asyncio.ensure_future(
            b.generate_group(
                [{"request_id": f"{g}-{i}", "prompt_ids": [i], "sampling_params": {}} for i in range(3)], routing_key=g
            )
        )
        for g in GROUPS
    ]

    async def running(n: int):
        flight = await _in_flight(servers)
        return flight if sum(map(len, flight.values())) == n else None

    await _until(lambda: running(12), "12 requests in flight")
    old = (await lb.get_status.remote())["incarnation"]

    ray.kill(lb, no_restart=False)  # SIGKILL; Ray restarts the actor from its creation arguments

    async def restarted():
        status = await lb.get_status.remote()
        return status if status["incarnation"] != old else None

    status = await _until(restarted, "the balancer restarted")
    assert status["total_inflight"] == 0  # nothing counted until the clients restore what they hold

    second = [copy(key, 1) for key in KEYS]  # A's next acquire restores A's leases first
    flight = await _until(lambda: running(18), "18 requests in flight")
    status = await lb.get_status.remote()
    assert status["restored"] == len(KEYS)
    for sid, ids in flight.items():  # B has not noticed yet: its groups are not counted, nothing is counted twice
        assert status["servers"][sid] == len([i for i in ids if i.startswith("g")])

    # One of B's groups finishes: its release (placed by the earlier life) is ignored, and its answer tells B of
    # the restart, so B restores the group still in flight.
    (h0_server,) = [sid for sid, ids in flight.items() if "h0-0" in ids]
    await servers[h0_server].finish.remote([f"h0-{i}" for i in range(3)])
    await groups[0]

    async def counts_match():
        flight, status = await _in_flight(servers), await lb.get_status.remote()
        return status if all(status["servers"][sid] == len(ids) for sid, ids in flight.items()) else None

    status = await _until(counts_match, "the balancer's counts equal what the replicas run")
    assert status["restored"] == len(KEYS) + 3 and min(status["servers"].values()) >= 0

    for server in servers.values():
        await server.finish_all.remote()
    outs = [g.samples for g in await asyncio.gather(*first, *second, *groups)]
    for key, (one,), (two,) in zip(KEYS, outs[: len(KEYS)], outs[len(KEYS) : 2 * len(KEYS)], strict=True):
        assert one.extra_fields["server"] == two.extra_fields["server"], f"{key}: copies split by the restart"
    for group in outs[2 * len(KEYS) :]:
        assert len({o.extra_fields["server"] for o in group}) == 1

    async def settled():
        status = await lb.get_status.remote()
        return status if status["total_inflight"] == 0 and status["leases"] == 0 else None

    status = await _until(settled, "every release counted")  # releases are fire-and-forget
    assert set(status["servers"].values()) == {0}  # no phantom load left behind
