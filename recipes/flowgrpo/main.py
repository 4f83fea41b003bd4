"""FlowGRPO recipe entry point.

    python -m recipes.flowgrpo.main server_routing.policy=prompt_uid_affinity

With no arguments: trains the tiny SD3-architecture model on CPU with 2 ``diffusers`` replicas.
With ``actor_rollout_ref.model.path=<SD3.5 checkpoint>`` and GPU counts (see config/): the same
code on GPUs. ``--cfg job`` prints the resolved config.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from recipes.flowgrpo.cluster_resources import (
    ClusterShape,
    local_cluster_shape,
    ray_cluster_shape,
    training_ranks_per_node,
)
from recipes.flowgrpo.validate import (
    check_override_keys,
    resolve_config,
    validate_model_options,
    validate_recipe_config,
)
from verl_omni.models.tiny_models import built_tiny_model, ensure_tiny_model
from verl_omni.utils.config_paths import register_config_resolvers
from verl_omni.utils.gc_pause import collector_paused
from verl_omni.utils.startup import StartupClock
from verl_omni.workers.config.training import TrainingSections

if TYPE_CHECKING:
    from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer

DEFAULT_CONFIG_NAME = "flowgrpo_tiny"
TINY_MODEL_CACHE = Path(os.environ.get("VERL_OMNI_CACHE", Path.home() / ".cache" / "verl_omni")) / "tiny_sd3"


class ConfigError(ValueError):
    """A bad recipe config: reported as one line, without a traceback."""


def _joins_cluster(cfg: DictConfig) -> bool:
    ray_init = cfg.get("ray_kwargs", {}).get("ray_init", {}) or {}
    return bool(os.environ.get("RAY_ADDRESS") or ray_init.get("address"))


def _built_tiny_model(cfg: DictConfig) -> str | None:
    """The tiny model's directory (``actor_rollout_ref.model.tiny``) if a previous run built it, so its configs can
    be checked before the modules that build it load; else None (checked once built)."""
    path = built_tiny_model(cfg.actor_rollout_ref.model.get("tiny", "sd3"), TINY_MODEL_CACHE)
    return None if path is None else str(path)


# What the driver uses, imported beside Ray's start; verl's worker modules among them, as the training ranks start
# from a thread and concurrent imports of transformers' lazy modules fail. Modules, not packages: a package's lazy
# export loads its module on first use, which would then import verl's agent loop on the main thread, after Ray's
# start instead of beside it (0.7 s).
_DRIVER_MODULES = (
    "verl.single_controller.ray",
    "verl_omni.workers.diffusion_actor",
    "verl_omni.agent_loop.manager",
    "verl_omni.workers.rollout.omni_llm_server",
    "verl_omni.trainer.flowgrpo.trainer",
    "verl_omni.utils.heartbeat",
    "recipes.flowgrpo.data",
)


def _import_driver_modules() -> None:
    with collector_paused():  # about 15 % of the imports' CPU otherwise (verl_omni.utils.gc_pause)
        for name in _DRIVER_MODULES:
            importlib.import_module(name)


# ``ray.init`` arguments that size the local Ray a run starts; Ray refuses them when joining a running cluster.
_LOCAL_RAY_ONLY = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "_system_config")


def _joining(ray_init: dict[str, Any]) -> dict[str, Any]:
    """``ray_init`` without the local Ray's sizes: the cluster has its own (a note says which were set)."""
    dropped = {k: ray_init[k] for k in _LOCAL_RAY_ONLY if ray_init.get(k) is not None}
    if dropped:
        sizes = ", ".join(f"ray_kwargs.ray_init.{k}={v}" for k, v in dropped.items())
        print(f"Joining a running Ray cluster: {sizes} size(s) a local Ray only; the cluster's own resources apply.")
    return {k: v for k, v in ray_init.items() if k not in _LOCAL_RAY_ONLY}


def run(cfg: DictConfig, overrides: list[str] | None = None) -> list[dict[str, float]]:
    """Validate, start Ray and the actors, train; returns the per-step metric history.

    ``overrides`` are the command line's (Hydra's task overrides): keys they add with ``+`` are refused.
    """
    trainer = launch(cfg, overrides)
    try:
        return trainer.fit()
    finally:
        _close_replicas(trainer)


