"""Do the run's actors fit on the Ray cluster's nodes? Checked at startup, before anything is placed.

Ray never fails an actor or a placement group it cannot place: it waits for resources that may yet appear
(autoscaling), so an impossible request (more replicas than GPUs, ``trainer.nnodes`` larger than the cluster)
hangs without a word. The recipe knows the cluster (``ray.nodes()`` once joined; this machine for a local Ray)
and what it will ask for, so it refuses such a config in seconds, naming the key and what the cluster has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from verl_omni.workers.config.diffusion import DIFFUSION_CONFIG_PREFIX, DiffusionRolloutConfig

ROLLOUT = "actor_rollout_ref.rollout"
# Ray CPUs each agent-loop worker actor asks for (verl_omni.agent_loop.manager; a test keeps the two equal). Tiny,
# but not zero: on a node the replicas and training fill exactly, the workers wait, and so does everything after.
AGENT_LOOP_WORKER_CPUS = 0.01


class ClusterNode(NamedTuple):
    """One alive Ray node's logical resources."""

    cpus: float
    gpus: float


@dataclass(frozen=True)
class ClusterShape:
    """The nodes the run will be placed on; ``local`` when the recipe starts a one-node Ray on this machine."""

    nodes: tuple[ClusterNode, ...]
    local: bool = False

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def describe(self, gpu: bool) -> str:
        """``2 nodes with GPUs (8, 4 GPUs)``: the part of the cluster a demand could use, largest node first."""
        nodes = [n for n in self.nodes if n.gpus > 0] if gpu else list(self.nodes)
        unit = "GPUs" if gpu else "CPUs"
        sizes = ", ".join(f"{size:g}" for size in sorted((n.gpus if gpu else n.cpus for n in nodes), reverse=True))
        where = " with GPUs" if gpu else ""
        return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}{where} ({sizes or 'none'} {unit})"


def ray_cluster_shape() -> ClusterShape:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return ClusterShape(tuple(ClusterNode(float(r.get("CPU", 0)), float(r.get("GPU", 0))) for r in alive))


def local_cluster_shape(ray_init: Mapping[str, Any]) -> ClusterShape:
    """The one node ``ray.init(**ray_init)`` starts here: its ``num_cpus`` / ``num_gpus``, else this machine's."""
    cpus = ray_init.get("num_cpus")
    gpus = ray_init.get("num_gpus")
    if cpus is None:
        cpus = os.cpu_count() or 1
    if gpus is None:
        gpus = local_gpu_count()
    return ClusterShape((ClusterNode(float(cpus), float(gpus)),), local=True)


