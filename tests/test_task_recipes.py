"""The paper's tasks as recipes (``task=ocr|geneval|pickscore`` over the SD3.5 LoRA config): each composes and
validates for one 8-GPU node with the reference's settings (no checkpoint needed), ships the reference's test
prompts, and the run script passes its inputs through."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from recipes.flowgrpo import config_compose
from recipes.flowgrpo.data import load_prompts
from recipes.flowgrpo.validate import num_rollout_replicas, validate_recipe_config

ROOT = Path(__file__).resolve().parents[1]
SD35 = "flowgrpo_sd35_medium_lora"
SCRIPT = ROOT / "recipes" / "flowgrpo" / "run_sd35_medium_lora_task.sh"
DATA = ROOT / "recipes" / "flowgrpo" / "data" / "flow_grpo"
# task -> (reward name, beta, shipped test prompts, their count): config/grpo.py and dataset/ of the reference
TASKS = {
    "ocr": ("ocr", 0.04, "ocr_test.txt", 1018),
    "geneval": ("remote", 0.04, "geneval_test_metadata.jsonl", 2212),
    "pickscore": ("pickscore", 0.01, "pickscore_test.txt", 2048),
}


def compose(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    return config_compose.compose_recipe(*overrides, config_name=SD35)


@pytest.fixture()
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pipeline directory (configs only), PickScore directories, training prompts every task's reward can
    score, and the repo root as the working directory (the run script's)."""
    model = tmp_path / "sd35"
    model.mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
    (model / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "pickscore").mkdir()
    prompts = tmp_path / "train.txt"
    prompts.write_text('a neon sign that says "OPEN"\na cake with "Happy Birthday" on it\n')
    monkeypatch.setenv("MODEL_PATH", str(model))
    monkeypatch.setenv("PICKSCORE_PATH", str(tmp_path / "pickscore"))
    monkeypatch.setenv("VERL_OMNI_PROMPTS", str(prompts))
    monkeypatch.delenv("PICKSCORE_PROCESSOR_PATH", raising=False)
    monkeypatch.chdir(ROOT)
    return tmp_path


@pytest.fixture()
def geneval_service(tmp_path: Path) -> Iterator[str]:
    """A real reward service standing in for a GenEval server (any scorer answers the same protocol)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "verl_omni.rewards.serve", "--reward", "jpeg_compressibility", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    match = re.search(r"(http://127\.0\.0\.1:\d+)", proc.stdout.readline())
    assert match, proc.stderr.read()
    yield match.group(1)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_validates_on_one_8_gpu_node_with_the_reference_settings(
    node: Path, geneval_service: str, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    monkeypatch.setenv("GENEVAL_URL", geneval_service)
    cfg = compose(f"task={task}")
    reward, beta, val_file, count = TASKS[task]
    prompts = validate_recipe_config(cfg, available_gpus=8)
    assert len(prompts.val) == count and len(prompts.train) == 2

    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert cfg.reward.name == reward and actor.kl_loss_coef == beta
    assert (cfg.data.train_batch_size, rollout.n) == (48, 24)  # ref: 48 prompts x 24 images per epoch
    assert Path(cfg.data.val_files).resolve() == DATA / val_file
    assert (cfg.trainer.save_freq, cfg.trainer.test_freq) == (60, 60)
    # what the SD3.5 config already holds at the reference's values
    diffusion = rollout.diffusion
    assert (diffusion.height, diffusion.num_inference_steps, diffusion.guidance_scale) == (512, 10, 4.5)
    assert cfg.actor_rollout_ref.rollout.diffusion_val.num_inference_steps == 40
    assert actor.timestep_fraction == 0.99 and actor.ema.enable and cfg.algorithm.global_std
    # every stage splits evenly: replicas, workers, ranks, two optimizer steps per rollout step
    samples, ranks = cfg.data.train_batch_size * rollout.n, cfg.trainer.n_gpus_per_node
    assert samples % num_rollout_replicas(cfg) == 0 and samples % rollout.agent.num_workers == 0
    assert samples // actor.ppo_mini_batch_size == 2 and (actor.ppo_mini_batch_size // ranks) % 4 == 0


def test_task_rewards_take_no_pickscore_options(node: Path, geneval_service: str, monkeypatch) -> None:
    monkeypatch.setenv("GENEVAL_URL", geneval_service)
    assert OmegaConf.to_container(compose("task=ocr").reward.kwargs) == {"device": "cpu", "num_threads": 4}
    geneval = compose("task=geneval").reward.kwargs
    assert geneval.url == geneval_service and "model_path" not in geneval
    assert compose("task=pickscore").reward.kwargs.model_path == str(node / "pickscore")
    assert compose().reward.name == "pickscore" and compose().data.train_batch_size == 8  # no task: unchanged


def test_geneval_without_its_service_is_a_config_error(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENEVAL_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ValueError, match=r"reward\.kwargs\.url='http://127\.0\.0\.1:9': no reward service answers"):
        validate_recipe_config(compose("task=geneval"), available_gpus=8)


def test_ocr_refuses_training_prompts_without_quoted_text(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (node / "plain.txt").write_text("a photo of a cat\n")
    monkeypatch.setenv("VERL_OMNI_PROMPTS", str(node / "plain.txt"))
    with pytest.raises(
        ValueError, match=r"data\.train_files: reward 'ocr' cannot score a prompt: .*'a photo of a cat'"
    ):
        validate_recipe_config(compose("task=ocr"), available_gpus=8)


def test_shipped_reference_prompts_load_with_their_licence() -> None:
    for _, _, name, count in TASKS.values():
        assert len(load_prompts(str(DATA / name))) == count
    assert "MIT License" in (DATA / "LICENSE").read_text()


# ------------------------------------------------------------------ run script
RECORD_ARGV = 'import json, os, sys\nprint(json.dumps({"cwd": os.getcwd(), "argv": sys.argv[1:]}))\n'


def _script_env(tmp_path: Path, node: Path) -> dict[str, str]:
    (tmp_path / "record_argv.py").write_text(RECORD_ARGV)
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "record_argv.py"} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PYTHON": str(python), "PROMPTS": str(node / "train.txt")}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_run_script_starts_the_task(tmp_path: Path, node: Path, geneval_service: str, task: str) -> None:
    env = {**_script_env(tmp_path, node), "GENEVAL_URL": geneval_service}
    result = _run(env, task, "trainer.total_training_steps=7")
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout)
    assert call["cwd"] == str(ROOT)
    assert call["argv"][:5] == ["-m", "recipes.flowgrpo.main", "--config-name", SD35, f"task={task}"]
    cfg = compose(*call["argv"][4:])
    assert cfg.data.train_files == str(node / "train.txt") and cfg.trainer.total_training_steps == 7
    validate_recipe_config(cfg, available_gpus=8)


@pytest.mark.parametrize(
    ("args", "unset", "message"),
    [
        ([], None, "the first argument names the task: ocr, geneval or pickscore"),
        (["nope"], None, "the first argument names the task"),
        (["ocr"], "MODEL_PATH", "set MODEL_PATH"),
        (["ocr"], "PROMPTS", "set PROMPTS"),
        (["pickscore"], "PICKSCORE_PATH", "set PICKSCORE_PATH"),
    ],
)
def test_run_script_names_a_missing_input(tmp_path: Path, node: Path, args, unset, message) -> None:
    env = _script_env(tmp_path, node)
    if unset:
        env.pop(unset, None)
    result = _run(env, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
