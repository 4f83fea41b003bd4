"""Startup checks of the recipe config: every error names the key, the value and what is allowed,
and is raised before Ray or any model starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from recipes.flowgrpo.data import (
    DEFAULT_PROMPTS_FILE,
    DEFAULT_VAL_PROMPTS_FILE,
    TRAIN_FILES_KEY,
    VAL_FILES_KEY,
    load_prompts,
)
from verl_omni.agent_loop.sampling import sampling_params
from verl_omni.rewards.weighted import reward_specs
from verl_omni.trainer.flowgrpo.loss import KL_FORMS
from verl_omni.trainer.flowgrpo.trained_steps import trained_step_count
from verl_omni.workers.config.actor_fsdp import ActorFSDPConfig, check_training_split
from verl_omni.workers.config.diffusion import DIFFUSION_CONFIG_PREFIX, DiffusionRolloutConfig
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.ema import validate_ema_options


def _positive_int(cfg: DictConfig, dotted: str) -> int:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if node is not None else None
    if isinstance(node, bool) or not isinstance(node, int) or node < 1:
        raise ValueError(f"{dotted}={node!r} must be a positive integer")
    return node


class RecipePrompts(NamedTuple):
    """The prompts the recipe config names: ``data.train_files`` and ``data.val_files``."""

    train: list[str]
    val: list[str]


def _validation_options(cfg: DictConfig) -> None:
    """verl's validation keys: ``trainer.test_freq``, ``trainer.val_before_train``, ``data.val_batch_size`` and
    ``actor_rollout_ref.rollout.val_kwargs.n``; ``diffusion_val`` overrides must make a valid sampling config."""
    test_freq = cfg.trainer.get("test_freq")
    if isinstance(test_freq, bool) or not isinstance(test_freq, int) or test_freq < -1:
        raise ValueError(
            f"trainer.test_freq={test_freq!r} is not valid; valid choices: a positive integer (validate every N "
            "steps and after the last one), 0 or -1 (never)"
        )
    before = cfg.trainer.get("val_before_train")
    if not isinstance(before, bool):
        raise ValueError(f"trainer.val_before_train={before!r} is not valid; valid choices: true, false")
    val_batch = cfg.data.get("val_batch_size")
    if val_batch is not None and (isinstance(val_batch, bool) or not isinstance(val_batch, int) or val_batch < 1):
        raise ValueError(
            f"data.val_batch_size={val_batch!r} must be a positive integer (prompts per validation batch) or null "
            "(all validation prompts in one batch)"
        )
    _positive_int(cfg, "actor_rollout_ref.rollout.val_kwargs.n")

    rollout = cfg.actor_rollout_ref.rollout
    merged = OmegaConf.to_container(rollout.get("diffusion") or OmegaConf.create({}), resolve=True)
    merged.update(sampling_params(rollout, validate=True))  # rejects keys that are not sampling parameters
    try:
        DiffusionRolloutConfig.from_config(merged)
    except ValueError as err:  # `diffusion` itself is valid (checked first): the bad value is a diffusion_val one
        raise ValueError(
            str(err).replace(DIFFUSION_CONFIG_PREFIX, "actor_rollout_ref.rollout.diffusion_val", 1)
        ) from None


def _flowgrpo_options(cfg: DictConfig, diffusion: DiffusionRolloutConfig) -> None:
    """The FlowGRPO knobs beyond verl's: KL form, trained steps, CFG gradient, EMA, zero-advantage filtering."""
    actor = cfg.actor_rollout_ref.actor
    prefix = "actor_rollout_ref.actor"
    kl_form = actor.get("kl_form", "reference")
    if kl_form not in KL_FORMS:
        raise ValueError(f"{prefix}.kl_form={kl_form!r} is not valid; valid choices: {', '.join(KL_FORMS)}")
    trained_step_count(diffusion.num_inference_steps, diffusion.sde_window, actor.get("timestep_fraction", 1.0))
    for key, section in (("cfg_detach_uncond", actor), ("use_kl_loss", actor)):
        if not isinstance(section.get(key, False), bool):
            raise ValueError(f"{prefix}.{key}={section.get(key)!r} is not valid; valid choices: true, false")
    drop = cfg.algorithm.get("drop_zero_advantage", True)
    if not isinstance(drop, bool):
        raise ValueError(f"algorithm.drop_zero_advantage={drop!r} is not valid; valid choices: true, false")
    beta = actor.get("kl_loss_coef", 0.0)
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < float("inf"):
        raise ValueError(f"{prefix}.kl_loss_coef={beta!r} must be a finite number >= 0 (the KL coefficient beta)")
    ema = actor.get("ema") or {}
    validate_ema_options(ema.get("enable", False), ema.get("decay", 0.9), ema.get("update_every", 8))


def num_rollout_replicas(cfg: DictConfig) -> int:
    """Replica count as verl's LLMServerManager computes it in standalone mode."""
    rollout = cfg.actor_rollout_ref.rollout
    per_replica = rollout.tensor_model_parallel_size * rollout.data_parallel_size * rollout.pipeline_model_parallel_size
    return (rollout.n_gpus_per_node * rollout.nnodes) // per_replica


def validate_recipe_config(cfg: DictConfig, available_gpus: int | None = None) -> RecipePrompts:
    """Check the config; returns the training and validation prompts. ``available_gpus`` defaults to this
    machine's."""
    prompt_key = cfg.data.get("prompt_key", "prompt")
    train_files = cfg.data.get("train_files") or str(DEFAULT_PROMPTS_FILE)
    prompts = load_prompts(train_files, prompt_field=prompt_key, key=TRAIN_FILES_KEY)
    val_files = cfg.data.get("val_files") or str(DEFAULT_VAL_PROMPTS_FILE)
    val_prompts = load_prompts(val_files, prompt_field=prompt_key, key=VAL_FILES_KEY)

    rollout = cfg.actor_rollout_ref.rollout
    routing = RolloutServerRoutingConfig.from_config(
        rollout.get("server_routing"), prefix="actor_rollout_ref.rollout.server_routing"
    )
    top = cfg.get("server_routing")
    if top is not None and top.get("policy") is not None and top.policy != routing.policy:
        # the long form was given explicitly: it wins, but say so
        print(f"server_routing.policy={top.policy!r} is overridden by actor_rollout_ref.rollout.server_routing")
    diffusion = DiffusionRolloutConfig.from_config(rollout.get("diffusion"))
    if diffusion.noise_level == 0:
        raise ValueError(
            f"{DIFFUSION_CONFIG_PREFIX}.noise_level=0 makes every training step an ODE step, so nothing is recorded "
            "to train on; FlowGRPO needs noise_level > 0 (paper: 0.7). Use diffusion_val.noise_level=0 for validation"
        )
    _validation_options(cfg)

    reward_specs(cfg.get("reward"))
    _flowgrpo_options(cfg, diffusion)

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

    ActorFSDPConfig.from_actor_config(cfg.actor_rollout_ref.actor)
    train_ranks = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes) or 1
    check_training_split(batch * n, int(cfg.actor_rollout_ref.actor.ppo_mini_batch_size), train_ranks)

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
    return RecipePrompts(train=prompts, val=val_prompts)
