"""Per-call sampling params of the diffusion agent loop: training defaults and validation overrides."""

import pytest
from omegaconf import OmegaConf

from verl_omni.agent_loop.sampling import SAMPLING_KEYS, sampling_params


def _rollout(**diffusion_val):
    return OmegaConf.create(
        {"diffusion": {"num_inference_steps": 8, "noise_level": 0.7, "height": 64}, "diffusion_val": diffusion_val}
    )


def test_training_params_come_from_the_diffusion_section():
    params = sampling_params(_rollout(num_inference_steps=40), validate=False)
    assert params["num_inference_steps"] == 8 and params["noise_level"] == 0.7 and params["height"] == 64
    assert "seed" not in params  # each request adds its own row seed
    assert set(params) <= set(SAMPLING_KEYS)
    assert "sde_window" not in params  # null values are left to the replica's defaults


def test_validation_overrides_apply_only_when_validating():
    params = sampling_params(_rollout(num_inference_steps=40, noise_level=0.0), validate=True)
    assert params["num_inference_steps"] == 40 and params["noise_level"] == 0.0 and params["height"] == 64


def test_unknown_validation_key_is_named():
    with pytest.raises(ValueError, match=r"diffusion_val has unknown key\(s\) \['steps'\]"):
        sampling_params(_rollout(steps=40), validate=True)
