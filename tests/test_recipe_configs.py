"""Recipe configs and scripts: the SD3.5 LoRA config composes and validates for one 8-GPU node, config errors
name their key before anything starts, the run scripts parse and check their inputs, and the GPU smoke test
skips cleanly (installing nothing) where there is no GPU."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from pipeline_dirs import write_json_pipeline

from recipes.flowgrpo import config_compose
from recipes.flowgrpo.validate import num_rollout_replicas, validate_recipe_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "recipes" / "flowgrpo" / "config"
RUN_SCRIPT = ROOT / "recipes" / "flowgrpo" / "run_sd35_medium_lora.sh"
MULTINODE_SCRIPT = ROOT / "recipes" / "flowgrpo" / "run_sd35_medium_lora_multinode.sh"
SMOKE_SCRIPT = ROOT / "tests" / "gpu_smoke" / "run.sh"
SD35 = "flowgrpo_sd35_medium_lora"
TINY = "flowgrpo_tiny"
POLICIES = ("prompt_uid_affinity", "least_inflight", "prompt_hash_sharding", "round_robin")
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Keys the SD3.5 config may have beyond the tiny one: GPU placement and the PickScore options.
SD35_ONLY_KEYS = {
    "actor_rollout_ref.rollout.diffusion.device",
    "actor_rollout_ref.rollout.diffusion.dtype",
    "actor_rollout_ref.rollout.diffusion.num_gpus_per_replica",
    "reward.kwargs.model_path",
    "reward.kwargs.processor_path",
    "reward.kwargs.device",
    "reward.kwargs.dtype",
    "reward.kwargs.batch_size",
}


def compose_recipe(name: str, overrides: list[str] | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    return config_compose.compose_recipe(*(overrides or []), config_name=name)


def write_pipeline(path: Path, components: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **components}))
    return path


@pytest.fixture()
def sd35_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A minimal pipeline directory and a PickScore directory, exported as the config expects them."""
    model = write_pipeline(tmp_path / "sd35", {"transformer": ["diffusers", "SD3Transformer2DModel"]})
    pickscore = tmp_path / "pickscore"
    pickscore.mkdir()
    monkeypatch.setenv("MODEL_PATH", str(model))
    monkeypatch.setenv("PICKSCORE_PATH", str(pickscore))
    monkeypatch.delenv("PICKSCORE_PROCESSOR_PATH", raising=False)
    monkeypatch.delenv("VERL_OMNI_PROMPTS", raising=False)
    return {"model": model, "pickscore": pickscore}


@pytest.fixture()
def tiny_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERL_OMNI_PROMPTS", raising=False)


