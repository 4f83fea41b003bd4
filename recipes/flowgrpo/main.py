"""FlowGRPO recipe entry point.

    python -m recipes.flowgrpo.main server_routing.policy=prompt_uid_affinity

With no arguments: trains the tiny SD3-architecture model on CPU with 2 ``diffusers`` replicas.
With ``actor_rollout_ref.model.path=<SD3.5 checkpoint>`` and GPU counts (see config/): the same
code on GPUs. ``--cfg job`` prints the resolved config.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from recipes.flowgrpo.validate import validate_recipe_config

TINY_MODEL_CACHE = Path(os.environ.get("VERL_OMNI_CACHE", Path.home() / ".cache" / "verl_omni")) / "tiny_sd3"


def run(cfg: DictConfig) -> list[dict[str, float]]:
    """Validate, start Ray and the actors, train; returns the per-step metric history."""
    prompts = validate_recipe_config(cfg)  # before Ray or any model starts

    import ray
    import torch
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from recipes.flowgrpo.data import PromptBatcher
    from verl_omni.agent_loop import OmniAgentLoopManager
    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3
    from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer
    from verl_omni.workers.diffusion_actor import DiffusionActorWorker, worker_config
    from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerManager

    if cfg.actor_rollout_ref.model.get("path") is None:
        with open_dict(cfg):
            cfg.actor_rollout_ref.model.path = str(ensure_tiny_sd3(TINY_MODEL_CACHE))
    run_dir = Path(cfg.trainer.default_local_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    if not ray.is_initialized():
        ray_init = OmegaConf.to_container(cfg.get("ray_kwargs", {}).get("ray_init", {}), resolve=True)
        ray.init(**{"include_dashboard": False, "log_to_driver": True, **ray_init})

    server_manager = OmniLLMServerManager.create(cfg)
    client = server_manager.get_client()
    agent_loop_manager = OmniAgentLoopManager.create(cfg, client)

    use_gpu = int(cfg.trainer.n_gpus_per_node) > 0 and torch.cuda.is_available()
    world = [int(cfg.trainer.n_gpus_per_node)] * int(cfg.trainer.nnodes) if use_gpu else [1]
    pool = RayResourcePool(process_on_nodes=world, use_gpu=use_gpu, max_colocate_count=1, name_prefix="flowgrpo_actor")
    actor_wg = RayWorkerGroup(
        resource_pool=pool,
        ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(DiffusionActorWorker), config=worker_config(cfg)),
        name_prefix="flowgrpo_actor",
        device_name="cuda" if use_gpu else "cpu",
    )
    actor_wg.init_model()

    batcher = PromptBatcher(
        prompts,
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
        run_dir=run_dir,
    )
    return trainer.fit()


@hydra.main(config_path="config", config_name="flowgrpo_tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except KeyboardInterrupt:
        print(
            f"Interrupted. The last checkpoint under {cfg.trainer.default_local_dir}/checkpoints is intact; "
            "run the same command to resume."
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
