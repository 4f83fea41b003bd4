"""OmniLLMServerClient / OmniLLMServerManager on a real local Ray.

The rollout servers here are a small recording actor registered as a test replica backend: the
diffusers backend is exercised in its own tests, these check what the client and manager send
where (routing key to the balancer only, caller's request id to the server, release on error).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from recording_server import RecordingServer
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry

from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerClient, OmniLLMServerManager
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer


class RecordingReplica(RolloutReplica):
    """Standalone replica on CPU Ray resources (verl's init_standalone asks for GPUs)."""

    async def init_standalone(self):
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def launch_servers(self):
        name = f"recording-{self.replica_rank}"
        self._server_handle = RecordingServer.remote(name)
        self._server_address = name
        self.servers = [self._server_handle]


RolloutReplicaRegistry.register("recording_test", lambda: RecordingReplica)


def _trainer_config(*overrides: str):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose(
            "ppo_trainer",
            overrides=[
                "actor_rollout_ref.rollout.name=recording_test",
                "actor_rollout_ref.rollout.nnodes=1",
                "actor_rollout_ref.rollout.n_gpus_per_node=2",
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                *overrides,
            ],
        )


def _client_config():
    return OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "recording_test", "full_determinism": False}}})


def _balancer(servers, **routing):
    return ray.remote(OmniRequestLoadBalancer).remote(servers=servers, routing=RolloutServerRoutingConfig(**routing))


async def test_routing_key_reaches_balancer_not_server_and_request_id_is_forwarded(ray_local):
    servers = {f"s{i}": RecordingServer.remote(f"s{i}") for i in range(2)}
    lb = _balancer(servers, policy="prompt_uid_affinity")
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)

    async def one(uid: str, copy: int):
        group = await client.generate(f"{uid}-req-{copy}", prompt_ids=[copy], sampling_params={}, routing_key=uid)
        return group.samples[0]

    outs = await asyncio.gather(*[one(f"g{g}", c) for g in range(4) for c in range(4)])
    by_group: dict[str, set] = {}
    for out in outs:
        rid = out.extra_fields["request_id"]
        by_group.setdefault(rid.split("-req-")[0], set()).add(out.extra_fields["server"])
    assert all(len(s) == 1 for s in by_group.values())  # the key reached the balancer
    calls = sum((ray.get(s.get_calls.remote()) for s in servers.values()), [])
    assert sorted(c["request_id"] for c in calls if "request_id" in c) == sorted(
        f"g{g}-req-{c}" for g in range(4) for c in range(4)
    )
    status = ray.get(lb.get_status.remote())
    assert status["total_inflight"] == 0 and status["pinned_keys"] == 4


def test_manager_refuses_a_balancer_without_group_placement(ray_local):
    from verl.workers.rollout.router import GlobalRequestLoadBalancer

    with pytest.raises(TypeError, match="acquire_group.*OmniRequestLoadBalancer"):
        OmniLLMServerManager(_trainer_config(), load_balancer_cls=GlobalRequestLoadBalancer)


async def test_release_happens_when_server_raises(ray_local):
    servers = {"bad": RecordingServer.remote("bad", fail=True)}
    lb = _balancer(servers)
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    for i in range(3):
        with pytest.raises(Exception, match="server exploded"):
            await client.generate(f"r{i}", prompt_ids=[1], sampling_params={}, routing_key="g")
    for _ in range(50):  # release is fire-and-forget, as in verl
        if ray.get(lb.get_total_inflight.remote()) == 0:
            break
        await asyncio.sleep(0.02)
    status = ray.get(lb.get_status.remote())
    assert status["total_inflight"] == 0 and status["releases"] == 3


async def test_concurrent_acquire_release_through_actor_never_negative(ray_local):
    lb = _balancer({f"s{i}": None for i in range(4)}, policy="prompt_uid_affinity", max_imbalance=3)

    async def pair(i: int):
        sid, _ = await lb.acquire_server.remote(request_id=f"r{i}", routing_key=f"g{i % 7}")
        count = await lb.get_inflight_count.remote(sid)
        assert count >= 1
        await asyncio.sleep(0.001 * (i % 5))
        await lb.release_server.remote(server_id=sid)
        return sid

    picked = await asyncio.gather(*[pair(i) for i in range(400)])
    status = await lb.get_status.remote()
    assert status["total_inflight"] == 0
    assert all(v == 0 for v in status["servers"].values())
    assert sum(status["served"].values()) == 400 and len(set(picked)) > 1