# ------------------------------------------------------------------ SD3.5 config
def test_sd35_config_validates_on_one_8_gpu_node(sd35_env: dict[str, Path]) -> None:
    cfg = compose_recipe(SD35)
    assert cfg.actor_rollout_ref.model.path == str(sd35_env["model"])
    assert cfg.reward.name == "pickscore"
    assert cfg.reward.kwargs.model_path == str(sd35_env["pickscore"])
    assert cfg.reward.kwargs.processor_path is None  # the reward then uses model_path
    prompts = validate_recipe_config(cfg, available_gpus=8)
    assert prompts.train and prompts.val

    model, actor, rollout = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert (model.lora_rank, model.lora_alpha) == (32, 64)
    assert list(model.target_modules) == SD3_LORA_TARGETS
    diffusion = rollout.diffusion
    assert (diffusion.height, diffusion.width, diffusion.num_inference_steps) == (512, 512, 10)
    assert (diffusion.guidance_scale, diffusion.noise_level) == (4.5, 0.7)
    assert (diffusion.device, diffusion.dtype, diffusion.num_gpus_per_replica) == ("cuda", "bfloat16", 1)
    assert actor.use_kl_loss is True and actor.kl_loss_coef == 0.01 and actor.optim.lr == 3.0e-4
    assert actor.ema.enable is True and actor.timestep_fraction == 0.99 and actor.kl_form == "reference"
    # validation as the paper evaluates: 40 ODE steps, at the training resolution and guidance
    assert dict(OmegaConf.to_container(rollout.diffusion_val, resolve=True)) == {
        "num_inference_steps": 40,
        "noise_level": 0.0,
    }
    assert (cfg.trainer.test_freq, cfg.trainer.val_before_train, cfg.data.val_batch_size) == (25, True, 64)
    assert num_rollout_replicas(cfg) == 4 and cfg.trainer.n_gpus_per_node == 4
    assert cfg.ray_kwargs.ray_init.num_cpus is None  # no CPU cap, and joining a cluster forbids one
    assert {"tensorboard", "file"} <= set(cfg.trainer.logger)

    # Every stage splits evenly: replicas, agent-loop workers, training ranks, mini- and micro-batches.
    samples = cfg.data.train_batch_size * rollout.n
    ranks = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
    assert samples % num_rollout_replicas(cfg) == 0 and samples % rollout.agent.num_workers == 0
    assert samples % actor.ppo_mini_batch_size == 0 and actor.ppo_mini_batch_size % ranks == 0
    assert (actor.ppo_mini_batch_size // ranks) % actor.ppo_micro_batch_size_per_gpu == 0


def test_sd35_config_refuses_too_few_gpus(sd35_env: dict[str, Path]) -> None:
    cfg = compose_recipe(SD35)
    with pytest.raises(ValueError, match=r"4 rollout replicas .* = 8 GPUs, but 4 are available"):
        validate_recipe_config(cfg, available_gpus=4)


def test_sd35_model_path_is_mandatory(sd35_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_PATH")
    cfg = compose_recipe(SD35)
    with pytest.raises(InterpolationResolutionError, match="MODEL_PATH"):
        validate_recipe_config(cfg, available_gpus=8)
    # An explicit override needs no environment.
    cfg = compose_recipe(SD35, [f"actor_rollout_ref.model.path={sd35_env['model']}"])
    validate_recipe_config(cfg, available_gpus=8)


def test_sd35_model_path_must_be_a_pipeline_with_a_transformer(sd35_env: dict[str, Path], tmp_path: Path) -> None:
    cfg = compose_recipe(SD35, [f"actor_rollout_ref.model.path={tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.path=.*no model_index.json"):
        validate_recipe_config(cfg, available_gpus=8)
    unet_only = write_pipeline(tmp_path / "unet_only", {"unet": ["diffusers", "UNet2DConditionModel"]})
    cfg = compose_recipe(SD35, [f"actor_rollout_ref.model.path={unet_only}"])
    with pytest.raises(ValueError, match="no 'transformer'"):
        validate_recipe_config(cfg, available_gpus=8)


def test_sd35_config_overrides_the_base_and_adds_only_known_keys(sd35_env: dict[str, Path]) -> None:
    """Both configs include flowgrpo_base.yaml; the SD3.5 one may add only GPU placement and reward options."""

    def leaf_keys(cfg: DictConfig) -> set[str]:
        def walk(node: object, prefix: str) -> set[str]:
            if isinstance(node, dict):  # an empty section ({}) has no keys of its own
                return set().union(set(), *(walk(value, f"{prefix}{key}.") for key, value in node.items()))
            return {prefix.rstrip(".")}

        return walk(OmegaConf.to_container(cfg, resolve=False), "")

    tiny, sd35 = leaf_keys(compose_recipe(TINY)), leaf_keys(compose_recipe(SD35))
    assert tiny - sd35 == set()
    assert sd35 - tiny <= SD35_ONLY_KEYS, f"unexpected keys in {SD35}.yaml: {sorted(sd35 - tiny - SD35_ONLY_KEYS)}"


def test_sd35_lora_targets_are_sd3_attention_projections() -> None:
    """Each target names a linear layer of diffusers' SD3 transformer (joint and dual attention), and peft wraps it."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    cfg_targets = list(OmegaConf.load(CONFIG_DIR / f"{SD35}.yaml").actor_rollout_ref.model.target_modules)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),  # SD3.5-M's extra self-attention in the first blocks
    )
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=cfg_targets))
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    for target in cfg_targets:
        assert any(name.endswith(f".{target}") for name in wrapped), f"LoRA target {target!r} matched no layer"
    assert any(".attn2." in name for name in wrapped)


# ---------------------------------------------------------- tiny config, errors
def test_tiny_config_validates_without_gpus(tiny_env: None) -> None:
    cfg = compose_recipe(TINY)
    assert cfg.actor_rollout_ref.model.path is None  # the built-in tiny model
    prompts = validate_recipe_config(cfg, available_gpus=0)
    assert prompts.train and 8 <= len(prompts.val) <= 32  # data.val_files=null: the shipped validation prompts


def test_tiny_validation_follows_the_training_steps_with_ode_sampling(tiny_env: None) -> None:
    cfg = compose_recipe(TINY, ["actor_rollout_ref.rollout.diffusion.num_inference_steps=4"])
    val = OmegaConf.to_container(cfg.actor_rollout_ref.rollout.diffusion_val, resolve=True)
    assert val == {"num_inference_steps": 4, "noise_level": 0.0}
    assert cfg.actor_rollout_ref.rollout.val_kwargs.n == 1
    assert (cfg.trainer.test_freq, cfg.trainer.val_before_train) == (10, True)


def test_validation_prompts_load_like_training_prompts(tiny_env: None, tmp_path: Path) -> None:
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"caption": "a blue teapot"}) + "\n")
    cfg = compose_recipe(TINY, [f"data.val_files=[{path}]", "data.prompt_key=caption", f"data.train_files={path}"])
    assert validate_recipe_config(cfg, available_gpus=0).val == ["a blue teapot"]


def test_top_level_policy_reaches_the_rollout_and_the_long_form_wins(tiny_env: None) -> None:
    cfg = compose_recipe(TINY, ["server_routing.policy=round_robin"])
    assert cfg.actor_rollout_ref.rollout.server_routing.policy == "round_robin"
    validate_recipe_config(cfg, available_gpus=0)
    cfg = compose_recipe(
        TINY,
        ["server_routing.policy=round_robin", "actor_rollout_ref.rollout.server_routing.policy=least_inflight"],
    )
    assert cfg.actor_rollout_ref.rollout.server_routing.policy == "least_inflight"
    validate_recipe_config(cfg, available_gpus=0)


def test_diffusion_routing_is_speed_aware_by_default_and_can_be_turned_off(tiny_env: None) -> None:
    routing = compose_recipe(TINY, []).actor_rollout_ref.rollout.server_routing
    assert routing.policy == "prompt_uid_affinity" and routing.speed_aware is True
    cfg = compose_recipe(TINY, ["actor_rollout_ref.rollout.server_routing.speed_aware=false"])
    assert cfg.actor_rollout_ref.rollout.server_routing.speed_aware is False
    validate_recipe_config(cfg, available_gpus=0)
    with pytest.raises(
        ValueError, match=r"server_routing\.speed_aware='maybe' is not valid; valid choices: true, false"
    ):
        validate_recipe_config(
            compose_recipe(TINY, ["actor_rollout_ref.rollout.server_routing.speed_aware=maybe"]), available_gpus=0
        )


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["server_routing.policy=fastest"],
            r"actor_rollout_ref\.rollout\.server_routing\.policy='fastest'.*valid choices: " + ", ".join(POLICIES),
        ),
        (["actor_rollout_ref.rollout.n=1"], r"actor_rollout_ref\.rollout\.n=1: .*at least 2"),
        (["data.train_files=/nonexistent/prompts.txt"], r"data\.train_files='/nonexistent/prompts\.txt': file not"),
        (["reward.name=aesthetic_v9"], r"reward\.name='aesthetic_v9'.*jpeg_compressibility"),
        (["data.val_files=/nonexistent/val.txt"], r"data\.val_files='/nonexistent/val\.txt': file not found"),
        (["data.val_files=EMPTY"], r"data\.val_files='.*empty\.txt' holds no prompts"),
        (["trainer.test_freq=-2"], r"trainer\.test_freq=-2 is not valid; valid choices: a positive integer .*-1"),
        (["trainer.test_freq=often"], r"trainer\.test_freq='often' is not valid"),
        (["trainer.val_before_train=2"], r"trainer\.val_before_train=2 is not valid; valid choices: true, false"),
        (["data.val_batch_size=0"], r"data\.val_batch_size=0 must be a positive integer .* or null"),
        (["actor_rollout_ref.rollout.val_kwargs.n=0"], r"actor_rollout_ref\.rollout\.val_kwargs\.n=0 must be"),
        (
            ["+actor_rollout_ref.rollout.diffusion_val.max_num_seqs=4"],
            r"diffusion_val has unknown key\(s\) \['max_num_seqs'\]; valid: \['num_inference_steps'",
        ),
        (
            ["actor_rollout_ref.rollout.diffusion_val.num_inference_steps=0"],
            r"actor_rollout_ref\.rollout\.diffusion_val\.num_inference_steps=0 must be a positive integer",
        ),
        (
            ["actor_rollout_ref.rollout.diffusion.noise_level=0"],
            r"actor_rollout_ref\.rollout\.diffusion\.noise_level=0 makes every training step an ODE step",
        ),
        (
            ["actor_rollout_ref.actor.strategy=fsdp"],
            r"actor_rollout_ref\.actor\.strategy='fsdp' is not supported .*; valid choices: fsdp2",
        ),
        (
            ["actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp8"],
            r"actor\.fsdp_config\.mixed_precision\.param_dtype='fp8' is not a valid dtype; valid choices: float32, bf",
        ),
        (
            ["trainer.n_gpus_per_node=3"],
            r"rollout batch \(data\.train_batch_size x rollout\.n = 64\) must divide evenly over the 3 training ranks",
        ),
        (
            ["trainer.n_gpus_per_node=2", "actor_rollout_ref.actor.ppo_mini_batch_size=5"],
            r"actor_rollout_ref\.actor\.ppo_mini_batch_size=5 must be a multiple of the 2 training ranks",
        ),
        (["data.val_files=NOCOLOR"], r"data\.val_files: reward 'geneval_color' cannot score a prompt: .*'a cat'"),
        (["actor_rollout_ref.actor.optim.lr=-1"], r"actor\.optim\.lr=-1 must be a finite number > 0"),
        (["actor_rollout_ref.actor.clip_ratio=-1"], r"actor\.clip_ratio=-1 must be a finite number > 0"),
        (["algorithm.adv_clip_max=-1"], r"algorithm\.adv_clip_max=-1 must be a finite number > 0 or null"),
        (
            ["actor_rollout_ref.actor.ppo_epochs=0"],
            r"actor_rollout_ref\.actor\.ppo_epochs=0 must be a positive integer",
        ),
        (["trainer.max_actor_ckpt_to_keep=0"], r"trainer\.max_actor_ckpt_to_keep=0 must be a positive integer or null"),
        (
            ["trainer.resume_mode=bogus"],
            r"trainer\.resume_mode='bogus' is not valid; valid choices: auto, disable, resume",
        ),
        (
            ["trainer.rollout_mode=async"],
            r"trainer\.rollout_mode='async' is not valid; valid choices: sync, one_step_off",
        ),
        (
            ["trainer.rollout_mode=one_step_off", "actor_rollout_ref.actor.ppo_epochs=2"],
            r"trainer\.rollout_mode='one_step_off' with actor_rollout_ref\.actor\.ppo_epochs=2: .*valid choices: "
            r"ppo_epochs=1, or trainer\.rollout_mode=sync",
        ),
        (
            ["trainer.rollout_mode=one_step_off", "actor_rollout_ref.actor.ema.enable=true"],
            r"trainer\.rollout_mode='one_step_off' with actor_rollout_ref\.actor\.ema\.enable=true and validation on",
        ),
        (
            ["trainer.rollout_mode=one_step_off", "actor_rollout_ref.actor.recompute_old_log_prob=true"],
            r"actor\.recompute_old_log_prob=true with trainer\.rollout_mode='one_step_off' and actor_rollout_ref\.actor"
            r"\.recentre_stale=true: .*valid choices: actor_rollout_ref\.actor\.recompute_old_log_prob=false, or "
            r"actor_rollout_ref\.actor\.recentre_stale=false",
        ),
        (
            ["trainer.rollout_mode=one_step_off", "algorithm.name=grpo_guard"],
            r"algorithm\.name='grpo_guard' with trainer\.rollout_mode='one_step_off': .*valid choices: trainer\."
            r"rollout_mode=sync, or actor_rollout_ref\.actor\.recentre_stale=false with actor_rollout_ref\.actor\."
            r"recompute_old_log_prob=true",
        ),
        (
            ["actor_rollout_ref.actor.recentre_stale=maybe"],
            r"actor_rollout_ref\.actor\.recentre_stale='maybe' is not valid; valid choices: true, false",
        ),
        (["trainer.resume_mode=resume_path"], r"trainer\.resume_from_path=None is not a checkpoint directory"),
        (
            ["trainer.default_local_dir=/proc/verl_omni_run"],
            r"trainer\.default_local_dir='/proc/verl_omni_run' is not wri",
        ),
        (
            ["+trainer.totl_training_steps=3"],
            r"trainer\.totl_training_steps is not a key .*did you mean trainer\.total_tr",
        ),
        (
            ["actor_rollout_ref.actor.kl_form=exact"],
            r"kl_form='exact' is not valid; valid choices: reference, transition",
        ),
        (["actor_rollout_ref.actor.timestep_fraction=0"], r"timestep_fraction=0 is outside the valid range \(0, 1\]"),
        (["actor_rollout_ref.actor.timestep_fraction=1.5"], r"timestep_fraction=1\.5 is outside the valid range"),
        (
            ["actor_rollout_ref.rollout.diffusion.sde_window=[6,8]", "actor_rollout_ref.actor.timestep_fraction=0.5"],
            r"timestep_fraction=0\.5 trains the steps before index 4 of 8, but the SDE window starts at 6",
        ),
        (["actor_rollout_ref.actor.ema.decay=1.0"], r"actor\.ema\.decay=1\.0 is outside the valid range \[0, 1\)"),
        (["actor_rollout_ref.actor.ema.update_every=0"], r"actor\.ema\.update_every=0 must be a positive integer"),
        (["actor_rollout_ref.actor.kl_loss_coef=-1"], r"actor\.kl_loss_coef=-1 must be a finite number >= 0"),
        (["algorithm.drop_zero_advantage=maybe"], r"algorithm\.drop_zero_advantage='maybe' is not valid"),
        (
            ["reward.name=null", "reward.weights={jpeg_compressibility: nan}"],
            r"reward\.weights\.jpeg_compressibility=nan must be a finite number",
        ),
        (
            ["reward.name=null", "reward.weights={jpeg_compressibility: 1.0, nope: 2.0}"],
            r"reward\.weights has 'nope', not a known reward; valid choices: \[",
        ),
        (
            ["reward.weights={jpeg_compressibility: 1.0}"],
            r"reward\.name=.* and reward\.weights are both set",
        ),
        (
            ["reward.name=null", "reward.weights={jpeg_compressibility: 1.0}", "+reward.kwargs.quality=90"],
            r"reward\.kwargs has options for \['quality'\], which are not in reward\.weights",
        ),
        (
            [
                "reward.name=null",
                "reward.weights={jpeg_compressibility: 1.0}",
                "+reward.kwargs.jpeg_compressibility={q: 1}",
            ],
            r"Unknown option\(s\) \['q'\] in reward\.kwargs\.jpeg_compressibility",
        ),
        (
            ["actor_rollout_ref.model.lora_rank=-8"],
            r"actor_rollout_ref\.model\.lora_rank=-8 is not valid; valid choices: 0 \(full fine-tuning\) or a posi",
        ),
        (
            ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32"],
            r"ppo_micro_batch_size_per_gpu=32 is larger than actor_rollout_ref\.actor\.ppo_mini_batch_size=16; valid: "
            r"an integer in \[1, 16\]",
        ),
        (
            ["trainer.logger=[tensorboard,wandbx]"],
            r"trainer\.logger=\['tensorboard', 'wandbx'\] has 'wandbx', not a verl tracker; valid choices: wandb,",
        ),
        (["trainer.sample_scale=0"], r"trainer\.sample_scale=0 must be a positive integer"),
        (
            ["trainer.save_freq=-3"],
            r"trainer\.save_freq=-3 is not valid; valid choices: a positive integer \(save a checkpoint every N",
        ),
        (["trainer.sample_freq=-2"], r"trainer\.sample_freq=-2 is not valid; valid choices: a positive integer"),
        (["ray_kwargs.ray_init.num_cpus=0"], r"ray_kwargs\.ray_init\.num_cpus=0 must be a finite number > 0 or null"),
    ],
    ids=[
        "unknown-policy",
        "group-of-one",
        "missing-prompts",
        "unknown-reward",
        "missing-val-prompts",
        "empty-val-prompts",
        "negative-test-freq",
        "word-test-freq",
        "non-bool-val-before-train",
        "zero-val-batch",
        "zero-val-samples",
        "unknown-val-sampling-key",
        "bad-val-sampling-value",
        "ode-training",
        "fsdp1-strategy",
        "bad-mixed-precision",
        "batch-over-ranks",
        "mini-batch-over-ranks",
        "prompt-without-colour",
        "negative-lr",
        "negative-clip",
        "negative-adv-clip",
        "zero-epochs",
        "keep-zero-checkpoints",
        "bogus-resume-mode",
        "unknown-rollout-mode",
        "one-step-off-several-epochs",
        "one-step-off-ema-validation",
        "recentred-and-recomputed",
        "guard-one-step-off-recentred",
        "non-bool-recentre",
        "resume-path-without-path",
        "unwritable-output",
        "plus-added-typo",
        "unknown-kl-form",
        "zero-timestep-fraction",
        "timestep-fraction-above-1",
        "no-trained-step",
        "ema-decay-1",
        "ema-every-0",
        "negative-beta",
        "non-bool-zero-adv-filter",
        "nan-reward-weight",
        "unknown-weighted-reward",
        "name-and-weights",
        "kwargs-of-no-reward",
        "unknown-weighted-option",
        "negative-lora-rank",
        "micro-over-mini",
        "unknown-logger",
        "zero-sample-scale",
        "negative-save-freq",
        "negative-sample-freq",
        "zero-ray-cpus",
    ],
)
def test_bad_config_raises_naming_the_key(tiny_env: None, tmp_path: Path, overrides: list[str], pattern: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    no_color = tmp_path / "no_color.txt"
    no_color.write_text("a red car\na cat\n")
    overrides = [o.replace("EMPTY", str(empty)).replace("NOCOLOR", str(no_color)) for o in overrides]
    if not any(o.startswith("trainer.default_local_dir") for o in overrides):
        overrides.append(f"trainer.default_local_dir={tmp_path / 'run'}")
    cfg = compose_recipe(TINY, overrides)
    with pytest.raises(ValueError, match=pattern):
        validate_recipe_config(cfg, available_gpus=0, overrides=overrides)


def test_never_frequencies_are_accepted(tiny_env: None, tmp_path: Path) -> None:
    """-1 and 0 (and null for the save and sample frequencies) keep meaning "never"."""
    for value in ("-1", "0", "null"):
        overrides = [
            f"trainer.save_freq={value}",
            f"trainer.sample_freq={value}",
            f"trainer.default_local_dir={tmp_path}",
        ]
        validate_recipe_config(compose_recipe(TINY, overrides), available_gpus=0)


def test_logger_names_are_verls() -> None:
    """The recipe lists verl's tracker names (importing verl takes seconds); the two lists stay equal."""
    from verl.utils.tracking import Tracking

    from recipes.flowgrpo.schema import TRACKING_BACKENDS

    assert list(TRACKING_BACKENDS) == list(Tracking.supported_backend)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (
            "actor_rollout_ref.rollout.diffusion.guidance_scal=3",
            r"^actor_rollout_ref\.rollout\.diffusion\.guidance_scal=3: actor_rollout_ref\.rollout\.diffusion\."
            r"guidance_scal is not a key of the recipe config; did you mean actor_rollout_ref\.rollout\.diffusion\."
            r"guidance_scale\?$",
        ),
        (
            "actor_rollout_ref.rolout.n=3",
            r"actor_rollout_ref\.rolout is not a key .*did you mean actor_rollout_ref\.rollout\?",
        ),
    ],
)
def test_key_typo_without_plus_names_the_nearest_key(override: str, pattern: str) -> None:
    from recipes.flowgrpo.validate import check_override_keys

    GlobalHydra.instance().clear()
    with pytest.raises(ValueError, match=pattern):
        check_override_keys([override, "trainer.seed=1"], TINY)
    check_override_keys(["trainer.seed=1", "+trainer.anything=2"], TINY)  # valid (the + case is checked later)


def test_unset_env_var_is_named_in_one_line(sd35_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from recipes.flowgrpo.validate import resolve_config

    monkeypatch.delenv("MODEL_PATH")
    monkeypatch.delenv("PICKSCORE_PATH")
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.model\.path=\$\{oc\.env:MODEL_PATH\}, ") as info:
        resolve_config(compose_recipe(SD35))
    assert "set the environment variable(s) MODEL_PATH, PICKSCORE_PATH" in str(info.value)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("MODEL_PATH", str(sd35_env["model"]))
    with pytest.raises(ValueError, match=r"^reward\.kwargs\.model_path=\$\{oc\.env:PICKSCORE_PATH\}: set the"):
        resolve_config(compose_recipe(SD35))


def test_image_size_is_checked_from_json_without_torch(tiny_env: None, tmp_path: Path) -> None:
    """A height that is not a multiple of 16 is refused by the checks that run before torch loads (a fresh
    interpreter, so modules other tests imported do not count)."""
    model = write_json_pipeline(tmp_path / "model")
    script = (
        "import sys\n"
        "from recipes.flowgrpo.config_compose import compose_recipe\n"
        "from recipes.flowgrpo.validate import validate_recipe_config\n"
        f"cfg = compose_recipe('actor_rollout_ref.rollout.diffusion.height=100', "
        f"'trainer.default_local_dir={tmp_path / 'run'}')\n"
        "try:\n"
        f"    validate_recipe_config(cfg, available_gpus=0, image_size_model={str(model)!r})\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "actor_rollout_ref.rollout.diffusion.height=100 is not a multiple of 16" in proc.stdout
    assert proc.stdout.strip().endswith("no torch")


# ------------------------------------------------------------------ shell scripts
@pytest.mark.parametrize("script", [RUN_SCRIPT, MULTINODE_SCRIPT, SMOKE_SCRIPT], ids=lambda p: p.name)
def test_script_syntax(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


def write_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


def run_script(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60, cwd=env.get("HOME")
    )


# Stand-in interpreter for the run scripts: records where it ran and its arguments instead of training.
RECORD_ARGV = """
import json, os, sys
print(json.dumps({"cwd": os.getcwd(), "argv": sys.argv[1:]}))
"""


def scripted_config(script: Path, env: dict[str, str], *args: str) -> DictConfig:
    """The config the script would start main.py with, composed here from the arguments it passed."""
    result = run_script(script, env, *args)
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout)
    assert call["cwd"] == str(ROOT)  # `-m recipes...` imports from the repo root
    assert call["argv"][:4] == ["-m", "recipes.flowgrpo.main", "--config-name", SD35]
    return compose_recipe(SD35, call["argv"][4:])


def test_run_scripts_pass_paths_and_node_counts_to_hydra(tmp_path: Path) -> None:
    """Both scripts' overrides parse and land in the config: relative paths made absolute, a path with a space
    intact, node counts, and the caller's extra overrides."""
    model = write_pipeline(tmp_path / "sd35", {"transformer": ["diffusers", "SD3Transformer2DModel"]})
    (tmp_path / "pick score").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "record_argv.py").write_text(RECORD_ARGV)
    write_tool(tmp_path / "bin", "python", f'exec {sys.executable} {tmp_path / "record_argv.py"} "$@"')
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PYTHON": str(tmp_path / "bin" / "python"),
        "MODEL_PATH": model.name,  # relative to the caller's directory
        "PICKSCORE_PATH": "pick score",
        "PROMPTS": "prompts.txt",
        "NNODES": "2",
    }
    single = scripted_config(RUN_SCRIPT, env, "trainer.total_training_steps=7")
    assert single.actor_rollout_ref.model.path == str(model)
    assert single.reward.kwargs.processor_path == str(tmp_path / "pick score")
    assert single.data.train_files == str(tmp_path / "prompts.txt")
    assert single.trainer.total_training_steps == 7
    validate_recipe_config(single, available_gpus=8)

    multi = scripted_config(MULTINODE_SCRIPT, env)
    assert multi.trainer.nnodes == 2 and multi.actor_rollout_ref.rollout.nnodes == 2
    assert multi.trainer.n_gpus_per_node == 4 and multi.actor_rollout_ref.rollout.n_gpus_per_node == 4
    assert num_rollout_replicas(multi) == 8
    assert multi.data.train_batch_size == 2 * single.data.train_batch_size
    assert multi.actor_rollout_ref.model.path == str(model)
    validate_recipe_config(multi, available_gpus=16)  # 8 per node, as validate counts them
    with pytest.raises(ValueError, match="16 GPUs, but 8 are available"):
        validate_recipe_config(multi, available_gpus=8)


@pytest.mark.parametrize("script", [RUN_SCRIPT, MULTINODE_SCRIPT], ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("unset", "message"),
    [("MODEL_PATH", "set MODEL_PATH"), ("PICKSCORE_PATH", "set PICKSCORE_PATH"), ("PROMPTS", "set PROMPTS")],
)
def test_run_scripts_name_a_missing_input(tmp_path: Path, script: Path, unset: str, message: str) -> None:
    model = write_pipeline(tmp_path / "sd35", {"transformer": ["diffusers", "SD3Transformer2DModel"]})
    (tmp_path / "prompts.txt").write_text("a cat\n")
    env = {**os.environ, "MODEL_PATH": str(model), "PICKSCORE_PATH": str(tmp_path), "NNODES": "1"}
    env["PROMPTS"] = str(tmp_path / "prompts.txt")
    env.pop(unset)
    result = run_script(script, env)
    assert result.returncode == 2 and message in result.stderr


# -------------------------------------------------------------- GPU smoke test
@pytest.mark.parametrize(
    "nvidia_smi",
    [
        None,
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
        "echo 'No devices were found'",
    ],
    ids=["no-nvidia-smi", "no-driver", "no-devices"],
)
def test_gpu_smoke_skips_without_a_gpu_and_installs_nothing(tmp_path: Path, nvidia_smi: str | None) -> None:
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "make", f'echo "$@" >> {tmp_path / "make_calls"}')
    if nvidia_smi is not None:
        write_tool(bin_dir, "nvidia-smi", nvidia_smi)
    # Only the stand-ins and grep on PATH: a real nvidia-smi or make on this machine must not be reached.
    (bin_dir / "grep").symlink_to(shutil.which("grep"))
    env = {**os.environ, "PATH": str(bin_dir), "HOME": str(tmp_path)}
    result = subprocess.run(["/bin/bash", str(SMOKE_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "SKIP gpu_smoke: no GPU found" in result.stdout
    assert not (tmp_path / "make_calls").exists()


def test_gpu_smoke_installs_through_make_when_a_gpu_is_listed(tmp_path: Path) -> None:
    """The GPU branch really runs: it calls `make install` first, and a failed install fails the smoke test."""
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "nvidia-smi", "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'")
    write_tool(bin_dir, "make", f'echo "$@" >> {tmp_path / "make_calls"}; exit 7')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(SMOKE_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 7
    assert (tmp_path / "make_calls").read_text().split() == ["install"]


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["actor_rollout_ref.rollout.diffusion.height=30"], r"actor_rollout_ref\.rollout\.diffusion\.height=30"),
        (["+actor_rollout_ref.rollout.diffusion_val.width=70"], r"actor_rollout_ref\.rollout\.diffusion_val\.width=70"),
        (
            ["actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.target_modules=[to_q,nope]"],
            r"target_modules has \['nope'\], which match no module of the transformer; module names end in e\.g\.",
        ),
    ],
    ids=["height-off-the-vae-grid", "val-width-off-the-grid", "unknown-lora-target"],
)
def test_model_dependent_settings_are_checked_from_its_configs(
    tiny_env: None, tmp_path_factory: pytest.TempPathFactory, overrides: list[str], pattern: str
) -> None:
    from recipes.flowgrpo.validate import validate_model_options
    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3

    path = str(ensure_tiny_sd3(tmp_path_factory.getbasetemp() / "models"))
    validate_model_options(compose_recipe(TINY), path)  # the defaults pass
    validate_model_options(compose_recipe(TINY, ["actor_rollout_ref.model.lora_rank=4"]), path)
    with pytest.raises(ValueError, match=pattern):
        validate_model_options(compose_recipe(TINY, overrides), path)


