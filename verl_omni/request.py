"""What a caller asks a rollout server for: one request's resolved sampling parameters, and the request.

The request half of the sample contract (:mod:`verl_omni.protocol` holds the answer, tensors and all). Torch-free,
so a process that only routes or checks requests stays light: Ray loads a server actor's module wherever its handle
is received (the balancer holds every replica's), and that module imports this one, not torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Field -> what it means; defaults come from DiffusionRolloutConfig (seed: a fresh random seed).
SAMPLING_FIELDS: dict[str, str] = {
    "seed": "int in [0, 2**63): seeds the request's own generator; same seed, same image alone or batched",
    "num_inference_steps": "int >= 1",
    "guidance_scale": "float >= 0; classifier-free guidance runs when > 1",
    "negative_prompt": "str: the CFG negative prompt",
    "noise_level": "float >= 0: SDE noise level (paper 0.7); 0 = ODE sampling, nothing recorded",
    "sde_window": "[start, end) step indices sampled as (recorded) SDE steps, or null for all steps",
    "sde_type": "the step of the window: sde (FlowGRPO), cps (coefficients-preserving sampling) or ode (deterministic, "
    "recorded with log-prob 0: DiffusionNFT)",
    "height": "int pixels, a multiple of vae_scale_factor * patch_size",
    "width": "int pixels, a multiple of vae_scale_factor * patch_size",
    "record_noise": "bool: also return each recorded step's standard-normal draw (Sample.noise), which the trainer "
    "re-centres a stale sample with (trainer.rollout_mode=one_step_off)",
    "num_frames": "int frames of a video family (k * temporal_scale_factor + 1), or null: the family's default",
}


@dataclass(frozen=True)
class SamplingParams:
    """Resolved, validated sampling parameters of one request."""

    seed: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str
    noise_level: float
    sde_window: tuple[int, int]
    height: int
    width: int
    sde_type: str = "sde"
    num_frames: int | None = None  # None: an image
    record_noise: bool = False  # what the reply carries, not how it is sampled: not in the batch key

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one denoising run (same shapes, schedule and math)."""
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            self.guidance_scale,
            self.noise_level,
            self.sde_window,
            self.sde_type,
            self.num_frames,
        )


@dataclass
class Request:
    """One admitted request: its caller id, prompt text and resolved sampling parameters."""

    request_id: str
    prompt: str
    params: SamplingParams
