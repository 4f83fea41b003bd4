"""A resource request the Ray cluster cannot hold fails at startup, naming the key and what the cluster has.

Ray would otherwise leave the actor or placement group pending forever. In-process, against described clusters
(no Ray); the CLI case checks the one `config error:` line and exit code 2 on this machine's local Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import warm_recipe
from hydra.core.global_hydra import GlobalHydra

from recipes.flowgrpo import config_compose
from recipes.flowgrpo.cluster_resources import ClusterNode, ClusterShape, local_cluster_shape
from recipes.flowgrpo.validate import validate_recipe_config

REPO = Path(__file__).resolve().parents[1]
SD35 = "flowgrpo_sd35_medium_lora"
TINY = "flowgrpo_tiny"
# What run_sd35_medium_lora_multinode.sh passes with NNODES=2 and 8 GPUs per node.
SD35_TWO_NODES = [
    "trainer.nnodes=2",
    "trainer.n_gpus_per_node=4",
    "actor_rollout_ref.rollout.nnodes=2",
    "actor_rollout_ref.rollout.n_gpus_per_node=4",
    "data.train_batch_size=16",
    "actor_rollout_ref.actor.ppo_mini_batch_size=128",
]
# The CPU cluster of tests/integration/test_multinode.py: a head and two worker nodes, one replica on each worker.
CPU_THREE_NODES = ClusterShape((ClusterNode(2, 0), ClusterNode(3, 0), ClusterNode(3, 0)))
CPU_TWO_REPLICAS = [
    "actor_rollout_ref.rollout.nnodes=2",
    "actor_rollout_ref.rollout.n_gpus_per_node=1",
    "+actor_rollout_ref.rollout.diffusion.ray_num_cpus=2.5",  # not in the tiny config: added in-process
    "ray_kwargs.ray_init.num_cpus=null",
]
# Training ranks across nodes (test_multinode's cluster): a replica fits the 4- and 3-CPU nodes, a 1-CPU training
# group the 4- and 1-CPU ones. A greedy packing that places the training groups first refuses it.
CPU_RANKS_ACROSS = ClusterShape((ClusterNode(4, 0), ClusterNode(1, 0), ClusterNode(3, 0)))
TWO_CPU_RANK_GROUPS = [*CPU_TWO_REPLICAS, "trainer.nnodes=2", "trainer.cpu_ranks_per_node=1"]


def gpu_nodes(*gpus: int, cpus: int = 64) -> ClusterShape:
    return ClusterShape(tuple(ClusterNode(cpus if g else 8, g) for g in gpus))


@pytest.fixture()
def sd35_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A minimal pipeline directory and a PickScore directory, exported as the SD3.5 config expects them."""
    model = tmp_path / "sd35"
    model.mkdir()
    (model / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]})
    )
    (tmp_path / "pickscore").mkdir()
    monkeypatch.setenv("MODEL_PATH", str(model))
    monkeypatch.setenv("PICKSCORE_PATH", str(tmp_path / "pickscore"))
    monkeypatch.delenv("PICKSCORE_PROCESSOR_PATH", raising=False)
    monkeypatch.delenv("VERL_OMNI_PROMPTS", raising=False)


