"""Coefficients-preserving sampling (``rollout.diffusion.sde_type: cps``): its step, log-prob and noise schedule
against closed forms (float64), the authors' formulas, and the sampler-trainer round trip."""

from __future__ import annotations

import math

import pytest
import torch

from verl_omni.pipelines.flow_match_sde import (
    cps_std,
    cps_step_with_logprob,
    ode_step,
    sample_sde_trajectory,
    sde_step,
    sde_step_with_logprob,
)
from verl_omni.trainer.flowgrpo.loss import kl_std


def _inputs(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(batch, 2, 3, 3, generator=g, dtype=torch.float64)
    return x, v


def test_mean_and_std_are_the_papers_closed_form():
    x, v = _inputs()
    s, s_next, a = 0.8, 0.55, 0.8
    out = cps_step_with_logprob(v, x, s, s_next, a, noise=torch.zeros_like(x))
    sigma_t = s_next * math.sin(a * math.pi / 2)  # the authors' std_dev_t
    x0, x1 = x - s * v, x + (1 - s) * v  # their predicted x_0 and x_1
    mean = x0 * (1 - s_next) + x1 * math.sqrt(s_next**2 - sigma_t**2)
    torch.testing.assert_close(out.prev_sample_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.std_dev.flatten().double(), torch.full((3,), sigma_t, dtype=torch.float64))
    torch.testing.assert_close(out.prev_sample, out.prev_sample_mean)  # zero noise


def test_the_noise_coefficient_is_preserved():
    # on an exact flow-matching point with the exact velocity, the mean holds (1 - s') x0 and s' cos(a pi/2) eps:
    # with the fresh noise's s' sin(a pi/2), the noise's total coefficient is s' at every noise level
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 16, generator=g, dtype=torch.float64), torch.randn(2, 16, generator=g, dtype=torch.float64)
    s, s_next = 0.9, 0.4
    for a in (0.3, 0.8, 1.0):
        out = cps_step_with_logprob(eps - x0, (1 - s) * x0 + s * eps, s, s_next, a, noise=torch.zeros(2, 16))
        expected = (1 - s_next) * x0 + s_next * math.cos(a * math.pi / 2) * eps
        torch.testing.assert_close(out.prev_sample_mean.double(), expected, rtol=1e-6, atol=1e-6)
        assert math.cos(a * math.pi / 2) ** 2 + (float(out.std_dev.flatten()[0]) / s_next) ** 2 == pytest.approx(1.0)


def test_log_prob_is_the_gaussian_density_and_its_ratio_relates_to_the_authors_surrogate():
    x, v = _inputs()
    s, s_next, a = 0.7, 0.5, 0.8
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = cps_step_with_logprob(v, x, s, s_next, a, noise=noise)
    std = s_next * math.sin(a * math.pi / 2)
    mean, xn = out.prev_sample_mean.double(), out.prev_sample.double()
    density = -((xn - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob.double(), density.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # another policy's velocity scores the same x_next: the authors keep -(x_next - mean)^2 only, so their
    # log-ratio is 2 std^2 times the exact one
    other = cps_step_with_logprob(v + 0.1, x, s, s_next, a, prev_sample=out.prev_sample)
    surrogate = (-((xn - other.prev_sample_mean.double()) ** 2) + (xn - mean) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(2 * std**2 * (other.log_prob - out.log_prob).double(), surrogate, rtol=1e-3, atol=1e-6)


def test_noise_level_zero_is_the_ode_step():
    x, v = _inputs()
    out = cps_step_with_logprob(v, x, 0.6, 0.3, 0.0, noise=torch.randn(x.shape, dtype=torch.float64))
    torch.testing.assert_close(out.prev_sample, ode_step(v, x, 0.6, 0.3), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_the_last_step_is_deterministic_with_finite_gradients():
    x, v = _inputs()
    v = v.float().requires_grad_(True)
    out = cps_step_with_logprob(v, x.float(), 0.2, 0.0, 0.8, prev_sample=x.float())
    assert torch.equal(out.log_prob, torch.zeros(3)) and torch.equal(out.std_dev, torch.zeros(3, 1, 1, 1))
    (out.log_prob.sum() + out.prev_sample_mean.sum()).backward()
    assert torch.isfinite(v.grad).all()


def test_sde_type_picks_the_step_and_an_unknown_one_names_the_choices():
    assert sde_step("sde") is sde_step_with_logprob and sde_step("cps") is cps_step_with_logprob
    with pytest.raises(ValueError, match=r"sde_type='ddim' is not valid; valid choices: sde, cps"):
        sde_step("ddim")


def test_kl_divides_by_the_cps_transition_std_in_both_forms():
    sigmas, sigmas_next = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.25])
    for form in ("reference", "transition"):
        torch.testing.assert_close(kl_std(form, sigmas, sigmas_next, 0.8, "cps"), cps_std(sigmas_next, 0.8))
    assert not torch.equal(kl_std("reference", sigmas, sigmas_next, 0.8), cps_std(sigmas_next, 0.8))


def test_sampler_records_cps_log_probs_the_trainer_recomputes_bit_for_bit():
    weight = torch.randn(2, 2, generator=torch.Generator().manual_seed(0)) * 0.1

    def velocity(x, sigma, cond):
        return torch.einsum("ij,bjhw->bihw", weight, x) + cond[:, :, None, None] * sigma

    sigmas = torch.linspace(1.0, 0.0, 6)
    cond = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(5)]
    traj = sample_sde_trajectory(
        velocity, sigmas, [cond], gens, (2, 4, 4), noise_level=0.8, sde_window=[1, 4], chunk_size=4, sde_type="cps"
    )
    assert traj.log_probs.shape == (5, 3) and traj.step_indices.tolist() == [1, 2, 3]
    for t in range(3):
        rows = [torch.arange(0, 4), torch.arange(4, 5)]  # the sampler's chunks of 4 (the last one padded)
        for idx in rows:
            x = traj.latents[idx, t]
            v = velocity(x, traj.sigmas[t], cond[idx]) if len(idx) == 4 else None
            if v is None:  # the padded chunk: recompute at the sampler's shape
                pad = torch.cat([x, x[-1:].expand(3, -1, -1, -1)])
                v = velocity(pad, traj.sigmas[t], torch.cat([cond[idx], cond[idx][-1:].expand(3, -1)]))[:1]
            out = sde_step("cps")(v, x, traj.sigmas[t], traj.sigmas[t + 1], 0.8, prev_sample=traj.latents[idx, t + 1])
            assert torch.equal(out.log_prob, traj.log_probs[idx, t])
