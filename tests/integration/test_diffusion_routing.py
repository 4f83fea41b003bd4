"""The routing key's path uid -> agent loop -> client -> balancer -> replica, on real Ray actors.

CPU, local Ray, the ``diffusers`` backend serving the tiny model, everything launched through
``OmniLLMServerManager`` and ``OmniAgentLoopManager`` as the recipe does. One pair of agent-loop workers serves every
test (each worker's start imports verl: about 10 CPU-seconds); a test points them at its replicas and policy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import ray
import torch
from verl.protocol import DataProto

from verl_omni.agent_loop import OmniAgentLoopManager
from verl_omni.utils.arrays import object_column
from verl_omni.workers.config.rollout_routing import VALID_ROLLOUT_SERVER_ROUTING_POLICIES
from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerManager

pytestmark = pytest.mark.integration

PROMPTS, N = 4, 4


def _config(model_path: str, replicas: int, workers: int, policy: str = "prompt_uid_affinity"):
    from recipes.flowgrpo.config_compose import compose_recipe

    return compose_recipe(
        f"actor_rollout_ref.model.path={model_path}",
        f"server_routing.policy={policy}",
        f"actor_rollout_ref.rollout.n_gpus_per_node={replicas}",
        f"actor_rollout_ref.rollout.agent.num_workers={workers}",
        f"actor_rollout_ref.rollout.n={N}",
        "actor_rollout_ref.rollout.diffusion.num_inference_steps=4",
        "actor_rollout_ref.rollout.diffusion.height=32",
        "actor_rollout_ref.rollout.diffusion.width=32",
    )


def _batch(step: int = 0, prompts: int = PROMPTS) -> DataProto:
    texts = [f"a {c} cube on a table" for c in ("red", "green", "blue", "yellow", "white", "black")[:prompts]]
    rows = [(texts[p], f"uid-{step}-{p}") for p in range(prompts) for _ in range(N)]
    return DataProto.from_dict(
        non_tensors={
            "prompt": object_column([r[0] for r in rows]),
            "uid": object_column([r[1] for r in rows]),
            "row_index": np.arange(len(rows)),
        },
        meta_info={"global_steps": step, "seed": 1234, "validate": False},
    )


def _by_request(out: DataProto) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    ids = out.non_tensor_batch["request_id"]
    return {rid: (out.batch["image"][i], out.batch["log_probs"][i]) for i, rid in enumerate(ids)}


@pytest.fixture(scope="module")
def two_replicas(ray_local, tiny_model_path):
    manager = OmniLLMServerManager.create(_config(tiny_model_path, replicas=2, workers=2))
    yield manager
    for replica in manager.get_replicas():
        for server in replica.servers:
            ray.kill(server)


@pytest.fixture(scope="module")
def workers(two_replicas, tiny_model_path) -> Iterator[OmniAgentLoopManager]:
    """Two agent-loop workers (the recipe's default), shared by the module's tests."""
    loops = OmniAgentLoopManager.create(_config(tiny_model_path, replicas=2, workers=2), two_replicas.get_client())
    yield loops
    for worker in loops.agent_loop_workers:
        ray.kill(worker)


def _agent_loops(workers: OmniAgentLoopManager, manager: OmniLLMServerManager) -> OmniAgentLoopManager:
    """The shared workers, sending through ``manager``'s balancer (its current policy)."""
    workers.set_client(manager.get_client())
    return workers


def test_uid_reaches_balancer_affinity_colocates_groups(two_replicas, workers):
    two_replicas.set_routing(policy="prompt_uid_affinity")
    loops = _agent_loops(workers, two_replicas)
    out = loops.generate_sequences(_batch())
    metrics = out.meta_info["metrics"]
    assert metrics["rollout_routing/colocation"] == 1.0
    assert metrics["rollout_routing/replicas_used"] == 2.0  # groups spread, copies stay together
    served = out.non_tensor_batch["rollout_server"]
    for uid in set(out.non_tensor_batch["uid"]):
        assert len({s for s, u in zip(served, out.non_tensor_batch["uid"], strict=True) if u == uid}) == 1
    assert out.batch["image"].dtype == torch.uint8 and out.batch["image"].shape[0] == PROMPTS * N
    assert out.batch["rewards"].shape == (PROMPTS * N,)

    two_replicas.set_routing(policy="least_inflight")
    loops.set_client(two_replicas.get_client())
    metrics = loops.generate_sequences(_batch(step=1)).meta_info["metrics"]
    assert metrics["rollout_routing/colocation"] < 1.0  # request-id routing scatters the groups


def test_same_seeds_same_samples_under_every_policy_and_replica_count(
    ray_local, two_replicas, tiny_model_path, workers
):
    """One replica, then two under each policy: the same samples, bit for bit. (The batch's split over one or two
    agent-loop workers changes none either: tests/integration/test_flowgrpo_recipe.py runs both.)"""
    one_cfg = _config(tiny_model_path, replicas=1, workers=2, policy="least_inflight")
    one_replica = OmniLLMServerManager.create(one_cfg, start_rank=10)
    loops = _agent_loops(workers, one_replica)
    reference = _by_request(loops.generate_sequences(_batch(step=3)))
    for replica in one_replica.get_replicas():
        for server in replica.servers:
            ray.kill(server)

    loops = _agent_loops(workers, two_replicas)
    for policy in VALID_ROLLOUT_SERVER_ROUTING_POLICIES:
        two_replicas.set_routing(policy=policy)
        loops.set_client(two_replicas.get_client())
        got = _by_request(loops.generate_sequences(_batch(step=3)))
        assert got.keys() == reference.keys()
        for rid, (image, log_probs) in got.items():
            assert torch.equal(image, reference[rid][0]), (policy, rid)
            assert torch.equal(log_probs, reference[rid][1]), (policy, rid)


def test_replica_removed_mid_run_loses_no_sample(two_replicas, workers):
    two_replicas.set_routing(policy="round_robin")
    loops = _agent_loops(workers, two_replicas)
    balancer = loops.llm_client._load_balancer
    servers = ray.get(balancer.get_all_servers.remote())
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", loops.generate_sequences(_batch(step=5))))
    thread.start()
    ray.get(balancer.remove_servers.remote([servers[1]]))  # while the burst is in flight
    thread.join(timeout=300)
    out = result["out"]
    assert out.batch["image"].shape[0] == PROMPTS * N  # every sample completed
    assert set(out.non_tensor_batch["rollout_server"]) <= set(servers)  # and says which replica served it
    after = loops.generate_sequences(_batch(step=6))
    assert set(after.non_tensor_batch["rollout_server"]) == {servers[0]}
    ray.get(balancer.add_servers.remote({servers[1]: two_replicas.get_replicas()[1].server_handle}))


def _calls(manager: OmniLLMServerManager, balancer) -> tuple[int, int, int]:
    """(balancer acquire calls, release calls, replica generate calls) so far; waits for releases to land."""
    for _ in range(200):  # releases are fire-and-forget
        status = ray.get(balancer.get_status.remote())
        if status["total_inflight"] == 0:
            break
        time.sleep(0.01)
    stats = ray.get([r.server_handle.get_stats.remote() for r in manager.get_replicas()])
    return status["acquire_calls"], status["release_calls"], sum(s["generate_calls"] for s in stats)


# a policy that keeps a group whole and one that splits it; every policy's placement rule is unit-tested in
# tests/test_request_routing.py (the group placement equals acquiring the copies one by one)
@pytest.mark.parametrize("policy", ["prompt_uid_affinity", "least_inflight"])
def test_a_group_is_placed_in_one_acquire_and_one_release(two_replicas, policy, workers):
    """One request path: per group one acquire and one release, one server call per replica the group used."""
    two_replicas.set_routing(policy=policy)
    loops = _agent_loops(workers, two_replicas)
    client = two_replicas.get_client()
    before = _calls(two_replicas, client._load_balancer)
    out = loops.generate_sequences(_batch(step=7))
    acquires, releases, server_calls = (
        a - b for a, b in zip(_calls(two_replicas, client._load_balancer), before, strict=True)
    )
    # B prompts x n copies, split over 2 workers at group boundaries: each group is placed in one call
    assert (acquires, releases) == (PROMPTS, PROMPTS)
    assert PROMPTS <= server_calls <= 2 * PROMPTS
    metrics = out.meta_info["metrics"]
    if policy in ("prompt_uid_affinity", "prompt_hash_sharding"):
        assert server_calls == PROMPTS and metrics["rollout_routing/colocation"] == 1.0
    assert (acquires + releases) / (PROMPTS * N) == 2 / N  # balancer calls per sample (one request at a time: 2)
    assert metrics["rollout_routing/requests_resent"] == 0.0
    for key in ("rollout_server", "rollout_batch_size", "rollout_cache_hit", "rollout_generate_s", "reward_s"):
        assert all(v is not None for v in out.non_tensor_batch[key]), key


def test_group_on_a_replica_that_dies_mid_run_loses_no_sample(ray_local, two_replicas, tiny_model_path, workers):
    cfg = _config(tiny_model_path, replicas=2, workers=2)
    two_replicas.set_routing(policy="least_inflight")  # the reference: both replicas alive
    loops = _agent_loops(workers, two_replicas)
    reference = loops.generate_sequences(_batch(step=8))

    doomed = OmniLLMServerManager.create(cfg, start_rank=20)  # its own replicas: one of them is killed
    client = doomed.get_client()
    loops = _agent_loops(workers, doomed)
    victim = doomed.get_replicas()[1]
    balancer = client._load_balancer
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", loops.generate_sequences(_batch(step=8))))
    thread.start()
    deadline = time.perf_counter() + 120
    while ray.get(balancer.get_inflight_count.remote(victim.server_address)) == 0:  # its groups are in flight
        assert time.perf_counter() < deadline
        time.sleep(0.005)
    ray.kill(victim.server_handle)
    thread.join(timeout=300)
    out = result["out"]
    survivor = doomed.get_replicas()[0].server_address
    assert ray.get(balancer.get_all_servers.remote()) == [survivor]
    assert list(out.non_tensor_batch["request_id"]) == list(reference.non_tensor_batch["request_id"])
    for key in ("image", "log_probs", "rewards"):  # every sample, and none changed by the resend
        assert torch.equal(out.batch[key], reference.batch[key]), key
    assert out.meta_info["metrics"]["rollout_routing/requests_resent"] > 0
    ray.kill(doomed.get_replicas()[0].server_handle)


def _in_background(loops: OmniAgentLoopManager, batch: DataProto) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", loops.generate_sequences(batch)))
    thread.start()
    return thread, result


def _wait_for_inflight(balancer, timeout_s: float = 120) -> None:
    deadline = time.perf_counter() + timeout_s
    while ray.get(balancer.get_total_inflight.remote()) == 0:
        assert time.perf_counter() < deadline, "the burst never reached the replicas"
        time.sleep(0.005)


def test_balancer_killed_mid_rollout_is_restarted_and_loses_no_sample(two_replicas, workers):
    two_replicas.set_routing(policy="prompt_uid_affinity")
    loops = _agent_loops(workers, two_replicas)
    reference = loops.generate_sequences(_batch(step=11))
    balancer = two_replicas.global_load_balancer
    thread, result = _in_background(loops, _batch(step=11))
    _wait_for_inflight(balancer)
    ray.kill(balancer, no_restart=False)  # the process dies; Ray restarts it from its creation arguments
    thread.join(timeout=300)
    out = result["out"]
    for key in ("image", "log_probs", "rewards"):  # every sample, identical to the healthy run
        assert torch.equal(out.batch[key], reference.batch[key]), key
    status = ray.get(balancer.get_status.remote())  # the same handle reaches the restarted balancer
    assert sorted(status["registered_handles"]) == sorted(r.server_address for r in two_replicas.get_replicas())
    where: dict[str, set] = {}
    for uid, server in zip(out.non_tensor_batch["uid"], out.non_tensor_batch["rollout_server"], strict=True):
        where.setdefault(uid, set()).add(server)
    assert all(len(servers) == 1 for servers in where.values()), where  # every group stayed on one replica
    for _ in range(200):  # late releases of the earlier life are ignored, restored leases released: nothing left
        if (status := ray.get(balancer.get_status.remote()))["total_inflight"] == 0 and status["leases"] == 0:
            break
        time.sleep(0.01)
    assert (status["total_inflight"], status["leases"]) == (0, 0), status["servers"]
    assert loops.generate_sequences(_batch(step=12)).batch["image"].shape[0] == PROMPTS * N


def test_agent_loop_worker_killed_mid_rollout_reruns_its_share_and_frees_its_load(two_replicas, tiny_model_path):
    """Workers of its own: Ray restarts a killed worker from its creation arguments, so they must name the current
    balancer (each ``set_routing`` of the other tests made a new one)."""
    two_replicas.set_routing(policy="prompt_uid_affinity")
    cfg = _config(tiny_model_path, replicas=2, workers=2)
    loops = OmniAgentLoopManager.create(cfg, two_replicas.get_client())
    reference = loops.generate_sequences(_batch(step=13))
    balancer = loops.llm_client._load_balancer
    thread, result = _in_background(loops, _batch(step=13))
    deadline = time.perf_counter() + 120
    while not any(owner.startswith("agent_loop_worker_0_") for owner in ray.get(balancer.get_status.remote())["held"]):
        assert time.perf_counter() < deadline, "worker 0 never had a group in flight"
        time.sleep(0.005)
    ray.kill(loops.agent_loop_workers[0], no_restart=False)  # its groups stay in flight at the balancer
    thread.join(timeout=300)
    out = result["out"]
    assert list(out.non_tensor_batch["request_id"]) == list(reference.non_tensor_batch["request_id"])
    for key in ("image", "log_probs", "rewards"):  # the killed worker's chunk was re-run: same samples
        assert torch.equal(out.batch[key], reference.batch[key]), key
    for _ in range(200):  # the restarted worker freed what its lost run held; releases are fire-and-forget
        if ray.get(balancer.get_total_inflight.remote()) == 0:
            break
        time.sleep(0.01)
    assert ray.get(balancer.get_total_inflight.remote()) == 0  # no phantom load steers later picks
    for worker in loops.agent_loop_workers:
        ray.kill(worker)
