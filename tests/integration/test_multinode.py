"""The FlowGRPO recipe on a three-node Ray cluster on one machine (``ray.cluster_utils.Cluster``), CPU only.

Three Ray nodes (a head and two workers, each its own raylet with its own CPUs) stand in for machines. The recipe
places the actors itself (``recipes.flowgrpo.main.launch``: verl's ``RayResourcePool`` for the training ranks, one
actor per ``diffusers`` replica); the node sizes steer that placement the way GPU counts do on a real cluster.
Replicas are placed first: one asks for 2.5 CPUs, so the head (4 CPUs) and the rollout node (3) hold one each and
the training node (1) none. Training is ``trainer.nnodes=2`` placement groups of ``trainer.cpu_ranks_per_node=1``
CPU: verl does not send them to different nodes, the free CPUs do (1.5 on the head, 1 on the training node, 0.5
on the rollout node), so one FSDP2 rank (gloo) runs on the head and one on the training node. Then the rollout
node is removed while its replica holds a group: the replica leaves the balancer, its copies are resent with the
same seeds, the step completes with full groups, and the next step runs on the head's replica, both ranks alive.

One agent-loop worker (started on the driver's node), so the lost node holds a replica and nothing else and every
assertion is exact; a lost node that also takes an agent-loop worker (restarted by Ray elsewhere) makes which
copies are resent, and when the dead replica leaves the balancer, depend on timing; a lost node with a training
rank stops the run. What this does not cover: GPUs, NCCL across machines, real network latency, and losing the
head node (see docs/advanced_features/multinode.md).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import ray
import warm_recipe
from hydra.core.global_hydra import GlobalHydra
from ray.cluster_utils import Cluster

from recipes.flowgrpo.config_compose import compose_recipe
from recipes.flowgrpo.main import ConfigError, launch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A replica fits the head and the rollout node, one each; then a 1-CPU training group fits the head and the
# training node, one each (see the module docstring). Ray only takes whole CPUs per node.
HEAD_CPUS, TRAIN_NODE_CPUS, ROLLOUT_NODE_CPUS, REPLICA_CPUS = 4, 1, 3, 2.5
NODES = "3 nodes (4, 3, 1 CPUs)"  # as the startup check describes the cluster
PROMPTS, N, STEPS, LOST_AT = 2, 4, 4, 2  # the node is removed during step 2's rollout
TINY = [
    f"data.train_batch_size={PROMPTS}",
    f"actor_rollout_ref.rollout.n={N}",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.diffusion.num_inference_steps=4",
    "actor_rollout_ref.rollout.diffusion.height=32",
    "actor_rollout_ref.rollout.diffusion.width=32",
    # one replica on each of 2 nodes, as verl counts replicas (n_gpus_per_node x nnodes / parallel sizes)
    "actor_rollout_ref.rollout.nnodes=2",
    "actor_rollout_ref.rollout.n_gpus_per_node=1",
    f"+actor_rollout_ref.rollout.diffusion.ray_num_cpus={REPLICA_CPUS}",
    # agent-loop workers go round-robin over the nodes from the driver's: one leaves the worker nodes without any
    "actor_rollout_ref.rollout.agent.num_workers=1",
    # two training ranks, one placement group of 1 CPU rank per node (verl's RayResourcePool): FSDP2 over gloo
    "trainer.nnodes=2",
    "trainer.cpu_ranks_per_node=1",
    "ray_kwargs.ray_init.num_cpus=null",  # joining a cluster: Ray refuses a CPU count
    f"trainer.total_training_steps={STEPS}",
    "trainer.logger=[file]",
    "trainer.save_freq=-1",
    "trainer.sample_freq=-1",
    "trainer.test_freq=-1",
    "trainer.val_before_train=false",
]


class ThreeNodes(NamedTuple):
    """The ``Cluster`` and its two worker nodes by role."""

    cluster: Cluster
    train_node: Any  # ray._private.node.Node: 1 CPU, for a training rank
    rollout_node: Any  # 3 CPUs, for a replica; the one removed


@pytest.fixture(scope="module")
def nodes() -> Any:
    """A head and two worker nodes, this process connected as the driver (on the head)."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": HEAD_CPUS, "num_gpus": 0, "include_dashboard": False}
    )
    train_node = cluster.add_node(num_cpus=TRAIN_NODE_CPUS, num_gpus=0)
    rollout_node = cluster.add_node(num_cpus=ROLLOUT_NODE_CPUS, num_gpus=0)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield ThreeNodes(cluster, train_node, rollout_node)
    ray.shutdown()
    cluster.shutdown()


