"""Schema of the FlowGRPO recipe config: every key the recipe reads, with its type, range and choices beside it.

Parsed once on the driver (:func:`parse_recipe_config`, before Ray, torch or verl load) into typed sections; the
overlay's own sections (``server_routing``, ``diffusion``, ``ema``, the actor's FSDP keys) are the typed objects
the actors receive. Sections verl also reads (``trainer``, ``data``, ``actor``...) are open: keys not declared
here pass through unchecked (Hydra already refuses keys the YAML lacks). Checks across sections, of the cluster
and of the filesystem stay in :mod:`recipes.flowgrpo.validate`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import Field

from verl_omni.trainer.flowgrpo.kl_forms import KL_FORMS
from verl_omni.workers.config.actor_fsdp import ActorFSDPConfig
from verl_omni.workers.config.algorithm import AlgorithmConfig, check_nft_settings, check_stale_samples
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.config.ema import EMAConfig
from verl_omni.workers.config.precision import ACTOR, IS_THRESHOLD_KEY, RECOMPUTE_KEY
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.config.schema import ConfigError, Section, option, parse, section

# verl's tracking backends (verl.utils.tracking.Tracking.supported_backend): listed here because importing verl
# takes seconds (torch, Ray); tests/test_recipe_configs.py keeps the two lists equal.
TRACKING_BACKENDS = (
    "wandb",
    "mlflow",
    "swanlab",
    "vemlp_wandb",
    "tensorboard",
    "console",
    "clearml",
    "trackio",
    "file",
    "rl_insight",
)


def _frequency(what: str, nullable: bool = False) -> str:
    """A ``trainer.*_freq``: every N steps (N > 0) or never (0, -1); any other negative is a typo, not "never"."""
    return (
        f"is not valid; valid choices: a positive integer ({what} every N steps and after the last one), 0 or -1"
        f"{', null' if nullable else ''} (never)"
    )


@section("data", closed=False)
class DataOptions(Section):
    train_batch_size: int = option(..., ge=1)
    val_batch_size: int | None = option(None, ge=1, note="prompts per validation batch; null: all in one batch")
    shuffle: bool = True
    prompt_key: str = "prompt"


@section("trainer", closed=False)
class TrainerOptions(Section):
    total_training_steps: int = option(..., ge=1)
    nnodes: int = option(1, ge=1)
    n_gpus_per_node: int = option(0, ge=0, note="training GPUs per node; 0 trains on CPU")
    cpu_ranks_per_node: int = option(
        1,
        ge=1,
        why="is not valid; valid values: a positive integer (CPU training processes per node, used when "
        "trainer.n_gpus_per_node is 0)",
    )
    seed: int | None = None
    test_freq: int = option(..., ge=-1, why=_frequency("validate"))
    val_before_train: bool = option(...)
    save_freq: int | None = option(None, ge=-1, why=_frequency("save a checkpoint", nullable=True))
    sample_freq: int | None = option(None, ge=-1, why=_frequency("save sample grids", nullable=True))
    sample_scale: int = option(..., ge=1, note="pixels per image pixel in the sample grids")
    warn_clip_frac_first: float = option(
        0.05, ge=0, le=1, note="warn when the first inner step clips more of its rows than this share"
    )
    progress_interval_s: float | None = option(60.0, ge=0, note="0 or null: no progress lines")
    preempt_grace_s: float = option(..., gt=0, note="how long a stop signal waits for the step in flight")
    resume_mode: Literal["auto", "disable", "resume_path"] = "auto"
    rollout_mode: Literal["sync", "one_step_off"] = "sync"
    resume_from_path: str | None = None
    max_actor_ckpt_to_keep: int | None = option(None, ge=1)
    logger: list[str] | str | None = None

    def __post_init__(self) -> None:
        """``logger`` names verl trackers only: verl's own check asserts after Ray and the models started."""
        names = [self.logger] if isinstance(self.logger, str) else list(self.logger or [])
        unknown = [name for name in names if name not in TRACKING_BACKENDS]
        if unknown:
            raise ConfigError(
                f"logger={names} has {', '.join(repr(n) for n in unknown)}, not a verl tracker; valid choices: "
                f"{', '.join(TRACKING_BACKENDS)}"
            )


@section(f"{ACTOR}.optim", closed=False)
class OptimOptions(Section):
    lr: float = option(..., gt=0)
    weight_decay: float = option(0.0, ge=0)