def local_gpu_count() -> int:
    """GPUs a local Ray would see: ``CUDA_VISIBLE_DEVICES`` when set, else the NVIDIA device files.

    Not ``torch.cuda.device_count()``: importing torch costs seconds before a config error can be reported.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return sum(1 for d in Path("/dev").glob("nvidia[0-9]*") if d.name[len("nvidia") :].isdigit())


CPU_RANKS_KEY = "trainer.cpu_ranks_per_node"


def cpu_ranks_per_node(trainer: Any) -> int:
    """``trainer.cpu_ranks_per_node`` (a positive integer, as the recipe's schema declares it)."""
    return int(trainer.get("cpu_ranks_per_node", 1))


def training_ranks_per_node(trainer: Any, use_gpu: bool) -> list[int]:
    """verl's ``process_on_nodes`` for the training pool: ``trainer.nnodes`` placement groups, each on one node,
    of ``n_gpus_per_node`` GPU ranks or, training on CPU, ``cpu_ranks_per_node`` CPU ranks."""
    per_node = int(trainer.n_gpus_per_node) if use_gpu else cpu_ranks_per_node(trainer)
    return [per_node] * int(trainer.nnodes)


class _Request(NamedTuple):
    """What one training group or one replica asks of a single node."""

    cpus: float
    gpus: float


def check_cluster_resources(cfg: Any, cluster: ClusterShape, replicas: int, diffusion: DiffusionRolloutConfig) -> None:
    """Raise ``ValueError`` unless the training ranks and the rollout replicas fit on ``cluster``'s nodes.

    Mirrors how the recipe places them: training as ``trainer.nnodes`` placement groups, each on one node, of
    ``trainer.n_gpus_per_node`` bundles of 1 GPU + 1 CPU (without GPUs: ``trainer.cpu_ranks_per_node`` bundles
    of 1 CPU); each replica as one actor of ``diffusion.ray_num_cpus`` CPUs and, on a cluster with GPUs,
    ``diffusion.num_gpus_per_replica`` GPUs. Like verl's pool, it lets several groups share a node.
    """
    trainer = cfg.trainer
    train_nodes, train_gpus = int(trainer.nnodes), int(trainer.n_gpus_per_node)
    rollout_nodes = int(cfg.actor_rollout_ref.rollout.nnodes)
    has_gpus = cluster.gpus > 0
    if diffusion.device == "cuda" and not has_gpus:
        raise ValueError(
            f"{DIFFUSION_CONFIG_PREFIX}.device='cuda' but the Ray cluster has no GPUs: {cluster.describe(gpu=False)}"
        )
    train_on_gpu = train_gpus > 0 and has_gpus  # as main.py decides
    replica_gpus = float(diffusion.num_gpus_per_replica) if has_gpus and diffusion.device != "cpu" else 0.0

    for key, wanted, on_gpu in (
        ("trainer.nnodes", train_nodes, train_on_gpu),
        (f"{ROLLOUT}.nnodes", rollout_nodes, replica_gpus > 0),
    ):
        usable = [n for n in cluster.nodes if n.gpus > 0] if on_gpu else cluster.nodes
        if wanted > len(usable):
            hint = (
                "; a local Ray is this machine only: join a multi-node cluster with RAY_ADDRESS"
                if cluster.local
                else ""
            )
            raise ValueError(f"{key}={wanted} but the Ray cluster has {cluster.describe(gpu=on_gpu)}{hint}")

    if train_on_gpu:
        group = _Request(float(train_gpus), float(train_gpus))
        group_key, group_size = f"trainer.n_gpus_per_node={train_gpus}", f"{train_gpus} GPUs"
        training = f"{train_nodes} x {train_gpus} GPUs"
    else:
        ranks = cpu_ranks_per_node(trainer)
        group = _Request(float(ranks), 0.0)
        group_key, group_size = f"{CPU_RANKS_KEY}={ranks}", f"{ranks} CPU{'s' if ranks != 1 else ''}"
        training = "1 CPU" if train_nodes * ranks == 1 else f"{train_nodes} x {ranks} CPUs"
    replica = _Request(float(diffusion.ray_num_cpus), replica_gpus)
    fit = _most_replicas(cluster.nodes, train_nodes, group, replicas, replica)
    if fit is None:
        groups_fit = min(train_nodes, sum(_count(n.cpus, n.gpus, group, train_nodes) for n in cluster.nodes))
        raise ValueError(
            f"{group_key}: each of the trainer.nnodes={train_nodes} training groups needs {group_size} on one node "
            f"({groups_fit} fit), but the Ray cluster has {cluster.describe(gpu=train_on_gpu)}"
        )
    rollout = cfg.actor_rollout_ref.rollout
    if fit >= replicas:
        _check_agent_loop_workers(cfg, cluster, train_nodes * group.cpus, replicas * replica.cpus, training)
        return
    size = f"{replica_gpus:g} GPU" if replica_gpus else f"{diffusion.ray_num_cpus:g} CPU"
    size_key = "num_gpus_per_replica" if replica_gpus else "ray_num_cpus"
    raise ValueError(
        f"{ROLLOUT}.n_gpus_per_node={rollout.n_gpus_per_node} x nnodes={rollout_nodes} = {replicas} rollout replicas "
        f"of {size} each ({DIFFUSION_CONFIG_PREFIX}.{size_key}), beside training ({training}): only {fit} fit on "
        f"the Ray cluster, which has {cluster.describe(gpu=replica_gpus > 0)}"
    )


def _check_agent_loop_workers(
    cfg: Any, cluster: ClusterShape, training_cpus: float, replica_cpus: float, training: str
) -> None:
    """The agent-loop workers' CPUs must fit in what the training ranks and the replicas leave of the cluster.

    Ray places them before the training ranks; when they take the last CPUs the training group waits forever
    without a word (measured: 2 replicas x 0.5 + 1 training CPU + 4 x 0.01 on a 2-CPU local Ray). Summed over the
    nodes: each worker asks for a sliver, so it fits wherever any is left.
    """
    rollout = cfg.actor_rollout_ref.rollout
    workers = int((rollout.get("agent") or {}).get("num_workers", 1) or 1)
    needed = workers * AGENT_LOOP_WORKER_CPUS
    left = sum(n.cpus for n in cluster.nodes) - training_cpus - replica_cpus
    if left + 1e-9 >= needed:
        return
    source = "this machine's cores, as ray_kwargs.ray_init.num_cpus is null" if cluster.local else "the Ray cluster"
    raise ValueError(
        f"{ROLLOUT}.agent.num_workers={workers} agent-loop workers need {needed:g} Ray CPUs beside training "
        f"({training}) and the rollout replicas ({replica_cpus:g} CPUs, {DIFFUSION_CONFIG_PREFIX}.ray_num_cpus), "
        f"but only {max(left, 0.0):g} of the {cluster.describe(gpu=False)} are left ({source}): Ray would leave the "
        f"training ranks waiting forever. Raise ray_kwargs.ray_init.num_cpus (Ray CPUs are scheduling tokens: "
        f"compute follows the thread counts) or lower {DIFFUSION_CONFIG_PREFIX}.ray_num_cpus"
    )


def _count(cpus: float, gpus: float, need: _Request, cap: int) -> int:
    """How many ``need`` fit in ``cpus`` / ``gpus`` (at most ``cap``: a request of nothing fits any number)."""
    fits = cap
    for free, want in ((cpus, need.cpus), (gpus, need.gpus)):
        if want > 0:
            fits = min(fits, int((free + 1e-9) // want))
    return max(fits, 0)


def _most_replicas(
    nodes: tuple[ClusterNode, ...], groups: int, group: _Request, wanted: int, replica: _Request
) -> int | None:
    """The most replicas (at most ``wanted``) that fit beside all ``groups`` training groups; None when the groups
    alone do not fit. Exact, not a greedy packing (which refuses e.g. nodes of 4, 1, 3 CPUs for two groups of 1
    and two replicas of 2.5): for each count of groups on the nodes seen so far, the most replicas beside them.
    Ray places one actor at a time, replicas first, and can still do worse (then a request stays pending)."""
    best: dict[int, int] = {0: 0}
    for node in nodes:
        step: dict[int, int] = {}
        for placed, held in best.items():
            for extra in range(min(groups - placed, _count(node.cpus, node.gpus, group, groups)) + 1):
                left = _count(node.cpus - extra * group.cpus, node.gpus - extra * group.gpus, replica, wanted)
                total = min(wanted, held + left)
                if total > step.get(placed + extra, -1):
                    step[placed + extra] = total
        best = step
    return best.get(groups)
