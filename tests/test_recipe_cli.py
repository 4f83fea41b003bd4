"""Bad input on the recipe's command line: one clear line, exit code 2, before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_dirs import write_json_pipeline

from verl_omni.workers.rollout.backends import missing_vllm_omni_modules

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("server_routing.policy=fastest", "server_routing.policy='fastest' is not a valid routing policy"),
        ("data.train_files=/nonexistent/prompts.txt", "data.train_files="),
        ("data.val_files=/nonexistent/val.txt", "data.val_files='/nonexistent/val.txt': file not found"),
        ("trainer.test_freq=-2", "trainer.test_freq=-2 is not valid; valid choices:"),
        ("trainer.cpu_ranks_per_node=0", "trainer.cpu_ranks_per_node=0 is not valid; valid values: a positive integer"),
        ("+trainer.totl_training_steps=3", "did you mean trainer.total_training_steps?"),
        ("actor_rollout_ref.actor.timestep_fraction=0", "timestep_fraction=0 is outside the valid range (0, 1]"),
        (
            "actor_rollout_ref.rollout.diffusion.chunk_size=0",
            "actor_rollout_ref.rollout.diffusion.chunk_size=0 must be an integer in [1, max_num_seqs=16]",
        ),
        (
            "actor_rollout_ref.rollout.diffusion.chunk_size=17",
            "actor_rollout_ref.rollout.diffusion.chunk_size=17 must be an integer in [1, max_num_seqs=16]",
        ),
        (
            "actor_rollout_ref.model.lora_rank=-8",
            "config error: actor_rollout_ref.model.lora_rank=-8 is not valid; valid choices: 0 (full fine-tuning) or "
            "a positive integer (the LoRA rank)",
        ),
        (
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32",
            "config error: actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32 is larger than "
            "actor_rollout_ref.actor.ppo_mini_batch_size=16; valid: an integer in [1, 16]",
        ),
        (
            "trainer.logger=[tensorboard,wandbx]",
            "config error: trainer.logger=['tensorboard', 'wandbx'] has 'wandbx', not a verl tracker; valid choices: ",
        ),
        ("trainer.sample_scale=0", "config error: trainer.sample_scale=0 must be a positive integer"),
        (
            "actor_rollout_ref.rollout.diffusion.guidance_scal=3",
            "config error: actor_rollout_ref.rollout.diffusion.guidance_scal=3: actor_rollout_ref.rollout.diffusion."
            "guidance_scal is not a key of the recipe config; did you mean actor_rollout_ref.rollout.diffusion."
            "guidance_scale?",
        ),
        (
            "data.train_files=BADUTF8",
            "bad_utf8.txt': line 2 is not valid UTF-8 (byte 0xff at column 5); expected a UTF-8 text file",
        ),
        (
            "trainer.save_freq=-3",
            "config error: trainer.save_freq=-3 is not valid; valid choices: a positive integer (save a checkpoint "
            "every N steps and after the last one), 0 or -1, null (never)",
        ),
        (
            "ray_kwargs.ray_init.num_cpus=0",
            "config error: ray_kwargs.ray_init.num_cpus=0 must be a finite number > 0 or null",
        ),
        (
            "algorithm.name=dance_grpo",
            "config error: algorithm.name='dance_grpo' is not valid; valid choices: flow_grpo, flow_grpo_fast, "
            "mix_grpo, grpo_guard, diffusion_nft",
        ),
        ("algorithm.fast.window_size=0", "config error: algorithm.fast.window_size=0 must be a positive integer"),
        (
            "algorithm.mix.shift=2",
            "config error: algorithm.mix.shift=2 is an option of algorithm.name='mix_grpo', but "
            "algorithm.name='flow_grpo' (which takes no algorithm options)",
        ),
        (
            "algorithm.mix.schedule=linear",
            "config error: algorithm.mix.schedule='linear' is not valid; valid choices: constant, decay, exp_decay, "
            "random",
        ),
        (
            "actor_rollout_ref.rollout.diffusion.sde_type=ddim",
            "config error: actor_rollout_ref.rollout.diffusion.sde_type='ddim' is not a valid SDE step; valid "
            "choices: sde, cps",
        ),
        (
            "actor_rollout_ref.rollout.diffusion.height=100",
            "config error: actor_rollout_ref.rollout.diffusion.height=100 is not a multiple of 16 (VAE scale factor 8 "
            "x transformer patch size 2)",
        ),
        pytest.param(
            "actor_rollout_ref.rollout.name=vllm_omni",
            "actor_rollout_ref.rollout.name='vllm_omni' needs the vllm-omni extra",
            marks=pytest.mark.skipif(not missing_vllm_omni_modules(), reason="the vllm-omni extra is installed here"),
        ),
    ],
)
def test_bad_config_exits_2_with_one_line_before_ray(override: str, message: str, tmp_path: Path) -> None:
    bad_utf8 = tmp_path / "bad_utf8.txt"
    bad_utf8.write_bytes(b"a cat\nbad \xff line\n")
    model = write_json_pipeline(tmp_path / "model")  # the height check reads this model's JSON configs
    args = [override.replace("BADUTF8", str(bad_utf8)), f"trainer.default_local_dir={tmp_path / 'run'}"]
    if not override.startswith("actor_rollout_ref.model."):
        args.append(f"actor_rollout_ref.model.path={model}")
    assert_refused(args, message, tmp_path / "run")


def test_sd35_config_without_its_paths_names_the_env_vars(tmp_path: Path) -> None:
    """The GPU config started directly (as its docs allow) without MODEL_PATH / PICKSCORE_PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "PICKSCORE_PATH")}
    args = ["--config-name", "flowgrpo_sd35_medium_lora", f"trainer.default_local_dir={tmp_path / 'run'}"]
    assert_refused(args, "set the environment variable(s) MODEL_PATH, PICKSCORE_PATH", tmp_path / "run", env=env)