def validate(name: str, overrides: list[str], cluster: ClusterShape, tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    cfg = config_compose.compose_recipe(*overrides, f"trainer.default_local_dir={tmp_path / 'run'}", config_name=name)
    validate_recipe_config(cfg, cluster=cluster)


@pytest.mark.parametrize(
    ("name", "overrides", "cluster"),
    [
        (TINY, [], ClusterShape((ClusterNode(4, 0),), local=True)),
        (TINY, CPU_TWO_REPLICAS, CPU_THREE_NODES),
        (SD35, [], gpu_nodes(8)),
        (SD35, SD35_TWO_NODES, gpu_nodes(8, 8)),
        (SD35, SD35_TWO_NODES, gpu_nodes(0, 8, 8)),  # a CPU-only head node is not counted, nor used
        (SD35, SD35_TWO_NODES, gpu_nodes(4, 8, 4)),  # the training groups of 4 fit on the two nodes of 4
        (TINY, TWO_CPU_RANK_GROUPS, CPU_RANKS_ACROSS),
        (  # 2 nodes x 2 CPU ranks beside the tiny config's two 0.5-CPU replicas, 0.1 CPU left for 2 agent workers
            TINY,
            ["trainer.nnodes=2", "trainer.cpu_ranks_per_node=2", "ray_kwargs.ray_init.num_cpus=null"],
            ClusterShape((ClusterNode(3, 0), ClusterNode(2.1, 0))),
        ),
    ],
    ids=[
        "tiny-local",
        "tiny-3-cpu-nodes",
        "sd35-1x8",
        "sd35-2x8",
        "sd35-cpu-head-2x8",
        "sd35-4-8-4",
        "tiny-cpu-ranks-across-nodes",
        "tiny-2x2-cpu-ranks",
    ],
)
def test_requests_the_cluster_can_hold_pass(
    sd35_env: None, tmp_path: Path, name: str, overrides: list[str], cluster: ClusterShape
) -> None:
    validate(name, overrides, cluster, tmp_path)


@pytest.mark.parametrize(
    ("name", "overrides", "cluster", "message"),
    [
        (
            TINY,
            ["actor_rollout_ref.rollout.nnodes=2"],
            ClusterShape((ClusterNode(4, 0),), local=True),
            "actor_rollout_ref.rollout.nnodes=2 but the Ray cluster has 1 node (4 CPUs); a local Ray is this machine "
            "only: join a multi-node cluster with RAY_ADDRESS",
        ),
        (
            TINY,
            [*CPU_TWO_REPLICAS, "trainer.nnodes=4"],
            CPU_THREE_NODES,
            "trainer.nnodes=4 but the Ray cluster has 3 nodes (3, 3, 2 CPUs)",
        ),
        (
            TINY,
            [*CPU_TWO_REPLICAS, "actor_rollout_ref.rollout.n_gpus_per_node=2"],
            CPU_THREE_NODES,
            "actor_rollout_ref.rollout.n_gpus_per_node=2 x nnodes=2 = 4 rollout replicas of 2.5 CPU each "
            "(actor_rollout_ref.rollout.diffusion.ray_num_cpus), beside training (1 CPU): only 2 fit on the Ray "
            "cluster, which has 3 nodes (3, 3, 2 CPUs)",
        ),
        (
            TINY,
            ["+actor_rollout_ref.rollout.diffusion.device=cuda"],
            ClusterShape((ClusterNode(4, 0),), local=True),
            "actor_rollout_ref.rollout.diffusion.device='cuda' but the Ray cluster has no GPUs: 1 node (4 CPUs)",
        ),
        (
            SD35,
            [*SD35_TWO_NODES, "trainer.nnodes=4"],
            gpu_nodes(0, 8, 8),
            "trainer.nnodes=4 but the Ray cluster has 2 nodes with GPUs (8, 8 GPUs)",
        ),
        (
            SD35,
            [*SD35_TWO_NODES, "trainer.nnodes=1"],
            gpu_nodes(8),
            "actor_rollout_ref.rollout.nnodes=2 but the Ray cluster has 1 node with GPUs (8 GPUs)",
        ),
        (  # more replicas than GPUs
            SD35,
            ["actor_rollout_ref.rollout.n_gpus_per_node=8"],
            gpu_nodes(8),
            "actor_rollout_ref.rollout.n_gpus_per_node=8 x nnodes=1 = 8 rollout replicas of 1 GPU each "
            "(actor_rollout_ref.rollout.diffusion.num_gpus_per_replica), beside training (1 x 4 GPUs): only 4 fit "
            "on the Ray cluster, which has 1 node with GPUs (8 GPUs)",
        ),
        (  # enough GPUs in all (16), but no node holds a training group of 8
            SD35,
            ["trainer.n_gpus_per_node=8", "actor_rollout_ref.actor.ppo_mini_batch_size=64"],
            gpu_nodes(4, 4, 4, 4),
            "trainer.n_gpus_per_node=8: each of the trainer.nnodes=1 training groups needs 8 GPUs on one node "
            "(0 fit), but the Ray cluster has 4 nodes with GPUs (4, 4, 4, 4 GPUs)",
        ),
        (  # groups of 2 CPU ranks: both on the 4-CPU node, or one there and one on the 3-CPU node; 1 replica fits
            TINY,
            [*TWO_CPU_RANK_GROUPS, "trainer.cpu_ranks_per_node=2"],
            CPU_RANKS_ACROSS,
            "actor_rollout_ref.rollout.n_gpus_per_node=1 x nnodes=2 = 2 rollout replicas of 2.5 CPU each "
            "(actor_rollout_ref.rollout.diffusion.ray_num_cpus), beside training (2 x 2 CPUs): only 1 fit on the "
            "Ray cluster, which has 3 nodes (4, 3, 1 CPUs)",
        ),
        (  # a group of 4 CPU ranks fits the 4-CPU node only, and there are 2 groups
            TINY,
            [*TWO_CPU_RANK_GROUPS, "trainer.cpu_ranks_per_node=4"],
            CPU_RANKS_ACROSS,
            "trainer.cpu_ranks_per_node=4: each of the trainer.nnodes=2 training groups needs 4 CPUs on one node "
            "(1 fit), but the Ray cluster has 3 nodes (4, 3, 1 CPUs)",
        ),
    ],
    ids=[
        "rollout-nnodes-local",
        "trainer-nnodes-cpu",
        "replicas-cpu",
        "cuda-without-gpus",
        "trainer-nnodes-gpu",
        "rollout-nnodes-gpu",
        "replicas-gpu",
        "training-group-per-node",
        "cpu-rank-groups-crowd-out-replicas",
        "cpu-rank-group-per-node",
    ],
)
def test_requests_the_cluster_cannot_hold_name_the_key(
    sd35_env: None, tmp_path: Path, name: str, overrides: list[str], cluster: ClusterShape, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        validate(name, overrides, cluster, tmp_path)
    assert str(err.value) == message


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "true"])
def test_cpu_ranks_per_node_must_be_a_positive_integer(sd35_env: None, tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError) as err:
        validate(
            TINY, [f"trainer.cpu_ranks_per_node={value}"], ClusterShape((ClusterNode(4, 0),), local=True), tmp_path
        )
    shown = {"1.5": "1.5", "two": "'two'", "true": "True"}.get(value, value)
    assert str(err.value) == (
        f"trainer.cpu_ranks_per_node={shown} is not valid; valid values: a positive integer (CPU training processes "
        "per node, used when trainer.n_gpus_per_node is 0)"
    )