@section(ACTOR, closed=False)
class ActorOptions(Section):
    ppo_epochs: int = option(1, ge=1)
    ppo_mini_batch_size: int = option(..., ge=1)
    ppo_micro_batch_size_per_gpu: int = option(..., ge=1)
    clip_ratio: float = option(..., gt=0)
    grad_clip: float = option(1.0, gt=0)
    use_kl_loss: bool = False
    kl_loss_coef: float = option(0.0, ge=0, note="the KL coefficient beta")
    kl_form: Literal[KL_FORMS] = "reference"
    timestep_fraction: float = option(1.0, gt=0, le=1)
    cfg_detach_uncond: bool = False
    recompute_old_log_prob: bool = False
    recentre_stale: bool = True
    rollout_is_threshold: float | None = option(
        None, gt=0, note="the cap C of the truncated importance weights min(p_old / p_rollout, C); verl's is 2.0"
    )
    ema: EMAConfig = Field(default_factory=EMAConfig)
    optim: OptimOptions = option(...)

    def __post_init__(self) -> None:
        if self.rollout_is_threshold is not None and not self.recompute_old_log_prob:
            raise ConfigError(
                f"rollout_is_threshold={self.rollout_is_threshold!r} corrects between the rollout's and the "
                f"trainer's recomputed log-probs, but {RECOMPUTE_KEY}=false (no recompute, every weight would be 1); "
                f"set {RECOMPUTE_KEY}=true or {IS_THRESHOLD_KEY}=null"
            )


@section("actor_rollout_ref.model", closed=False)
class ModelOptions(Section):
    path: str | None = None
    lora_rank: int | None = option(
        0, ge=0, why="is not valid; valid choices: 0 (full fine-tuning) or a positive integer (the LoRA rank)"
    )


@section("actor_rollout_ref.rollout.val_kwargs", closed=False)
class ValKwargs(Section):
    n: int = option(1, ge=1, note="samples per validation prompt")


@section("actor_rollout_ref.rollout.agent", closed=False)
class AgentOptions(Section):
    num_workers: int = option(1, ge=1)


@section("actor_rollout_ref.rollout", closed=False)
class RolloutOptions(Section):
    n: int = option(
        ..., ge=2, why=": GRPO normalises rewards within a prompt's group, so it needs at least 2 samples per prompt"
    )
    val_kwargs: ValKwargs = Field(default_factory=ValKwargs)
    agent: AgentOptions = Field(default_factory=AgentOptions)
    server_routing: RolloutServerRoutingConfig = Field(default_factory=RolloutServerRoutingConfig)
    diffusion: DiffusionRolloutConfig = Field(default_factory=DiffusionRolloutConfig)
    diffusion_val: dict[str, Any] = Field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.diffusion.noise_level == 0:
            raise ConfigError(
                "diffusion.noise_level=0 makes every training step an ODE step, so nothing is recorded to train on; "
                "FlowGRPO needs noise_level > 0 (paper: 0.7). Use diffusion_val.noise_level=0 for validation"
            )
        self.validation_sampling()

    def validation_sampling(self) -> DiffusionRolloutConfig:
        """``diffusion`` with the ``diffusion_val`` overrides: the sampling of validation rollouts."""
        keys = DiffusionRolloutConfig.sampling_keys()
        unknown = sorted(set(self.diffusion_val) - set(keys))
        if unknown:
            raise ConfigError(f"diffusion_val has unknown key(s) {unknown}; valid: {list(keys)}")
        try:
            return parse(DiffusionRolloutConfig, {**asdict(self.diffusion), **self.diffusion_val}, "")
        except ConfigError as err:
            raise err.inside("diffusion_val") from None


@section("actor_rollout_ref", closed=False)
class ActorRolloutRef(Section):
    model: ModelOptions = Field(default_factory=ModelOptions)
    actor: ActorOptions = option(...)
    rollout: RolloutOptions = option(...)


@section("ray_kwargs.ray_init", closed=False)
class RayInitOptions(Section):
    num_cpus: float | None = option(None, gt=0)
    num_gpus: float | None = option(None, ge=0)


@section("ray_kwargs", closed=False)
class RayOptions(Section):
    ray_init: RayInitOptions = Field(default_factory=RayInitOptions)


@section("", closed=False)
class RecipeConfig(Section):
    """The recipe's keys, checked; ``fsdp`` is the actor's FSDP section in the form the training ranks use."""

    data: DataOptions = option(...)
    trainer: TrainerOptions = option(...)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    actor_rollout_ref: ActorRolloutRef = option(...)
    ray_kwargs: RayOptions = Field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        check_stale_samples(
            self.algorithm.name,
            self.trainer.rollout_mode,
            self.actor.recompute_old_log_prob,
            self.actor.recentre_stale,
        )
        window = self.rollout.diffusion.sde_window
        check_nft_settings(
            self.algorithm.name,
            self.trainer.rollout_mode,
            self.actor.recompute_old_log_prob,
            None if window is None else list(window),
        )

    @property
    def actor(self) -> ActorOptions:
        return self.actor_rollout_ref.actor

    @property
    def rollout(self) -> RolloutOptions:
        return self.actor_rollout_ref.rollout


def parse_recipe_config(cfg: Any) -> tuple[RecipeConfig, ActorFSDPConfig]:
    """The recipe config (resolved) as typed sections, checked once; raises ``ConfigError`` (a ``ValueError``)
    naming the first bad key, its value and what is valid."""
    from omegaconf import OmegaConf

    data = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    recipe = parse(RecipeConfig, data, "")
    fsdp = ActorFSDPConfig.from_actor_config(data["actor_rollout_ref"]["actor"])
    return recipe, fsdp
