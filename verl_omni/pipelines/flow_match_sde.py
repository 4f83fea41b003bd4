"""Flow-matching SDE sampling with per-step log-probabilities (FlowGRPO), shared by every model and backend.

One step function per ``sde_type`` (:data:`SDE_STEPS`: FlowGRPO's SDE step :func:`sde_step_with_logprob`, CPS's
:func:`cps_step_with_logprob`) and the one sampling loop (:func:`sample_sde_trajectory`)
live here; what is specific to a model (its conditioning, how its transformer is called, CFG) lives in
``verl_omni.pipelines.<model>``. Rollout engines sample through the model's binding of the loop; the trainer
recomputes log-probs of the stored transitions with the model's ``compute_log_prob``, which calls the same
step on the same velocity, so at the first inner step (same weights) the recomputed log-prob equals the
stored one. Math and notation: ``shared/FLOWGRPO.md``.

Conventions (diffusers' ``FlowMatchEulerDiscreteScheduler``): noise level ``s`` runs from 1 (noise)
to 0 (data), the transformer's timestep input is ``s * 1000``, latents are float32 and the
transformer runs in its own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from verl_omni.pipelines.sde_window import resolve_sde_window
from verl_omni.utils.batch_invariant import map_chunks

TIMESTEP_SCALE = 1000.0  # SD3's num_train_timesteps: the transformer's timestep input is sigma * 1000
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class SDEStepOutput:
    """One SDE transition ``x_s -> x_next`` and its Gaussian density.

    Attributes:
        prev_sample: ``x_next`` (B, ...).
        log_prob: ``log p(x_next | x_s)`` averaged over all non-batch dims (B,).
        prev_sample_mean: the transition mean (B, ...); the KL term compares these.
        std_dev: the transition standard deviation ``std * sqrt(-dt)``, shaped (B, 1, ..., 1).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std_dev: torch.Tensor


@dataclass
class SDETrajectory:
    """What :func:`sample_sde_trajectory` records for a batch of B samples and T SDE steps.

    The recorded steps are consecutive in the schedule, so step ``t`` moves ``latents[:, t]`` to
    ``latents[:, t + 1]`` at noise levels ``sigmas[t] -> sigmas[t + 1]``.

    Attributes:
        final_latents: (B, *latent_shape) denoised latents (before VAE decoding).
        latents: (B, T + 1, *latent_shape) ``x`` before every SDE step, then after the last (T = 0: empty).
        log_probs: (B, T) log-prob of every SDE step under the sampling policy.
        noise: (B, T, *latent_shape) the standard-normal draw of every SDE step: ``latents[:, t + 1]`` is step
            ``t``'s mean plus its std times ``noise[:, t]``. The trainer re-centres a stale transition with it
            (``actor.recentre_stale``).
        sigmas: (T + 1,) the noise levels of ``latents`` (shared by the batch; T = 0: empty).
        step_indices: (T,) the indices of the SDE steps in the full schedule.
    """

    final_latents: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    step_indices: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as float32 shaped (B, 1, ..., 1) to broadcast against ``like``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(like.shape[0], *([1] * (like.ndim - 1)))


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """FlowGRPO's diffusion coefficient ``a * sqrt(s / (1 - s))``.

    At ``s == 1`` (first step of a schedule) ``1 - s`` is replaced by ``1 - s_next`` (the second sigma
    of the schedule), as in the reference implementation, to avoid dividing by zero.
    """
    denom_sigma = torch.where(sigma >= 1.0, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denom_sigma))


