"""GRPO-Guard's ratio normalisation against closed forms: the plain per-step log-ratio of two Gaussian transitions
is biased below 0 and scaled by 1 / sigma; the normalised one is ``-mean(z d)``, zero-mean whatever the noise level."""

from __future__ import annotations

import math

import pytest
import torch

from verl_omni.pipelines.flow_match_sde import cps_step_with_logprob, sde_step_with_logprob
from verl_omni.trainer.flowgrpo.loss import guard_log_prob, per_step_ratio_metrics


def _transition(sigma: float, s: float = 0.6, s_next: float = 0.45, batch: int = 4, seed: int = 0):
    """Old and new SDE transitions of one x_s (velocities differ by a small d), x_next drawn under the old one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 4, 4, generator=g)
    v_old = torch.randn(batch, 2, 4, 4, generator=g)
    v_new = v_old + 0.05 * torch.randn(batch, 2, 4, 4, generator=g)
    z = torch.randn(batch, 2, 4, 4, generator=g)
    old = sde_step_with_logprob(v_old, x, s, s_next, sigma, noise=z)
    new = sde_step_with_logprob(v_new, x, s, s_next, sigma, prev_sample=old.prev_sample)
    return old, new, z


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_normalised_log_ratio_is_minus_mean_z_d(noise_level):
    old, new, z = _transition(noise_level)
    sigma = old.std_dev.flatten()
    d = (old.prev_sample_mean - new.prev_sample_mean).double()
    plain = (new.log_prob - old.log_prob).double()
    # the plain log-ratio's closed form: -mean(z d) / sigma - mean(d^2) / (2 sigma^2)
    expected_plain = -(z * d).mean(dim=(1, 2, 3)) / sigma - d.pow(2).mean(dim=(1, 2, 3)) / (2 * sigma**2)
    torch.testing.assert_close(plain, expected_plain.double(), rtol=1e-3, atol=1e-4)
    guarded = guard_log_prob(new.log_prob, old.log_prob, new.prev_sample_mean, old.prev_sample_mean, new.std_dev)
    torch.testing.assert_close((guarded - old.log_prob).double(), -(z * d).mean(dim=(1, 2, 3)), rtol=1e-3, atol=1e-5)


def test_the_plain_ratio_is_biased_low_and_the_normalised_one_is_not():
    # over many draws of x_next under the old policy: E[plain log-ratio] = -mean(d^2) / (2 sigma^2) < 0 (it grows
    # as sigma shrinks), E[normalised] = 0
    plain, guarded, bias = [], [], []
    for seed in range(200):
        old, new, _ = _transition(0.7, seed=seed, batch=1)
        plain.append(float(new.log_prob - old.log_prob))
        g = guard_log_prob(new.log_prob, old.log_prob, new.prev_sample_mean, old.prev_sample_mean, new.std_dev)
        guarded.append(float(g - old.log_prob))
        d = old.prev_sample_mean - new.prev_sample_mean
        bias.append(float(-d.pow(2).mean() / (2 * old.std_dev.flatten() ** 2)))
    spread = torch.tensor(guarded).std().item()
    assert sum(plain) / 200 < 0 and abs(sum(guarded) / 200) < 3 * spread / math.sqrt(200)
    assert sum(plain) / 200 == pytest.approx(sum(bias) / 200, rel=0.5)


def test_equal_weights_give_ratio_one_exactly():
    old, _, _ = _transition(0.7)
    guarded = guard_log_prob(old.log_prob, old.log_prob, old.prev_sample_mean, old.prev_sample_mean, old.std_dev)
    assert torch.equal(guarded, old.log_prob)


def test_gradient_flows_through_the_new_mean_and_a_deterministic_step_passes_through():
    old, new, _ = _transition(0.7)
    mean = new.prev_sample_mean.clone().requires_grad_(True)
    log_prob = new.log_prob.clone().requires_grad_(True)
    guard_log_prob(log_prob, old.log_prob, mean, old.prev_sample_mean, new.std_dev).sum().backward()
    assert torch.isfinite(mean.grad).all() and mean.grad.abs().sum() > 0
    torch.testing.assert_close(log_prob.grad, new.std_dev.flatten())  # d/d log_prob = sigma: the reweighting
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    last = cps_step_with_logprob(v, x, 0.2, 0.0, 0.8, prev_sample=x)  # std 0: log-prob 0, left as it is
    assert torch.equal(
        guard_log_prob(last.log_prob, last.log_prob, last.prev_sample_mean, x, last.std_dev), last.log_prob
    )


def test_per_step_ratio_metrics():
    log_ratios = {"ratio": [[torch.log(torch.tensor([1.0, 3.0]))], [torch.zeros(2), torch.zeros(1)]]}
    metrics = per_step_ratio_metrics(log_ratios)
    assert metrics["actor/ratio_mean_step0"] == pytest.approx(2.0) and metrics[
        "actor/ratio_std_step0"
    ] == pytest.approx(1.0)
    assert metrics["actor/ratio_mean_step1"] == 1.0 and metrics["actor/ratio_std_step1"] == 0.0
