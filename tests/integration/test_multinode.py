"""The FlowGRPO recipe on a three-node Ray cluster on one machine (``ray.cluster_utils.Cluster``), CPU only.

Three Ray nodes (a head and two workers, each its own raylet with its own CPUs) stand in for machines. The recipe
places the actors itself (``recipes.flowgrpo.main.launch``: verl's ``RayResourcePool`` for the training rank, one
actor per ``diffusers`` replica); the node sizes steer that placement the way GPU counts do on a real cluster:
a replica asks for 2.5 CPUs, which only a worker node (3) has, so each worker node holds one replica and the
training rank (1 CPU) lands on the head (2). Then a worker node is removed while its replica holds a group:
the replica leaves the balancer, its copies are resent with the same seeds, the step completes with full
groups, and the next step runs on the node that is left.

One agent-loop worker, so the lost node holds a replica and nothing else and every assertion is exact; a lost
node that also takes an agent-loop worker (restarted by Ray elsewhere) makes which copies are resent, and when
the dead replica leaves the balancer, depend on timing. What this does not cover: GPUs, NCCL, several training
ranks across nodes (the CPU recipe trains with one process), real network latency, and losing the head node
(see docs/advanced_features/multinode.md).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from hydra.core.global_hydra import GlobalHydra
from ray.cluster_utils import Cluster

from recipes.flowgrpo.config_compose import compose_recipe
from recipes.flowgrpo.main import ConfigError, launch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HEAD_CPUS, WORKER_CPUS, REPLICA_CPUS = 2, 3, 2.5  # a replica fits a worker node only, and one per worker node
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
    # verl spreads agent-loop workers over the nodes round-robin; one leaves a worker node without any
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "ray_kwargs.ray_init.num_cpus=null",  # joining a cluster: Ray refuses a CPU count
    f"trainer.total_training_steps={STEPS}",
    "trainer.logger=[file]",
    "trainer.save_freq=-1",
    "trainer.sample_freq=-1",
    "trainer.test_freq=-1",
    "trainer.val_before_train=false",
]


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A head and two worker nodes, this process connected as the driver (on the head)."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": HEAD_CPUS, "num_gpus": 0, "include_dashboard": False}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=0)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
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
            "actor_rollout_ref.rollout.nnodes=4 but the Ray cluster has 3 nodes (3, 3, 2 CPUs)",
        ),
        ("trainer.nnodes=4", "trainer.nnodes=4 but the Ray cluster has 3 nodes (3, 3, 2 CPUs)"),
        (
            "actor_rollout_ref.rollout.n_gpus_per_node=2",
            "actor_rollout_ref.rollout.n_gpus_per_node=2 x nnodes=2 = 4 rollout replicas of 2.5 CPU each "
            "(actor_rollout_ref.rollout.diffusion.ray_num_cpus), beside training (1 CPU): only 2 fit on the Ray "
            "cluster, which has 3 nodes (3, 3, 2 CPUs)",
        ),
    ],
    ids=["rollout-nnodes", "trainer-nnodes", "more-replicas-than-room"],
)
def test_request_the_cluster_cannot_hold_fails_in_seconds(cluster, tmp_path, tiny_model_path, override, message):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        launch(_config(tmp_path, tiny_model_path, override))
    assert str(err.value) == message
    assert time.monotonic() - start < 10
    assert not ray._private.state.actors()  # nothing was placed


def test_cli_joining_the_cluster_refuses_too_many_nodes_with_one_line(cluster, tmp_path):
    """`RAY_ADDRESS=<cluster> python -m recipes.flowgrpo.main ...`: exit 2 and one `config error:` line."""
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.flowgrpo.main",
            "actor_rollout_ref.rollout.nnodes=5",
            "ray_kwargs.ray_init.num_cpus=null",
            f"trainer.default_local_dir={tmp_path}",
        ],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": cluster.address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert errors == ["config error: actor_rollout_ref.rollout.nnodes=5 but the Ray cluster has 3 nodes (3, 3, 2 CPUs)"]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60


def test_placement_two_steps_then_a_node_lost_mid_rollout(cluster, tmp_path, tiny_model_path):
    head = cluster.head_node.node_id
    workers = {node.node_id: node for node in cluster.worker_nodes}
    trainer = launch(_config(tmp_path, tiny_model_path))
    loops = trainer.agent_loop_manager
    balancer = loops.llm_client._load_balancer

    # Placement: one replica on each worker node; the training rank (verl's resource pool) and the balancer on
    # the head. The agent-loop worker goes where verl's round-robin puts it.
    servers = {r.server_address: r.server_handle for r in trainer.replicas}
    replica_nodes = dict(zip(servers, _nodes_of(list(servers.values())), strict=True))
    assert sorted(replica_nodes.values()) == sorted(workers)
    assert _nodes_of(trainer.actor_wg.workers) == [head]
    assert _nodes_of([balancer]) == [head]
    (loop_node,) = _nodes_of(loops.agent_loop_workers)

    # the node to lose: a worker node with a replica and nothing else of the run
    victim, victim_node = next((s, n) for s, n in replica_nodes.items() if n != loop_node)
    (survivor,) = set(servers) - {victim}
    removed = threading.Event()

    def remove_while_queued() -> None:
        """The victim admits nothing (paused), so its group is surely on it when its node goes."""
        deadline = time.monotonic() + 120
        while ray.get(servers[victim].get_stats.remote())["pending"] == 0:
            assert time.monotonic() < deadline, "the victim replica never got a request"
            time.sleep(0.02)
        cluster.remove_node(workers[victim_node])
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

    # steps 0 and 1 on both worker nodes
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

    # step 3: the node that is left serves everything
    assert {server for _, server, _ in tap.rows[LOST_AT + 1]} == {survivor}
    assert history[LOST_AT + 1]["rollout_routing/requests_resent"] == 0
    assert history[LOST_AT + 1]["rollout_routing/replicas_used"] == 1
    assert _alive_nodes() == {head, replica_nodes[survivor]}