def _config(tmp_path: Path, model_path: str, *extra: str) -> Any:
    GlobalHydra.instance().clear()
    return compose_recipe(
        *TINY, f"actor_rollout_ref.model.path={model_path}", f"trainer.default_local_dir={tmp_path}", *extra
    )


def _nodes_of(handles: list[Any]) -> list[str]:
    """Node id of each actor, from the GCS actor table (``ray.util.state`` needs the dashboard, off here)."""
    table = ray._private.state.actors()
    return [table[h._actor_id.hex()]["Address"]["NodeID"] for h in handles]


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


class _RolloutTap:
    """Stands between the trainer and the agent-loop manager: runs a hook before a step's rollout and records
    which replica served each row."""

    def __init__(self, inner: Any, before: dict[int, Callable[[], None]]):
        self.inner, self.before = inner, before
        self.rows: dict[int, list[tuple[str, str, bool]]] = {}

    def generate_sequences(self, batch: Any) -> Any:
        step = batch.meta_info["global_steps"]
        if step in self.before:
            self.before[step]()
        out = self.inner.generate_sequences(batch)
        nt = out.non_tensor_batch
        self.rows[step] = list(zip(nt["uid"], nt["rollout_server"], map(bool, nt["rollout_resent"]), strict=True))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "actor_rollout_ref.rollout.nnodes=4",
            f"actor_rollout_ref.rollout.nnodes=4 but the Ray cluster has {NODES}",
        ),
        ("trainer.nnodes=4", f"trainer.nnodes=4 but the Ray cluster has {NODES}"),
        (
            "actor_rollout_ref.rollout.n_gpus_per_node=2",
            "actor_rollout_ref.rollout.n_gpus_per_node=2 x nnodes=2 = 4 rollout replicas of 2.5 CPU each "
            "(actor_rollout_ref.rollout.diffusion.ray_num_cpus), beside training (2 x 1 CPUs): only 2 fit on the "
            f"Ray cluster, which has {NODES}",
        ),
        (  # 2 groups of 4 CPU ranks: only the head has 4 CPUs
            "trainer.cpu_ranks_per_node=4",
            "trainer.cpu_ranks_per_node=4: each of the trainer.nnodes=2 training groups needs 4 CPUs on one node "
            f"(1 fit), but the Ray cluster has {NODES}",
        ),
    ],
    ids=["rollout-nnodes", "trainer-nnodes", "more-replicas-than-room", "cpu-ranks-per-node"],
)
def test_request_the_cluster_cannot_hold_fails_in_seconds(nodes, tmp_path, tiny_model_path, override, message):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        launch(_config(tmp_path, tiny_model_path, override))
    assert str(err.value) == message
    assert time.monotonic() - start < 10
    assert not ray._private.state.actors()  # nothing was placed