def ode_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """Deterministic Euler step ``x + v * (s_next - s)``, as ``FlowMatchEulerDiscreteScheduler.step``."""
    sample = sample.float()
    dt = _per_sample(sigma_next, sample) - _per_sample(sigma, sample)
    return sample + dt * model_output.float()


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> SDEStepOutput:
    """One FlowGRPO SDE step ``x_s -> x_next`` with the log-density of the transition.

    Args:
        model_output: predicted velocity ``v`` (B, ...), guidance already applied.
        sample: ``x_s`` (B, ...).
        sigma, sigma_next: noise levels ``s`` and ``s_next < s`` (scalars or (B,)).
        noise_level: ``a`` in FLOWGRPO.md (paper: 0.7). With 0 the step is the ODE Euler step and its
            ``log_prob`` is 0 (a deterministic step has no density; 0 keeps policy ratios at 1).
        prev_sample: an observed ``x_next`` to score (trainer); when None one is sampled.
        noise: the standard normal draw to use when sampling; otherwise drawn from ``generator``
            (one generator per sample gives per-sample reproducibility).

    Returns:
        :class:`SDEStepOutput`; all tensors float32.
    """
    sample = sample.float()
    v = model_output.float()
    s = _per_sample(sigma, sample)
    s_next = _per_sample(sigma_next, sample)
    dt = s_next - s
    std = sde_std(s, s_next, noise_level)
    mean = sample * (1.0 + std**2 / (2.0 * s) * dt) + v * (1.0 + std**2 * (1.0 - s) / (2.0 * s)) * dt
    std_dev = std * torch.sqrt(-dt)

    if prev_sample is None:
        if noise is None:
            noise = standard_normal(sample.shape, generator, sample.device)
        prev_sample = mean + std_dev * noise.float()
    prev_sample = prev_sample.float()

    if noise_level == 0:
        log_prob = torch.zeros(sample.shape[0], dtype=torch.float32, device=sample.device)
    else:
        log_prob = -((prev_sample.detach() - mean) ** 2) / (2.0 * std_dev**2) - torch.log(std_dev) - _LOG_SQRT_2PI
        log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return SDEStepOutput(prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=mean, std_dev=std_dev)


