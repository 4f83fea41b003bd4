"""Compose the recipe config from Python (tests, notebooks, benchmarks) exactly as the CLI does."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from verl_omni.utils.config_paths import register_config_resolvers
from verl_omni.workers.config.algorithm import AlgorithmConfig
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.config.training import TrainingSections

RECIPE_CONFIG_DIR = Path(__file__).resolve().parent / "config"


def compose_recipe(*overrides: str, config_name: str = "flowgrpo_tiny") -> DictConfig:
    """The config `python -m recipes.flowgrpo.main <overrides>` would run with."""
    register_config_resolvers()
    with initialize_config_dir(config_dir=str(RECIPE_CONFIG_DIR), version_base=None):
        return compose(config_name, overrides=list(overrides))


def training_sections(cfg: DictConfig) -> TrainingSections:
    """The composed config's sections typed as the recipe's driver hands them to the training ranks and the trainer."""
    return TrainingSections(
        diffusion=DiffusionRolloutConfig.from_config(cfg.actor_rollout_ref.rollout.get("diffusion")),
        algorithm=AlgorithmConfig.from_config(cfg.get("algorithm")),
    )
