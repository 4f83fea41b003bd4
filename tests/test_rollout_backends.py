"""Choosing a rollout backend (``actor_rollout_ref.rollout.name``): bad choices are refused at config validation,
before Ray starts, with the key, the value and the valid choices or the command to run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from recipes.flowgrpo.config_compose import compose_recipe
from recipes.flowgrpo.validate import validate_recipe_config
from verl_omni.pipelines.registry import ROLLOUT_BACKENDS, load_adapter, supported_pipelines
from verl_omni.workers.rollout import backends
from verl_omni.workers.rollout.backends import check_rollout_backend, missing_vllm_omni_modules


@pytest.fixture
def extra_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend vllm and vllm_omni are importable (found by name only; nothing is imported)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name in ("vllm", "vllm_omni") else real(name, *a)
    )


def _checkpoint(tmp_path: Path, pipeline_class: str) -> str:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return str(tmp_path)


def test_an_unknown_backend_lists_the_valid_choices():
    with pytest.raises(ValueError) as err:
        check_rollout_backend("vllm", available_gpus=8)
    assert str(err.value) == (
        "actor_rollout_ref.rollout.name='vllm' is not a rollout backend of verl-omni; "
        "valid choices: diffusers, vllm_omni"
    )


def test_an_unknown_backend_fails_the_recipe_validation(tmp_path: Path):
    cfg = compose_recipe("actor_rollout_ref.rollout.name=sglang", f"trainer.default_local_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"rollout.name='sglang' is not a rollout backend.*diffusers, vllm_omni"):
        validate_recipe_config(cfg, available_gpus=0)


@pytest.mark.skipif(not missing_vllm_omni_modules(), reason="the vllm-omni extra is installed here")
def test_vllm_omni_without_the_extra_says_what_to_install():
    with pytest.raises(ValueError, match=r"rollout.name='vllm_omni' needs the vllm-omni extra .*") as err:
        check_rollout_backend("vllm_omni", available_gpus=8)
    assert "pip install -e .[vllm-omni]` on a Linux x86-64 machine with CUDA GPUs" in str(err.value)
    assert "pip install -e .[vllm-omni-cpu]` on CPU" in str(err.value)


def test_vllm_omni_on_cpu_needs_the_cpu_build_of_vllm(extra_installed, monkeypatch):
    assert missing_vllm_omni_modules() == []
    monkeypatch.setattr(backends, "vllm_build", lambda: "cuda")
    with pytest.raises(ValueError) as err:
        check_rollout_backend("vllm_omni", available_gpus=0)
    assert str(err.value) == (
        "actor_rollout_ref.rollout.name='vllm_omni' has no CUDA GPU here and vLLM's CPU build is not installed "
        "(found: cuda): run `pip install -e .[vllm-omni-cpu]` in a fresh environment, or use "
        "actor_rollout_ref.rollout.name=diffusers"
    )
    check_rollout_backend("vllm_omni", available_gpus=1)  # the tiny model (no path) is SD3: served
    monkeypatch.setattr(backends, "vllm_build", lambda: "cpu")
    check_rollout_backend("vllm_omni", available_gpus=0, lora_rank=8)


def test_vllm_omni_on_cpu_refuses_full_weight_training(extra_installed, monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "vllm_build", lambda: "cpu")
    with pytest.raises(ValueError) as err:
        check_rollout_backend("vllm_omni", available_gpus=0, lora_rank=0)
    assert str(err.value).startswith(
        "actor_rollout_ref.model.lora_rank=0: actor_rollout_ref.rollout.name='vllm_omni' on CPU cannot load "
        "full-weight updates"
    )
    assert "train a LoRA adapter (actor_rollout_ref.model.lora_rank > 0, e.g. 8)" in str(err.value)
    cfg = compose_recipe("actor_rollout_ref.rollout.name=vllm_omni", f"trainer.default_local_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"lora_rank=0: .*vllm_omni' on CPU cannot load full-weight updates"):
        validate_recipe_config(cfg, available_gpus=0)


@pytest.mark.parametrize("backend", ROLLOUT_BACKENDS)
def test_a_model_without_a_pipeline_for_the_backend_is_refused(backend, tmp_path, extra_installed):
    path = _checkpoint(tmp_path, "StableDiffusionXLPipeline")
    with pytest.raises(ValueError) as err:
        check_rollout_backend(backend, path, available_gpus=1)
    valid = ", ".join(supported_pipelines(backend))
    assert str(err.value) == (
        f"actor_rollout_ref.model.path={path!r} holds a 'StableDiffusionXLPipeline' pipeline, which the {backend!r} "
        f"rollout backend has no pipeline for; valid choices: {valid}"
    )
    check_rollout_backend(backend, _checkpoint(tmp_path, "StableDiffusion3Pipeline"), available_gpus=1)


def test_every_backend_serves_sd3_and_the_diffusers_adapter_loads():
    assert supported_pipelines("diffusers")[:2] == ("StableDiffusion3Pipeline", "FluxPipeline")
    assert "QwenImagePipeline" in supported_pipelines("diffusers")
    assert supported_pipelines("vllm_omni") == (
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "QwenImagePipeline",
        "WanPipeline",
    )
    assert load_adapter("StableDiffusion3Pipeline", "diffusers").__name__ == "SD3DiffusersAdapter"