def assert_refused(args: list[str], message: str, run_dir: Path, env: dict[str, str] | None = None) -> None:
    """The recipe exits 2 with one ``config error:`` line holding ``message``, before Ray, writing nothing. A fresh
    interpreter: a config error costs about as much as a fork of the warm driver (tests/warm_recipe.py) would."""
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.flowgrpo.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (run_dir / "config.yaml").exists()  # nothing was written either


def test_a_config_error_comes_before_torch_verl_or_ray_load(tmp_path: Path) -> None:
    """A fresh interpreter, as a user types the command: the refusal is printed before the heavy imports
    (``-X importtime`` lists every module the run imported)."""
    args = ["server_routing.policy=fastest", f"trainer.default_local_dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-X", "importtime", "-m", "recipes.flowgrpo.main", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and "'fastest' is not a valid routing policy" in errors[0]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported  # the import list is there
    assert not imported & {"torch", "verl", "ray", "diffusers", "transformers"}, sorted(imported)[:50]


def test_joining_a_cluster_drops_the_local_ray_sizes_with_a_note(capsys) -> None:
    """The tiny config sizes its local Ray (num_cpus: 4); joining a running cluster, Ray refuses any size, so the
    sizes are dropped (the cluster's own apply) and a line says so; every other argument is kept."""
    from recipes.flowgrpo.main import _joining

    ray_init = {"num_cpus": 4, "num_gpus": None, "include_dashboard": False, "runtime_env": {"env_vars": {}}}
    assert _joining(ray_init) == {"include_dashboard": False, "runtime_env": {"env_vars": {}}}
    assert capsys.readouterr().out == (
        "Joining a running Ray cluster: ray_kwargs.ray_init.num_cpus=4 size(s) a local Ray only; the cluster's own "
        "resources apply.\n"
    )
    assert _joining({"include_dashboard": False}) == {"include_dashboard": False}
    assert capsys.readouterr().out == ""