def test_cpu_ranks_count_in_the_training_split(sd35_env: None, tmp_path: Path) -> None:
    """3 CPU ranks cannot split the tiny config's 64 samples: the message names the CPU keys."""
    with pytest.raises(ValueError) as err:
        validate(TINY, ["trainer.cpu_ranks_per_node=3"], ClusterShape((ClusterNode(4, 0),), local=True), tmp_path)
    assert str(err.value) == (
        "the rollout batch (data.train_batch_size x rollout.n = 64) must divide evenly over the 3 training ranks "
        "(trainer.cpu_ranks_per_node x trainer.nnodes)"
    )


def test_local_cluster_is_one_node_with_ray_init_resources() -> None:
    assert local_cluster_shape({"num_cpus": 3, "num_gpus": 0}) == ClusterShape((ClusterNode(3, 0),), local=True)


def test_cli_refuses_nnodes_larger_than_the_local_ray_in_seconds(tmp_path: Path) -> None:
    """The recipe's entry point: one `config error:` line, exit 2, before a Ray instance or a model starts."""
    start = time.monotonic()
    proc = warm_recipe.run(["trainer.nnodes=2", f"trainer.default_local_dir={tmp_path}"], timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "config error: trainer.nnodes=2 but the Ray cluster has 1 node (4 CPUs); a local Ray is this machine only: "
        "join a multi-node cluster with RAY_ADDRESS"
    ]
    assert "Started a local Ray instance" not in proc.stdout
    assert elapsed < 30, f"took {elapsed:.1f} s"
