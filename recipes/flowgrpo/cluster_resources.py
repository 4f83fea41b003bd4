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


class _Demand(NamedTuple):
    kind: str  # "train" or "rollout"
    cpus: float
    gpus: float


def check_cluster_resources(cfg: Any, cluster: ClusterShape, replicas: int, diffusion: DiffusionRolloutConfig) -> None:
    """Raise ``ValueError`` unless the training ranks and the rollout replicas fit on ``cluster``'s nodes.

    Mirrors how the recipe places them: training as ``trainer.nnodes`` placement groups of
    ``trainer.n_gpus_per_node`` GPU bundles (1 CPU each; one CPU process without GPUs), each replica as one actor
    of ``diffusion.ray_num_cpus`` CPUs and, on a cluster with GPUs, ``diffusion.num_gpus_per_replica`` GPUs.
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
        demands = [_Demand("train", float(train_gpus), float(train_gpus))] * train_nodes
    else:
        demands = [_Demand("train", 1.0, 0.0)]
    demands += [_Demand("rollout", float(diffusion.ray_num_cpus), replica_gpus)] * replicas
    placed = _best_fit(demands, cluster.nodes)
    if len(placed) == len(demands):
        return
    failed = demands[len(placed)]
    if failed.kind == "train":
        raise ValueError(
            f"trainer.n_gpus_per_node={train_gpus}: each of the trainer.nnodes={train_nodes} training groups needs "
            f"{train_gpus} GPUs on one node ({len(placed)} fit), but the Ray cluster has {cluster.describe(gpu=True)}"
        )
    rollout = cfg.actor_rollout_ref.rollout
    size = f"{replica_gpus:g} GPU" if replica_gpus else f"{diffusion.ray_num_cpus:g} CPU"
    size_key = "num_gpus_per_replica" if replica_gpus else "ray_num_cpus"
    training = f"{train_nodes} x {train_gpus} GPUs" if train_on_gpu else "1 CPU"
    fit = sum(1 for d in placed if d.kind == "rollout")
    raise ValueError(
        f"{ROLLOUT}.n_gpus_per_node={rollout.n_gpus_per_node} x nnodes={rollout_nodes} = {replicas} rollout replicas "
        f"of {size} each ({DIFFUSION_CONFIG_PREFIX}.{size_key}), beside training ({training}): only {fit} fit on "
        f"the Ray cluster, which has {cluster.describe(gpu=replica_gpus > 0)}"
    )


def _best_fit(demands: list[_Demand], nodes: tuple[ClusterNode, ...]) -> list[_Demand]:
    """Place ``demands`` in order (training first: its groups need the most of one node), each on the node it
    leaves fullest; returns the prefix that fit. With identical replicas this finds a packing whenever one
    exists in practice; Ray places one actor at a time and can still do worse (then a request stays pending)."""
    free = [[n.cpus, n.gpus] for n in nodes]
    placed: list[_Demand] = []
    for demand in demands:
        fits = [i for i, (c, g) in enumerate(free) if c >= demand.cpus - 1e-9 and g >= demand.gpus - 1e-9]
        if not fits:
            break
        best = min(fits, key=lambda i: (free[i][1] - demand.gpus, free[i][0] - demand.cpus))
        free[best][0] -= demand.cpus
        free[best][1] -= demand.gpus
        placed.append(demand)
    return placed
