"""A rollout replica whose server dies is replaced in its slot at the next weight push, with the current weights
and version, and registered with the load balancer; one whose replacement keeps dying at start-up ends the run
with its error; one that cannot be started again leaves the weight-sync set and training goes on.

The replicas and the balancer are real (``DiffusersRolloutReplica`` serving the tiny model, the
``OmniRequestLoadBalancer`` actor). Stand-ins: the actor worker group (what the trainer syncs is not the point
here, so it hands out fixed weights the way the real one does, as object refs) and, in the first test, replicas
whose class cannot start a server again (bare Ray actors with the servers' ``update_weights`` signature).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
from diffusers import SD3Transformer2DModel

from recipes.flowgrpo.config_compose import compose_recipe, training_sections
from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.diffusers_replica import DiffusersRolloutReplica
from verl_omni.workers.rollout.replica_pool import RolloutReplicaPool
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
class _Server:
    def __init__(self):
        self.versions: list[int] = []

    def update_weights(self, state_dict=None, version=None):
        self.versions.append(version)
        return version

    def seen(self) -> list[int]:
        return self.versions


def _kill(actor: Any) -> None:
    """SIGKILL ``actor`` and return once it is gone: ``ray.kill`` returns first, and a call sent meanwhile (the next
    weight push) could still be served."""
    ray.kill(actor)
    with contextlib.suppress(ray.exceptions.RayActorError):
        while True:
            ray.get(actor.__ray_ready__.remote())


class _ActorGroup:
    world_size = 1

    def put_rollout_weights(self, ema: bool = False):
        return [{"state_dict": ray.put({"w": 1.0})}]


def test_dead_replica_that_cannot_restart_is_dropped_from_weight_sync(ray_local, tmp_path):
    cfg = compose_recipe(f"trainer.default_local_dir={tmp_path}")
    servers = [_Server.remote() for _ in range(3)]
    replicas = [SimpleNamespace(servers=[s]) for s in servers]
    trainer = FlowGRPOTrainer(
        cfg,
        batcher=None,
        agent_loop_manager=None,
        actor_wg=_ActorGroup(),
        replicas=replicas,
        run_dir=tmp_path,
        sections=training_sections(cfg),
    )
    trainer._sync_weights()
    assert trainer.weight_sync_driver_bytes == 0  # the driver passed a ref on
    _kill(servers[1])
    trainer.version = 1
    trainer._sync_weights()  # does not raise
    assert trainer.replicas == [replicas[0], replicas[2]]
    assert trainer.rollout_replicas.metrics() == {
        "rollout/replicas_live": 2.0,
        "rollout/replicas_lost": 1.0,
        "rollout/replicas_replaced": 0.0,
    }
    trainer.version = 2
    trainer._sync_weights()
    assert ray.get(servers[0].seen.remote()) == [0, 1, 2] == ray.get(servers[2].seen.remote())

    for server in (servers[0], servers[2]):
        _kill(server)
    with pytest.raises(RuntimeError, match="every rollout replica is gone"):
        trainer._sync_weights()


@pytest.fixture
def model_copy(tiny_model_path, tmp_path) -> Path:
    """A copy of the tiny pipeline this test may break."""
    return Path(shutil.copytree(tiny_model_path, tmp_path / "model"))


def _replicas(model: Path, count: int) -> list[DiffusersRolloutReplica]:
    cfg = compose_recipe(
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.rollout.diffusion.num_inference_steps=2",
        "actor_rollout_ref.rollout.diffusion.height=32",
        "actor_rollout_ref.rollout.diffusion.width=32",
    )
    replicas = [
        DiffusersRolloutReplica(rank, cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.model, gpus_per_node=1)
        for rank in range(count)
    ]
    for replica in replicas:
        asyncio.run(replica.init_standalone())
    return replicas


def test_dead_replica_is_replaced_with_the_current_weights_then_a_failing_start_ends_the_run(ray_local, model_copy):
    replicas = _replicas(model_copy, 2)
    servers = {r.server_address: r.server_handle for r in replicas}
    balancer = ray.remote(OmniRequestLoadBalancer).remote(
        servers=servers, routing=RolloutServerRoutingConfig(policy="least_inflight")
    )
    pool = RolloutReplicaPool(replicas, balancer)
    transformer = SD3Transformer2DModel.from_pretrained(model_copy, subfolder="transformer")
    weights = {"state_dict": ray.put(transformer.state_dict())}
    pool.push(weights, version=0)

    victim = replicas[1]
    dead = victim.server_handle
    _kill(dead)
    pool.push(weights, version=1)
    assert pool.metrics() == {
        "rollout/replicas_live": 2.0,
        "rollout/replicas_lost": 1.0,
        "rollout/replicas_replaced": 1.0,
    }
    assert victim.server_handle is not dead and pool.live == replicas  # the same slot and address
    info = ray.get(victim.server_handle.ready.remote())
    assert info["server_id"] == "diffusers-replica-1" and info["model_version"] == 1  # weights pushed first
    assert sorted(ray.get(balancer.get_all_servers.remote())) == sorted(servers)
    # the balancer hands out the replacement (two acquires, least in flight: one on each replica), and it serves
    placed = [ray.get(balancer.acquire_group.remote([f"r{i}"]))[0][1] for i in range(2)]
    assert victim.server_handle._actor_id in {h._actor_id for h in placed}
    request = {"request_id": "r", "prompt_ids": "a red cube"}
    ray.get(victim.server_handle.generate_group.remote([request]))
    stats = ray.get(victim.server_handle.get_stats.remote())
    assert stats["requests_served"] == 1 and stats["model_version"] == 1

    # a replacement that cannot load its model dies at start-up every time: the run ends with that error
    for weights_file in (model_copy / "transformer").glob("*.safetensors"):
        weights_file.unlink()  # a new file: the live replica's memory map of the old one stays valid
        weights_file.write_bytes(b"not safetensors")
    _kill(victim.server_handle)
    with pytest.raises(RuntimeError, match=r"diffusers-replica-1: its replacement failed to start 3 times in a row"):
        pool.push(weights, version=2)
    assert pool.replaced == 1 and pool.lost == 2