def _close_replicas(trainer: FlowGRPOTrainer, timeout_s: float = 30.0) -> None:
    """Shut every live replica's engine down before Ray tears the actors down: a vllm-omni engine runs in
    processes of its own, which a killed actor would leave behind."""
    import ray

    closing = [server.close.remote() for replica in trainer.replicas for server in replica.servers]
    ray.wait(closing, num_returns=len(closing), timeout=timeout_s)


def launch(cfg: DictConfig, overrides: list[str] | None = None) -> FlowGRPOTrainer:
    """Validate, start (or join) Ray, place the replicas and training ranks; returns the trainer, not yet fitted.

    Separate from :func:`run` so a caller (the multi-node test) can reach the actors the recipe placed.
    """
    # Resolve once, here: env vars and interpolations mean the driver's values on every node.
    try:
        cfg = resolve_config(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    ray_init = OmegaConf.to_container(cfg.get("ray_kwargs", {}).get("ray_init", {}), resolve=True)
    ray_init = {
        "include_dashboard": False,
        "log_to_driver": True,
        **{k: v for k, v in ray_init.items() if v is not None},
    }
    clock = StartupClock()  # phases from the process's start, logged with the first step
    cluster: ClusterShape | None = None  # a cluster's nodes are only known once connected (cheap)
    if _joins_cluster(cfg) or "ray" in sys.modules:  # else Ray (about 1 s to import) loads after the checks
        import ray

        if not ray.is_initialized() and _joins_cluster(cfg):
            with clock.phase("ray"):
                ray.init(**_joining(ray_init))
        if ray.is_initialized():
            cluster = ray_cluster_shape()
    try:
        cluster = cluster or local_cluster_shape(ray_init)  # the one node a local Ray will have
        # before a local Ray or any model; a request the nodes cannot hold fails here, not as a pending actor
        model = cfg.actor_rollout_ref.model.get("path") or _built_tiny_model(cfg)
        checked = validate_recipe_config(cfg, overrides=overrides, cluster=cluster, image_size_model=model)
        if cfg.actor_rollout_ref.model.get("path") is None:
            with open_dict(cfg):
                model_cfg = cfg.actor_rollout_ref.model
                model_cfg.path = str(ensure_tiny_model(model_cfg.get("tiny", "sd3"), TINY_MODEL_CACHE))
        validate_model_options(cfg, cfg.actor_rollout_ref.model.path)  # its configs only, still before Ray
    except ValueError as err:
        raise ConfigError(str(err)) from err
    run_dir = Path(cfg.trainer.default_local_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    import ray

    # This process imports verl (seconds) while a local Ray's processes start (seconds too). Ray starts from the
    # main thread: its processes die with the thread that started them (PR_SET_PDEATHSIG), and SIGTERM is handled
    # there.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verl-omni-imports") as importer:
        imported = importer.submit(_import_driver_modules)
        if not ray.is_initialized():  # not joining a cluster: our own, even beside another Ray on this machine
            with clock.phase("ray"):
                ray.init(address="local", **ray_init)
        imported.result()
    from recipes.flowgrpo.data import PromptBatcher, ValidationBatches
    from verl_omni.agent_loop import OmniAgentLoopManager
    from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer
    from verl_omni.utils.heartbeat import Heartbeat, ray_free_resources
    from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerManager

    # start-up waits on Ray placement: a progress line with Ray's free resources says whether it is one
    startup = Heartbeat(float(cfg.trainer.get("progress_interval_s", 60) or 0)).phase
    # One node: nothing to place, so the training ranks load beside the replicas (the thread only calls Ray: every
    # module is loaded by now, as concurrent imports of transformers' lazy modules fail). Several nodes: the
    # replicas are placed first, then the training ranks, where the nodes' sizes steer them (see
    # docs/advanced_features/multinode.md).
    rollout = checked.config.rollout  # the typed sections every actor receives, parsed once
    sections = TrainingSections(diffusion=rollout.diffusion, algorithm=checked.config.algorithm)
    start_training = partial(_start_training_ranks, cfg, sections, startup, clock)
    beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verl-omni-training-ranks")
    training = beside.submit(start_training) if len(cluster.nodes) == 1 else None
    # The replicas load their models while the agent-loop workers import (each takes seconds of CPU).
    launched = clock.now()
    with startup("start-up: launching the rollout replicas", ray_free_resources):
        server_manager = OmniLLMServerManager.create(
            cfg, routing=rollout.server_routing, diffusion=rollout.diffusion, wait_loaded=False
        )
    client = server_manager.get_client()
    with startup("start-up: launching the agent-loop workers", ray_free_resources), clock.phase("agent_loop_workers"):
        agent_loop_manager = OmniAgentLoopManager.create(cfg, client)
        # up before the first step (their imports take seconds): start-up counts them, not the first rollout
        ray.get([worker.__ray_ready__.remote() for worker in agent_loop_manager.agent_loop_workers])
    with startup("start-up: loading the rollout replicas", ray_free_resources), clock.phase("replicas", launched):
        server_manager.wait_loaded()

    actor_wg, layout = (training or beside.submit(start_training)).result()
    beside.shutdown()
    print(
        f"Actor: {layout['strategy']} over {layout['world_size']} rank(s) on {layout['device']}, "
        f"{layout['trainable_params'] / 1e6:.2f}M trainable parameters, {layout['local_trainable_params'] / 1e6:.2f}M "
        "held per rank"
    )

    batcher = PromptBatcher(
        checked.train,
        batch_size=int(cfg.data.train_batch_size),
        n=int(cfg.actor_rollout_ref.rollout.n),
        seed=int(cfg.trainer.seed),
        shuffle=bool(cfg.data.get("shuffle", True)),
    )
    trainer = FlowGRPOTrainer(
        cfg,
        batcher=batcher,
        agent_loop_manager=agent_loop_manager,
        actor_wg=actor_wg,
        replicas=server_manager.get_replicas(),
        load_balancer=server_manager.global_load_balancer,
        run_dir=run_dir,
        sections=sections,
        validation=ValidationBatches(
            checked.val,
            n=int(cfg.actor_rollout_ref.rollout.val_kwargs.n),
            batch_size=cfg.data.get("val_batch_size"),
            seed=int(cfg.trainer.seed),
        ),
    )
    trainer.startup = clock
    return trainer


def _start_training_ranks(
    cfg: DictConfig, sections: TrainingSections, startup: Callable[..., Any], clock: StartupClock
) -> tuple[Any, dict]:
    """Place the training ranks (verl's ``RayResourcePool``, one placement group per node) and load the model in
    them; returns the worker group and rank 0's layout."""
    import ray
    from verl.single_controller.ray import RayResourcePool

    from verl_omni.utils.heartbeat import ray_free_resources
    from verl_omni.workers.diffusion_actor import actor_worker_group

    use_gpu = int(cfg.trainer.n_gpus_per_node) > 0 and int(ray.cluster_resources().get("GPU", 0)) > 0
    world = training_ranks_per_node(cfg.trainer, use_gpu)  # one placement group per entry, each on one node
    pool = RayResourcePool(process_on_nodes=world, use_gpu=use_gpu, max_colocate_count=1, name_prefix="flowgrpo_actor")
    what = "start-up: placing the training ranks and loading the model"
    with startup(what, ray_free_resources), clock.phase("training_ranks"):
        actor_wg = actor_worker_group(cfg, sections, pool, "flowgrpo_actor", use_gpu)  # waits for the placement group
        layout = actor_wg.init_model()[0]
    return actor_wg, layout


register_config_resolvers()  # before Hydra composes: the search path names ${verl_config_dir:}


def _refuse(err: Exception) -> None:
    """The one way a bad config ends the recipe: one ``config error:`` line on stderr, exit 2."""
    print(f"config error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def check_command_line(argv: list[str]) -> None:
    """Before Hydra composes: a ``key=value`` for a key the config lacks gets the nearest valid key (Hydra's own
    message does not). Runs only on plain overrides and ``--config-name``; other flags are left to Hydra."""
    overrides, config_name, args = [], DEFAULT_CONFIG_NAME, iter(argv)
    for arg in args:
        if arg in ("--config-name", "-cn"):
            config_name = next(args, config_name)
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            return
        else:
            overrides.append(arg)
    try:
        check_override_keys(overrides, config_name)
    except ValueError as err:
        _refuse(err)


@hydra.main(config_path="config", config_name=DEFAULT_CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, overrides=list(HydraConfig.get().overrides.task))
    except ConfigError as err:
        _refuse(err)
    except KeyboardInterrupt:
        print(
            f"Interrupted. The last checkpoint under {cfg.trainer.default_local_dir}/checkpoints is intact; "
            "run the same command to resume."
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