@pytest.mark.parametrize("policy", ["prompt_uid_affinity", "round_robin"])
async def test_manager_builds_balancer_with_configured_policy(ray_local, policy):
    cfg = _trainer_config(
        f"+actor_rollout_ref.rollout.server_routing.policy={policy}",
        "+actor_rollout_ref.rollout.server_routing.max_imbalance=8",
    )
    manager = await OmniLLMServerManager.create(cfg)
    assert len(manager.get_replicas()) == 2
    status = await manager.global_load_balancer.get_status.remote()
    assert status["policy"] == policy and status["max_imbalance"] == 8
    assert sorted(status["servers"]) == ["recording-0", "recording-1"]
    client = manager.get_client()
    assert isinstance(client, OmniLLMServerClient)

    groups = await asyncio.gather(
        *[client.generate(f"r{i}", prompt_ids=[i], sampling_params={}, routing_key="g0") for i in range(6)]
    )
    outs = [g.samples[0] for g in groups]
    servers = [o.extra_fields["server"] for o in outs]
    if policy == "prompt_uid_affinity":
        assert len(set(servers)) == 1  # one group, one replica
    else:
        assert sorted(servers) == ["recording-0"] * 3 + ["recording-1"] * 3
    for replica in manager.get_replicas():
        ray.kill(replica.server_handle)


def test_manager_defaults_when_section_missing(ray_local):
    manager = OmniLLMServerManager.create(_trainer_config())
    status = ray.get(manager.global_load_balancer.get_status.remote())
    assert status["policy"] == "least_inflight" and status["max_imbalance"] is None


def test_manager_rejects_bad_policy_before_launching_replicas(ray_local):
    cfg = _trainer_config("+actor_rollout_ref.rollout.server_routing.policy=fastest")
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rollout\.server_routing\.policy='fastest'"):
        OmniLLMServerManager(cfg)


async def test_dead_replica_is_removed_and_requests_fail_over(ray_local):
    alive, dead = RecordingServer.remote("alive"), RecordingServer.remote("dead")
    await alive.get_calls.remote()
    await dead.get_calls.remote()
    lb = _balancer({"alive": alive, "dead": dead}, policy="prompt_hash_sharding")
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    ray.kill(dead)
    groups = await asyncio.gather(
        *[client.generate(f"r{i}", prompt_ids=[i], sampling_params={}, routing_key=f"g{i}") for i in range(12)]
    )
    outs = [g.samples[0] for g in groups]
    assert {o.extra_fields["server"] for o in outs} == {"alive"}  # every sample completed
    assert sorted(o.extra_fields["request_id"] for o in outs) == sorted(f"r{i}" for i in range(12))
    assert await lb.get_all_servers.remote() == ["alive"]


async def test_a_restarted_balancer_forgets_replicas_that_died_before_the_restart(ray_local):
    """Ray restarts the balancer from its creation arguments; a replica that died before must not come back."""
    alive, dead = RecordingServer.remote("alive"), RecordingServer.remote("dead")
    await alive.get_calls.remote()
    await dead.get_calls.remote()
    lb = (
        ray.remote(OmniRequestLoadBalancer)
        .options(max_restarts=1, max_task_retries=1)
        .remote(
            servers={"alive": alive, "dead": dead}, routing=RolloutServerRoutingConfig(policy="prompt_uid_affinity")
        )
    )
    assert sorted(await lb.get_all_servers.remote()) == ["alive", "dead"]
    assert (await lb.get_status.remote())["dropped_at_restart"] == []
    ray.kill(dead)
    ray.kill(lb, no_restart=False)  # returns before the old process is gone: wait for the restarted one
    deadline = time.monotonic() + 60
    while not (status := await lb.get_status.remote())["dropped_at_restart"]:
        assert time.monotonic() < deadline, f"the restarted balancer still lists {status['registered_handles']}"
        await asyncio.sleep(0.1)
    assert status["dropped_at_restart"] == ["dead"]
    assert await lb.get_all_servers.remote() == ["alive"]


async def test_server_error_is_not_retried(ray_local):
    lb = _balancer({"bad": RecordingServer.remote("bad", fail=True)})
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    with pytest.raises(Exception, match="server exploded"):
        await client.generate("r0", prompt_ids=[1], sampling_params={})
    assert await lb.get_all_servers.remote() == ["bad"]  # a request error is not a dead replica


# ----- a group in one call ------------------------------------------------------------------------------


def _group(uid: str, k: int) -> list[dict]:
    return [{"request_id": f"{uid}-req-{c}", "prompt_ids": [c], "sampling_params": {"seed": c}} for c in range(k)]


async def _settled(lb) -> dict:
    for _ in range(50):  # release is fire-and-forget, as in verl
        status = await lb.get_status.remote()
        if status["total_inflight"] == 0:
            return status
        await asyncio.sleep(0.02)
    return status


