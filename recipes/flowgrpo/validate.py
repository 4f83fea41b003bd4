"""Startup checks of the recipe config: every error names the key, the value and what is allowed,
and is raised before Ray or any model starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from recipes.flowgrpo.data import DEFAULT_PROMPTS_FILE, load_prompts
from verl_omni.rewards import registered_rewards
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig


def _positive_int(cfg: DictConfig, dotted: str) -> int:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if node is not None else None
    if isinstance(node, bool) or not isinstance(node, int) or node < 1:
        raise ValueError(f"{dotted}={node!r} must be a positive integer")
    return node


def num_rollout_replicas(cfg: DictConfig) -> int:
    """Replica count as verl's LLMServerManager computes it in standalone mode."""
    rollout = cfg.actor_rollout_ref.rollout
    per_replica = rollout.tensor_model_parallel_size * rollout.data_parallel_size * rollout.pipeline_model_parallel_size
    return (rollout.n_gpus_per_node * rollout.nnodes) // per_replica


def validate_recipe_config(cfg: DictConfig, available_gpus: int | None = None) -> list[str]:
    """Check the config; returns the training prompts. ``available_gpus`` defaults to this machine's."""
    train_files = cfg.data.get("train_files") or str(DEFAULT_PROMPTS_FILE)
    prompts = load_prompts(train_files, prompt_field=cfg.data.get("prompt_key", "prompt"), key="data.train_files")

    rollout = cfg.actor_rollout_ref.rollout
    routing = RolloutServerRoutingConfig.from_config(
        rollout.get("server_routing"), prefix="actor_rollout_ref.rollout.server_routing"
    )
    top = cfg.get("server_routing")
    if top is not None and top.get("policy") is not None and top.policy != routing.policy:
        # the long form was given explicitly: it wins, but say so
        print(f"server_routing.policy={top.policy!r} is overridden by actor_rollout_ref.rollout.server_routing")
    diffusion = DiffusionRolloutConfig.from_config(rollout.get("diffusion"))

    reward_name = cfg.reward.get("name")
    if reward_name not in registered_rewards():
        raise ValueError(f"reward.name={reward_name!r} is not a known reward; valid choices: {registered_rewards()}")

    n = rollout.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(
            f"actor_rollout_ref.rollout.n={n!r}: GRPO normalises rewards within a prompt's group, so it needs at "
            "least 2 samples per prompt"
        )
    batch = _positive_int(cfg, "data.train_batch_size")
    _positive_int(cfg, "trainer.total_training_steps")
    _positive_int(cfg, "actor_rollout_ref.actor.ppo_mini_batch_size")
    _positive_int(cfg, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu")
    workers = _positive_int(cfg, "actor_rollout_ref.rollout.agent.num_workers")
    if (batch * n) % workers:
        raise ValueError(
            f"actor_rollout_ref.rollout.agent.num_workers={workers} must divide the rollout batch "
            f"(data.train_batch_size x rollout.n = {batch * n})"
        )

    model_path = cfg.actor_rollout_ref.model.get("path")
    if model_path is not None and not (Path(model_path).expanduser() / "model_index.json").is_file():
        raise ValueError(
            f"actor_rollout_ref.model.path={model_path!r} is not a diffusers pipeline directory "
            "(no model_index.json); use null for the built-in tiny model"
        )
    if model_path is not None:
        index = json.loads((Path(model_path).expanduser() / "model_index.json").read_text())
        if "transformer" not in index:
            raise ValueError(f"actor_rollout_ref.model.path={model_path!r} has no 'transformer' to train")

    replicas = num_rollout_replicas(cfg)
    if replicas < 1:
        raise ValueError(
            "actor_rollout_ref.rollout: n_gpus_per_node x nnodes must be at least one replica's "
            f"tensor x data x pipeline parallel size (got {replicas} replicas)"
        )
    if available_gpus is None:
        import torch

        available_gpus = torch.cuda.device_count() * int(cfg.trainer.nnodes)
    train_gpus = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    ray_cpus = float(cfg.get("ray_kwargs", {}).get("ray_init", {}).get("num_cpus") or 0)
    if available_gpus == 0:
        if train_gpus:
            raise ValueError(f"trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} but no GPU is available")
        needed = replicas * diffusion.ray_num_cpus + 1  # replicas + the CPU training process
        if ray_cpus and needed > ray_cpus:
            raise ValueError(
                f"{replicas} CPU rollout replicas x actor_rollout_ref.rollout.diffusion.ray_num_cpus="
                f"{diffusion.ray_num_cpus} + 1 trainer need {needed} Ray CPUs, more than "
                f"ray_kwargs.ray_init.num_cpus={ray_cpus:g}"
            )
    else:
        rollout_gpus = replicas * diffusion.num_gpus_per_replica
        if rollout_gpus + train_gpus > available_gpus:
            raise ValueError(
                f"{replicas} rollout replicas x {diffusion.num_gpus_per_replica} GPU + trainer.n_gpus_per_node x "
                f"nnodes = {rollout_gpus + train_gpus:g} GPUs, but {available_gpus} are available"
            )
    return prompts
