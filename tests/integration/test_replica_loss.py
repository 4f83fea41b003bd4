"""A rollout replica that dies between steps leaves the weight-sync set; training goes on with the others.

The replicas here are real Ray actors with the servers' ``update_weights`` signature; the actor worker
group is a stand-in returning fixed weights (what the trainer syncs is not the point of this test).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from recipes.flowgrpo.config_compose import compose_recipe
from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer

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


class _ActorGroup:
    world_size = 1

    def get_rollout_weights(self, ema: bool = False):
        return [{"state_dict": {"w": 1.0}}]


def test_dead_replica_is_dropped_from_weight_sync(ray_local, tmp_path):
    cfg = compose_recipe(f"trainer.default_local_dir={tmp_path}")
    servers = [_Server.remote() for _ in range(3)]
    replicas = [SimpleNamespace(servers=[s]) for s in servers]
    trainer = FlowGRPOTrainer(
        cfg, batcher=None, agent_loop_manager=None, actor_wg=_ActorGroup(), replicas=replicas, run_dir=tmp_path
    )
    trainer._sync_weights()
    ray.kill(servers[1])
    trainer.version = 1
    trainer._sync_weights()  # does not raise
    assert trainer.replicas == [replicas[0], replicas[2]] and trainer.replicas_lost == 1
    trainer.version = 2
    trainer._sync_weights()
    assert ray.get(servers[0].seen.remote()) == [0, 1, 2] == ray.get(servers[2].seen.remote())

    for server in (servers[0], servers[2]):
        ray.kill(server)
    with pytest.raises(RuntimeError, match="every rollout replica is gone"):
        trainer._sync_weights()