def test_one_step_off_as_drawn_warns_what_it_costs_in_learning_and_the_default_does_not(tiny_env: None, capsys) -> None:
    """A measured cost, said where it is chosen: one ``warning:`` line on stderr for stale samples trained as drawn;
    none in ``sync`` nor in ``one_step_off`` with re-centring (the default)."""
    for quiet in ([], ["trainer.rollout_mode=one_step_off"]):
        validate_recipe_config(compose_recipe(TINY, quiet), available_gpus=0)
        assert "one_step_off" not in capsys.readouterr().err
    as_drawn = ["trainer.rollout_mode=one_step_off", "actor_rollout_ref.actor.recentre_stale=false"]
    validate_recipe_config(compose_recipe(TINY, as_drawn), available_gpus=0)
    lines = [line for line in capsys.readouterr().err.splitlines() if "one_step_off" in line]
    assert len(lines) == 1
    assert lines[0].startswith("warning: trainer.rollout_mode=one_step_off with actor_rollout_ref.actor.recentre_stale")


def test_grpo_guard_runs_one_step_off_on_samples_as_drawn_with_recomputed_old_log_probs(tiny_env: None) -> None:
    """The one combination GRPO-Guard takes off-policy: no re-centring, old log-probs and means from one set of
    weights (the update's start)."""
    overrides = [
        "trainer.rollout_mode=one_step_off",
        "algorithm.name=grpo_guard",
        "actor_rollout_ref.actor.recentre_stale=false",
        "actor_rollout_ref.actor.recompute_old_log_prob=true",
    ]
    validate_recipe_config(compose_recipe(TINY, overrides), available_gpus=0)