def test_cli_joining_the_cluster_refuses_too_many_nodes_with_one_line(nodes, tmp_path):
    """`RAY_ADDRESS=<cluster> python -m recipes.flowgrpo.main ...`: exit 2 and one `config error:` line."""
    start = time.monotonic()
    proc = warm_recipe.run(
        [
            "actor_rollout_ref.rollout.nnodes=5",
            "ray_kwargs.ray_init.num_cpus=null",
            f"trainer.default_local_dir={tmp_path}",
        ],
        env={**os.environ, "RAY_ADDRESS": nodes.cluster.address},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert errors == [f"config error: actor_rollout_ref.rollout.nnodes=5 but the Ray cluster has {NODES}"]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60


def test_placement_two_steps_then_a_node_lost_mid_rollout(nodes, tmp_path, tiny_model_path):
    cluster = nodes.cluster
    head, train_node, rollout_node = (n.node_id for n in (cluster.head_node, nodes.train_node, nodes.rollout_node))
    trainer = launch(_config(tmp_path, tiny_model_path))
    loops = trainer.agent_loop_manager
    balancer = loops.llm_client._load_balancer

    # Placement: a replica on the head and one on the rollout node; the two training ranks (verl's resource pool,
    # one placement group per node) on the head and the training node; the agent-loop worker on the driver's
    # node (the head); the balancer (Ray's default scheduling) anywhere but the full rollout node.
    servers = {r.server_address: r.server_handle for r in trainer.replicas}
    replica_nodes = dict(zip(servers, _nodes_of(list(servers.values())), strict=True))
    assert sorted(replica_nodes.values()) == sorted([head, rollout_node])
    assert trainer.actor_wg.world_size == 2
    assert sorted(_nodes_of(trainer.actor_wg.workers)) == sorted([head, train_node])
    assert _nodes_of(loops.agent_loop_workers) == [head]
    (balancer_node,) = _nodes_of([balancer])
    assert balancer_node in (head, train_node)

    # the node to lose: the rollout node, with a replica and nothing else of the run
    (victim,) = (s for s, n in replica_nodes.items() if n == rollout_node)
    (survivor,) = set(servers) - {victim}
    removed = threading.Event()

    def remove_while_queued() -> None:
        """The victim admits nothing (paused), so its group is surely on it when its node goes."""
        deadline = time.monotonic() + 120
        while ray.get(servers[victim].get_stats.remote())["pending"] == 0:
            assert time.monotonic() < deadline, "the victim replica never got a request"
            time.sleep(0.02)
        cluster.remove_node(nodes.rollout_node)
        removed.set()

    killer: list[threading.Thread] = []

    def before_lost_step() -> None:
        ray.get(servers[victim].abort_all_requests.remote(reject_request=False))  # pause admission
        killer.append(threading.Thread(target=remove_while_queued, daemon=True))
        killer[0].start()

    tap = _RolloutTap(loops, {LOST_AT: before_lost_step})
    trainer.agent_loop_manager = tap
    history = trainer.fit()
    killer[0].join(timeout=10)
    assert removed.is_set()

    assert [h["step"] for h in history] == list(range(STEPS))
    for step, metrics in enumerate(history):
        assert metrics["rollout/model_version"] == step  # on-policy at every step
        assert math.isfinite(metrics["actor/loss"]) and math.isfinite(metrics["reward/mean"])
        assert metrics["actor/ratio_max_abs_dev"] == 0.0  # resent copies too: same seeds, batch-invariant
        rows = tap.rows[step]
        assert len(rows) == PROMPTS * N and set(Counter(uid for uid, _, _ in rows).values()) == {N}  # full groups
        assert metrics["rollout_routing/colocation"] == 1.0

    # steps 0 and 1 on both replicas
    for step in range(LOST_AT):
        assert {server for _, server, _ in tap.rows[step]} == set(servers)
        assert history[step]["rollout/replicas_lost"] == 0

    # step 2: the victim's group was resent to the survivor, and weight sync dropped the victim
    lost_step = history[LOST_AT]
    resent = [(uid, server) for uid, server, again in tap.rows[LOST_AT] if again]
    assert len(resent) == N and {server for _, server in resent} == {survivor}
    assert lost_step["rollout_routing/requests_resent"] == N
    assert lost_step["rollout/replicas_lost"] == 1
    assert ray.get(balancer.get_all_servers.remote()) == [survivor]
    assert [r.server_address for r in trainer.replicas] == [survivor]

    # step 3: the head's replica serves everything; both training ranks trained every step
    assert {server for _, server, _ in tap.rows[LOST_AT + 1]} == {survivor}
    assert history[LOST_AT + 1]["rollout_routing/requests_resent"] == 0
    assert history[LOST_AT + 1]["rollout_routing/replicas_used"] == 1
    assert _alive_nodes() == {head, train_node}
