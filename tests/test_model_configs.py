"""The recipe's ``model=<family>`` group: the tiny CPU variants compose onto the default (``model=sd3_tiny`` is the
default itself), the real-checkpoint configs validate for one 8-GPU node with the reference's settings, their run
script passes its inputs through, and bad input (an unknown model config or tiny model, a family option on the
wrong family) is one ``config error:`` line, exit 2, before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import warm_recipe
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from recipes.flowgrpo import config_compose
from recipes.flowgrpo.validate import num_rollout_replicas, validate_model_options, validate_recipe_config
from verl_omni.models.tiny_models import TINY_MODELS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "flowgrpo" / "run_model_lora.sh"
MODEL_DIR = config_compose.RECIPE_CONFIG_DIR / "model"


def compose(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    return config_compose.compose_recipe(*overrides)


@pytest.fixture(scope="module")
def tiny_models(tiny_model) -> dict[str, Path]:
    """The tiny FLUX and Qwen-Image checkpoints: pipelines of the real classes whose configs the checks read."""
    return {"flux_dev": Path(tiny_model("flux")), "qwen_image": Path(tiny_model("qwen_image"))}


def test_sd3_tiny_is_the_default_and_sets_only_the_tiny_model() -> None:
    """`make demo` runs the same config as before the group existed: model=sd3_tiny adds one key, the tiny name
    the default already had."""
    default = compose()
    assert default == compose("model=sd3_tiny")
    assert OmegaConf.to_container(OmegaConf.load(config_compose.RECIPE_CONFIG_DIR / "model" / "sd3_tiny.yaml")) == {
        "actor_rollout_ref": {"model": {"tiny": "sd3"}}
    }
    assert default.actor_rollout_ref.model.path is None and default.actor_rollout_ref.model.tiny == "sd3"


@pytest.mark.parametrize(
    ("model", "tiny", "guidance", "negative"),
    [("flux_tiny", "flux", 3.5, ""), ("qwen_image_tiny", "qwen_image", 4.0, " ")],
)
def test_tiny_variants_select_the_family_and_its_guidance(
    model: str, tiny: str, guidance: float, negative: str
) -> None:
    cfg = compose(f"model={model}")
    diffusion = cfg.actor_rollout_ref.rollout.diffusion
    assert cfg.actor_rollout_ref.model.tiny == tiny and cfg.actor_rollout_ref.model.path is None
    assert (diffusion.guidance_scale, diffusion.get("negative_prompt", "")) == (guidance, negative)
    validate_recipe_config(cfg, available_gpus=0)  # a CPU run: the rest is the tiny default's


@pytest.fixture()
def node_env(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pickscore").mkdir()
    monkeypatch.setenv("PICKSCORE_PATH", str(tmp_path / "pickscore"))
    monkeypatch.delenv("PICKSCORE_PROCESSOR_PATH", raising=False)
    monkeypatch.delenv("VERL_OMNI_PROMPTS", raising=False)
    return tmp_path


# model -> (lora rank, alpha, steps, eval steps, guidance, noise level, group size, beta, ema, a family-only target)
REFERENCE = {
    "flux_dev": (64, 128, 6, 28, 3.5, 0.9, 24, 0.0, True, "ff_context.net.0.proj"),
    "qwen_image": (64, 128, 10, 50, 4.0, 1.2, 16, 0.0, False, "txt_mlp.net.0.proj"),
}


@pytest.mark.parametrize("model", sorted(REFERENCE))
def test_real_checkpoint_config_validates_on_one_8_gpu_node_with_the_reference_settings(
    model: str, tiny_models: dict[str, Path], node_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tiny_models[model]))  # configs only are read: the tiny one stands in
    cfg = compose(f"model={model}")
    validate_recipe_config(cfg, available_gpus=8)
    validate_model_options(cfg, str(tiny_models[model]))  # the LoRA targets exist in the family's transformer
    rank, alpha, steps, eval_steps, guidance, noise, n, beta, ema, target = REFERENCE[model]
    m, actor, rollout = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    diffusion = rollout.diffusion
    assert (m.lora_rank, m.lora_alpha, target in m.target_modules) == (rank, alpha, True)
    assert (diffusion.num_inference_steps, rollout.diffusion_val.num_inference_steps) == (steps, eval_steps)
    assert (diffusion.guidance_scale, diffusion.noise_level, diffusion.height, diffusion.width) == (
        guidance,
        noise,
        512,
        512,
    )
    assert (rollout.n, actor.kl_loss_coef, actor.ema.enable, actor.optim.lr, actor.clip_ratio) == (
        n,
        beta,
        ema,
        3.0e-4,
        1.0e-4,
    )
    assert (diffusion.device, diffusion.dtype, num_rollout_replicas(cfg), cfg.trainer.n_gpus_per_node) == (
        "cuda",
        "bfloat16",
        4,
        4,
    )
    # every stage splits evenly: replicas, agent-loop workers, training ranks, mini- and micro-batches
    samples, ranks = cfg.data.train_batch_size * rollout.n, cfg.trainer.n_gpus_per_node
    assert samples % num_rollout_replicas(cfg) == 0 and samples % rollout.agent.num_workers == 0
    assert samples % actor.ppo_mini_batch_size == 0 and actor.ppo_mini_batch_size % ranks == 0
    assert (actor.ppo_mini_batch_size // ranks) % actor.ppo_micro_batch_size_per_gpu == 0
    assert diffusion.max_num_seqs % diffusion.chunk_size == 0


def test_qwen_image_config_samples_a_two_step_sde_window_with_true_cfg(
    tiny_models: dict[str, Path], node_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tiny_models["qwen_image"]))
    cfg = compose("model=qwen_image")
    assert cfg.algorithm.name == "flow_grpo_fast" and cfg.algorithm.fast.cfg is True
    assert (cfg.algorithm.fast.window_size, list(cfg.algorithm.fast.window_range)) == (2, [0, 5])
    assert cfg.actor_rollout_ref.rollout.diffusion.negative_prompt == " "


def refused(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """Run the recipe, expect exit 2 with one ``config error:`` line before Ray and nothing written; the line."""
    run_dir = tmp_path / "run"
    env = {**os.environ, **(env or {})}
    proc = warm_recipe.run([*args, f"trainer.default_local_dir={run_dir}"], env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (run_dir / "config.yaml").exists()
    return errors[0]


def test_an_unknown_model_config_lists_the_valid_ones(tmp_path: Path) -> None:
    """Only the recipe's own: verl's `model` group (hf_model) is on the search path too, and is not a choice."""
    models = sorted(path.stem for path in MODEL_DIR.glob("*.yaml"))
    assert {"sd3_tiny", "flux_tiny", "qwen_image_tiny", "flux_dev", "qwen_image"} <= set(models)
    for bad in ("sdxl", "hf_model"):
        assert refused([f"model={bad}"], tmp_path) == (
            f"config error: model={bad}: not a model config of the recipe; valid choices: {', '.join(models)}"
        )


def test_the_model_group_on_a_config_without_it_names_the_configs_with_it(tmp_path: Path) -> None:
    assert refused(["--config-name", "flowgrpo_sd35_medium_lora", "model=flux_dev"], tmp_path) == (
        "config error: model=flux_dev: the flowgrpo_sd35_medium_lora config has no model group; configs that have "
        "one: flowgrpo_tiny (--config-name)"
    )


def test_an_unknown_tiny_model_lists_the_valid_ones(tmp_path: Path) -> None:
    assert list(TINY_MODELS)[:3] == ["sd3", "flux", "qwen_image"]
    valid = ", ".join(TINY_MODELS)
    assert refused(["actor_rollout_ref.model.tiny=sdxl"], tmp_path) == (
        f"config error: actor_rollout_ref.model.tiny='sdxl' is not a tiny model; valid choices: {valid}"
    )


def test_a_negative_prompt_on_the_tiny_flux_is_refused_before_ray(tmp_path: Path) -> None:
    """A family option on the wrong family: FLUX.1-dev is guidance-distilled (no negative prompt to use). The tiny
    model is built into an empty cache first (still before Ray) and its configs name its pipeline class."""
    line = refused(
        ["model=flux_tiny", "+actor_rollout_ref.rollout.diffusion_val.negative_prompt=blurry"],
        tmp_path,
        env={"VERL_OMNI_CACHE": str(tmp_path / "cache")},
    )
    assert line.startswith(
        "config error: actor_rollout_ref.rollout.diffusion_val.negative_prompt='blurry': a FluxPipeline checkpoint is "
        "guidance-distilled"
    )
    assert line.endswith("valid choices: ''")


# Stand-in interpreter for the run script: records where it ran and its arguments instead of training.
RECORD_ARGV = """
import json, os, sys
print(json.dumps({"cwd": os.getcwd(), "argv": sys.argv[1:]}))
"""


@pytest.fixture()
def script_env(tiny_models: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    (tmp_path / "pick score").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "record_argv.py").write_text(RECORD_ARGV)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "record_argv.py"} "$@"\n')
    python.chmod(0o755)
    return {
        **os.environ,
        "PYTHON": str(python),
        "PICKSCORE_PATH": str(tmp_path / "pick score"),
        "PROMPTS": str(tmp_path / "prompts.txt"),
    }


@pytest.mark.parametrize("model", sorted(REFERENCE))
def test_run_script_passes_the_model_and_paths_to_hydra(
    model: str, tiny_models: dict[str, Path], script_env: dict[str, str], node_env: Path
) -> None:
    env = {**script_env, "MODEL_PATH": str(tiny_models[model])}
    result = subprocess.run(
        ["bash", str(SCRIPT), model, "trainer.total_training_steps=7"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout)
    assert call["cwd"] == str(ROOT) and call["argv"][:3] == ["-m", "recipes.flowgrpo.main", f"model={model}"]
    cfg = compose(*call["argv"][2:])
    assert cfg.actor_rollout_ref.model.path == str(tiny_models[model])
    assert cfg.reward.kwargs.processor_path == script_env["PICKSCORE_PATH"]  # a path with a space, intact
    assert cfg.trainer.total_training_steps == 7
    validate_recipe_config(cfg, available_gpus=8)


@pytest.mark.parametrize(
    ("args", "model", "message"),
    [
        (["sdxl"], "flux_dev", "first argument: the model config, one of flux_dev, qwen_image (got 'sdxl')"),
        (["qwen_image"], "flux_dev", "is not a QwenImagePipeline checkpoint (model=qwen_image needs one)"),
    ],
)
def test_run_script_refuses_a_wrong_model(
    args: list[str], model: str, message: str, tiny_models: dict[str, Path], script_env: dict[str, str]
) -> None:
    env = {**script_env, "MODEL_PATH": str(tiny_models[model])}
    result = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