async def test_group_is_one_acquire_one_server_call_one_release(ray_local):
    servers = {f"s{i}": RecordingServer.remote(f"s{i}") for i in range(2)}
    lb = _balancer(servers, policy="prompt_uid_affinity")
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    groups = await asyncio.gather(*[client.generate_group(_group(f"g{g}", 4), routing_key=f"g{g}") for g in range(3)])
    for g, group in enumerate(groups):
        outs = group.samples
        assert [o.extra_fields["request_id"] for o in outs] == [f"g{g}-req-{c}" for c in range(4)]  # in order
        assert len({o.extra_fields["server"] for o in outs}) == 1
        assert all(o.extra_fields["min_global_steps"] is None for o in outs)  # as verl's generate sets it
    calls = sum((ray.get(s.get_calls.remote()) for s in servers.values()), [])
    assert sorted(c["group"] for c in calls if "group" in c) == [[f"g{g}-req-{c}" for c in range(4)] for g in range(3)]
    status = await _settled(lb)
    assert (status["acquire_calls"], status["release_calls"]) == (3, 3)  # per group, not per copy
    assert status["acquires"] == status["releases"] == 12 and sum(status["served"].values()) == 12
    assert sorted(status["served"].values()) == [4, 8]  # whole groups; the third went to the less loaded
    assert (await client.generate_group([], routing_key="g")).samples == []


async def test_group_holds_its_full_weight_while_in_flight(ray_local):
    servers = {name: RecordingServer.remote(name, delay=0.2) for name in ("a", "b")}
    lb = _balancer(servers, policy="prompt_uid_affinity")
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    running = asyncio.ensure_future(client.generate_group(_group("g0", 6), routing_key="g0"))
    for _ in range(100):
        if (await lb.get_total_inflight.remote()) == 6:
            break
        await asyncio.sleep(0.005)
    assert sorted((await lb.get_status.remote())["servers"].values()) == [0, 6]  # all six on the picked replica
    await running
    assert (await _settled(lb))["total_inflight"] == 0


async def test_group_on_a_dead_replica_is_resent_whole(ray_local):
    alive, dead = RecordingServer.remote("alive"), RecordingServer.remote("dead")
    await alive.get_calls.remote()
    await dead.get_calls.remote()
    lb = _balancer({"alive": alive, "dead": dead}, policy="prompt_uid_affinity")
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    ray.kill(dead)
    groups = await asyncio.gather(*[client.generate_group(_group(f"g{g}", 3), routing_key=f"g{g}") for g in range(4)])
    resent = 0
    for g, group in enumerate(groups):  # every sample of every group, in order, from the survivor
        outs = group.samples
        assert [o.extra_fields["request_id"] for o in outs] == [f"g{g}-req-{c}" for c in range(3)]
        assert {o.extra_fields["server"] for o in outs} == {"alive"}
        resent += sum(o.extra_fields["resent"] for o in outs)
    assert resent > 0  # some groups were placed on the dead replica first and sent again
    assert await lb.get_all_servers.remote() == ["alive"]
    assert (await _settled(lb))["total_inflight"] == 0


async def test_group_server_error_is_raised_not_retried_and_released(ray_local):
    lb = _balancer({"bad": RecordingServer.remote("bad", fail=True)})
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    with pytest.raises(Exception, match="server exploded"):
        await client.generate_group(_group("g", 3), routing_key="g")
    status = await _settled(lb)
    assert status["total_inflight"] == 0 and status["releases"] == 3 and status["release_calls"] == 1
    assert await lb.get_all_servers.remote() == ["bad"]


@pytest.mark.parametrize("policy", ["least_inflight", "round_robin"])
async def test_a_split_group_is_one_acquire_one_call_per_replica_one_release(ray_local, policy):
    servers = {f"s{i}": RecordingServer.remote(f"s{i}") for i in range(2)}
    lb = _balancer(servers, policy=policy)
    client = OmniLLMServerClient(config=_client_config(), load_balancer_handle=lb)
    outs = (await client.generate_group(_group("g", 6), routing_key="g")).samples
    assert [o.extra_fields["request_id"] for o in outs] == [f"g-req-{c}" for c in range(6)]
    assert sorted(o.extra_fields["server"] for o in outs) == ["s0"] * 3 + ["s1"] * 3
    calls = [ray.get(s.get_calls.remote()) for s in servers.values()]
    assert [len([c for c in cs if "group" in c]) for cs in calls] == [1, 1]  # one server call per replica used
    status = await _settled(lb)
    assert (status["acquire_calls"], status["release_calls"], status["split_groups"]) == (1, 1, 1)


def test_manager_hands_its_routing_config_to_every_client(ray_local):
    manager = OmniLLMServerManager(
        _trainer_config(
            "+actor_rollout_ref.rollout.server_routing.policy=prompt_uid_affinity",
            "+actor_rollout_ref.rollout.server_routing.routing_key_field=prompt",
        )
    )
    manager.global_load_balancer = None  # no replicas needed: get_client only reads the routing config
    client = manager.get_client()
    assert client.routing is manager.routing_config and client.routing.routing_key_field == "prompt"


def test_manager_rejects_the_removed_group_dispatch_key_before_launching_replicas(ray_local):
    cfg = _trainer_config("+actor_rollout_ref.rollout.server_routing.group_dispatch=true")
    with pytest.raises(ValueError, match=r"\['group_dispatch'\] in actor_rollout_ref\.rollout\.server_routing"):
        OmniLLMServerManager(cfg)
