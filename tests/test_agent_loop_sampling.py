"""Per-call sampling params of the diffusion agent loop: the replica applies the defaults, validation overrides."""

import pytest
from omegaconf import OmegaConf

from verl_omni.agent_loop.sampling import sampling_params


def _rollout(**diffusion_val):
    return OmegaConf.create(
        {"diffusion": {"num_inference_steps": 8, "noise_level": 0.7, "height": 64}, "diffusion_val": diffusion_val}
    )


def test_training_sends_no_defaults():
    # the replica applies its rollout.diffusion defaults once; each request adds its own row seed
    assert sampling_params(_rollout(num_inference_steps=40), validate=False) == {}


def test_validation_sends_its_overrides_only():
    params = sampling_params(_rollout(num_inference_steps=40, noise_level=0.0, sde_window=None), validate=True)
    assert params == {"num_inference_steps": 40, "noise_level": 0.0}


def test_unknown_validation_key_is_named():
    with pytest.raises(ValueError, match=r"diffusion_val has unknown key\(s\) \['steps'\]"):
        sampling_params(_rollout(steps=40), validate=True)