def score_transitions(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    sigmas: torch.Tensor,
    sigmas_next: torch.Tensor,
    noise_level: float,
    sde_type: str = "sde",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trainer's half of every family's ``compute_log_prob``: ``(log_prob, prev_sample_mean, std_dev)`` of the
    stored transitions ``latents -> next_latents`` under the step of ``sde_type``, given the policy's velocity.

    ``noise``: re-centre instead (``actor.recentre_stale``): score ``mean.detach() + std_dev * noise``, the sample
    this policy would have drawn from the same state with the sampler's own draw. A stale transition's score then
    carries no ``(mu_old - mu_theta) / std^2`` part (its gradient is ``noise / std_dev`` times the mean's), and its
    log-prob equals the sampler's up to rounding at any weights. ``next_latents`` is then only the caller's.
    """
    step = sde_step(sde_type)
    if noise is None:
        out = step(velocity, latents, sigmas, sigmas_next, noise_level, prev_sample=next_latents)
    else:
        out = step(velocity, latents, sigmas, sigmas_next, noise_level, noise=noise)
    return out.log_prob, out.prev_sample_mean, out.std_dev


def cps_std(sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """CPS's transition standard deviation ``s_next * sin(a * pi / 2)``: 0 at the last step (``s_next == 0``)."""
    return sigma_next * math.sin(noise_level * math.pi / 2.0)


def cps_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> SDEStepOutput:
    """One coefficients-preserving sampling (CPS, Wang & Yu 2025) step ``x_s -> x_next`` with its log-density.

    The velocity gives the model's data and noise estimates ``x0 = x - s v`` and ``x1 = x + (1 - s) v``; the step
    re-noises ``x0`` to level ``s_next`` keeping the flow-matching coefficients: ``x_next = (1 - s_next) x0 +
    s_next cos(a pi/2) x1 + s_next sin(a pi/2) z``, so the noise's total coefficient is ``s_next`` (``cos^2 + sin^2
    = 1``) at any noise level ``a`` (``noise_level``; the authors' Fast configs: 0.8). ``a == 0`` is the ODE
    (DDIM) step. The transition is Gaussian with that mean and std ``s_next sin(a pi/2)``; ``log_prob`` is its
    exact log-density averaged over the non-batch dims (the authors' code keeps only ``-(x_next - mean)^2``, whose
    log-ratio is ``2 std^2`` times this one's). A step to ``s_next == 0`` is deterministic: ``log_prob`` 0.

    Arguments and returns as :func:`sde_step_with_logprob`.
    """
    sample = sample.float()
    v = model_output.float()
    s = _per_sample(sigma, sample)
    s_next = _per_sample(sigma_next, sample)
    std_dev = cps_std(s_next, noise_level)
    x0 = sample - s * v
    x1 = sample + (1.0 - s) * v
    mean = x0 * (1.0 - s_next) + x1 * (s_next * math.cos(noise_level * math.pi / 2.0))

    if prev_sample is None:
        if noise is None:
            noise = standard_normal(sample.shape, generator, sample.device)
        prev_sample = mean + std_dev * noise.float()
    prev_sample = prev_sample.float()

    noisy = std_dev > 0
    safe_std = torch.where(noisy, std_dev, torch.ones_like(std_dev))  # no division by 0 (nor NaN gradients)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_prob = torch.where(noisy, log_prob, torch.zeros_like(log_prob))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return SDEStepOutput(prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=mean, std_dev=std_dev)


def ode_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> SDEStepOutput:
    """The deterministic Euler step (:func:`ode_step`) in a step's signature, recorded with log-prob 0 and std 0:
    no density is computed and ``noise`` / ``noise_level`` are ignored. A request with ``sde_type='ode'`` records
    its whole deterministic trajectory, the clean sample and the schedule, for a forward-process algorithm
    (DiffusionNFT) that needs those and no log-probs; never a training step of the GRPO algorithms (which the
    config's ``diffusion.sde_type`` does not offer)."""
    mean = ode_step(model_output, sample, sigma, sigma_next)
    zeros = torch.zeros(sample.shape[0], dtype=torch.float32, device=sample.device)
    return SDEStepOutput(
        prev_sample=mean if prev_sample is None else prev_sample.float(),
        log_prob=zeros,
        prev_sample_mean=mean,
        std_dev=torch.zeros_like(_per_sample(sigma, mean)),
    )


StepFn = Callable[..., SDEStepOutput]
SDE_STEPS: dict[str, StepFn] = {
    "sde": sde_step_with_logprob,
    "cps": cps_step_with_logprob,
    "ode": ode_step_with_logprob,
}
"""``sde_type`` -> its step (one signature): what the sampling loop and every trainer binding call. ``sde`` and
``cps`` are ``rollout.diffusion.sde_type``'s choices; ``ode`` only a request's (DiffusionNFT's rollout)."""


def sde_step(sde_type: str) -> StepFn:
    """The step function of ``sde_type`` (``sde``: FlowGRPO's SDE; ``cps``: coefficients-preserving sampling)."""
    if sde_type not in SDE_STEPS:
        raise ValueError(f"sde_type={sde_type!r} is not valid; valid choices: {', '.join(SDE_STEPS)}")
    return SDE_STEPS[sde_type]


def standard_normal(
    shape: torch.Size | Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device | str,
) -> torch.Tensor:
    """``N(0, I)`` of ``shape``; with a list of generators, row ``i`` is drawn from ``generator[i]``.

    Drawing each row from its own generator makes a sample's noise independent of the batch it is in.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=torch.float32) for g in generator]
    )


VelocityFn = Callable[..., torch.Tensor]
"""``velocity(x, sigma, *conditioning) -> v``: a model's (guided) velocity on a chunk of samples, float32."""


def _denoise_step(
    velocity: VelocityFn,
    x: torch.Tensor,
    *conditioning_and_noise: torch.Tensor | None,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    step: StepFn,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sampling step on a batch: ``(x_next, log_prob)``; an ODE step (log-prob None) when the noise is None."""
    *conditioning, noise = conditioning_and_noise
    v = velocity(x, sigma, *conditioning)
    if noise is None:
        return ode_step(v, x, sigma, sigma_next), None
    out = step(v, x, sigma, sigma_next, noise_level, noise=noise)
    return out.prev_sample, out.log_prob


BundleVelocityFn = Callable[
    [torch.Tensor, torch.Tensor, dict[str, torch.Tensor], "dict[str, torch.Tensor] | None"], torch.Tensor
]


def sample_with_bundles(
    velocity: BundleVelocityFn,
    fields: Sequence[str],
    conditioning: Mapping[str, torch.Tensor],
    negative_conditioning: Mapping[str, torch.Tensor] | None,
    sigmas: torch.Tensor,
    generators: Sequence[torch.Generator],
    latent_shape: Sequence[int],
    **options: Any,
) -> SDETrajectory:
    """:func:`sample_sde_trajectory` for a model whose velocity takes its conditioning as bundles (dicts of the
    model's ``fields``): ``velocity(x, sigma, positive, negative)``, ``negative`` None without CFG. The bundles'
    tensors travel as the loop's per-sample tensors, so they are chunked with the batch; ``options`` are the loop's
    (``noise_level``, ``sde_window``, ``chunk_size``, ``sde_type``)."""
    names = list(fields)
    negative = [None] * len(names) if negative_conditioning is None else [negative_conditioning[k] for k in names]

    def bound(x: torch.Tensor, sigma: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
        pos, neg = dict(zip(names, tensors[: len(names)], strict=True)), tensors[len(names) :]
        return velocity(x, sigma, pos, None if neg[0] is None else dict(zip(names, neg, strict=True)))

    tensors = [*(conditioning[k] for k in names), *negative]
    return sample_sde_trajectory(bound, sigmas, tensors, generators, latent_shape, **options)


@torch.no_grad()
def sample_sde_trajectory(
    velocity: VelocityFn,
    sigmas: torch.Tensor,
    conditioning: Sequence[torch.Tensor | None],
    generators: Sequence[torch.Generator],
    latent_shape: Sequence[int],
    noise_level: float = 0.7,
    sde_window: Sequence[int] | None = None,
    chunk_size: int | None = None,
    sde_type: str = "sde",
) -> SDETrajectory:
    """Denoise a batch from pure noise over ``sigmas``, SDE steps inside the window and ODE steps outside.

    Model-agnostic: a model package (``verl_omni.pipelines.<model>``) supplies ``velocity`` and its per-sample
    ``conditioning`` tensors (the first one non-None; None entries, e.g. no CFG negative, pass through), so
    every model and backend samples with the same loop and the same SDE step the trainer recomputes.

    Each sample draws its initial latents and then its per-step noise from its own generator, in that
    order, so a sample's trajectory does not depend on the rest of the batch.

    Args:
        sigmas: (N + 1,) the scheduler's sigmas (decreasing, last one 0) for N inference steps.
        conditioning: (B, ...) tensors (or None) passed to ``velocity`` after ``(x, sigma)``, chunked with x.
        generators: one seeded ``torch.Generator`` per sample (on the latents' device).
        latent_shape: the shape of one sample's latents.
        sde_window: ``[start, end)`` step indices that are SDE steps; None: all. Steps in the window are
            recorded; with ``noise_level == 0`` every step is an ODE step and nothing is recorded.
        chunk_size: batch-invariant mode: every step (velocity call, SDE step and its log-prob) runs on
            exactly ``chunk_size`` samples, the last chunk padded, as the trainer's recomputation does
            (:mod:`verl_omni.utils.batch_invariant`); None: the whole batch in one call.
        sde_type: which stochastic step the window uses (:data:`SDE_STEPS`: ``sde`` or ``cps``).
    """
    transition = sde_step(sde_type)
    num_steps = int(sigmas.numel()) - 1
    if num_steps < 1:
        raise ValueError(f"sigmas must hold num_inference_steps + 1 >= 2 values, got {sigmas.numel()}")
    start, end = resolve_sde_window(num_steps, None if sde_window is None else list(sde_window))
    if noise_level == 0:
        start = end = 0
    device = conditioning[0].device
    batch = conditioning[0].shape[0]
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    x = standard_normal((batch, *latent_shape), list(generators), device)

    rec_x, rec_logp, rec_noise = [], [], []
    for i in range(num_steps):
        sde = start <= i < end
        # drawn for the whole batch, one generator per sample, then chunked with the rest of the step's inputs
        noise = standard_normal(x.shape, list(generators), device) if sde else None
        step = partial(
            _denoise_step, velocity, sigma=sigmas[i], sigma_next=sigmas[i + 1], noise_level=noise_level, step=transition
        )
        x_next, log_prob = map_chunks(step, [x, *conditioning, noise], chunk_size)
        if sde:
            rec_x.append(x)
            rec_logp.append(log_prob)
            rec_noise.append(noise)
        x = x_next
        if i + 1 == end and rec_x:
            rec_x.append(x)

    return SDETrajectory(
        final_latents=x,
        latents=torch.stack(rec_x, dim=1) if rec_x else torch.empty((batch, 0, *latent_shape), device=device),
        log_probs=torch.stack(rec_logp, dim=1) if rec_logp else torch.empty((batch, 0), device=device),
        noise=torch.stack(rec_noise, dim=1) if rec_noise else torch.empty((batch, 0, *latent_shape), device=device),
        sigmas=sigmas[start : end + 1].clone() if end > start else sigmas[:0].clone(),
        step_indices=torch.arange(start, end, device=device),
    )
