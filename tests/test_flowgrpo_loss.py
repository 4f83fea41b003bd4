"""FlowGRPO clipped-ratio loss and transition KL against closed forms (signs checked by gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from verl_omni.trainer.flowgrpo.loss import flowgrpo_policy_loss, kl_std, transition_kl


def _loss(log_prob, old, adv, clip=0.2, **kw):
    log_prob = torch.tensor(log_prob, dtype=torch.float64, requires_grad=True)
    loss, metrics = flowgrpo_policy_loss(
        log_prob, torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64), clip, **kw
    )
    loss.backward()
    return loss, metrics, log_prob.grad


def test_on_policy_gradient_is_minus_advantage_over_batch():
    adv = [1.5, -0.5, 2.0, -3.0]
    loss, metrics, grad = _loss([-1.0, -2.0, 0.5, 0.0], [-1.0, -2.0, 0.5, 0.0], adv)
    # ratio == 1 everywhere: loss = mean(-A), d loss / d logp_i = -A_i / B.
    assert loss.item() == pytest.approx(-sum(adv) / 4)
    torch.testing.assert_close(grad, -torch.tensor(adv, dtype=torch.float64) / 4)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["clip_frac"] == 0.0 and metrics["approx_kl"] == 0.0 and metrics["kl"] == 0.0


def test_positive_advantage_above_clip_is_clipped_with_zero_gradient():
    r = 1.5  # above 1 + 0.2
    loss, metrics, grad = _loss([math.log(r)], [0.0], [2.0], clip=0.2)
    assert loss.item() == pytest.approx(-2.0 * 1.2)
    assert grad.item() == 0.0
    assert metrics["clip_frac"] == 1.0
    assert metrics["ratio_max"] == pytest.approx(r)


def test_positive_advantage_below_clip_keeps_gradient():
    r = 0.5  # below 1 - 0.2: max(-A r, -A 0.8) = -A r, the unclipped (pessimistic) term
    loss, _, grad = _loss([math.log(r)], [0.0], [2.0], clip=0.2)
    assert loss.item() == pytest.approx(-2.0 * r)
    assert grad.item() == pytest.approx(-2.0 * r)  # d(-A exp(logp - old))/d logp = -A r


def test_negative_advantage_below_clip_is_clipped_and_above_is_not():
    low, _, grad_low = _loss([math.log(0.5)], [0.0], [-1.0], clip=0.2)
    assert low.item() == pytest.approx(1.0 * 0.8) and grad_low.item() == 0.0
    high, _, grad_high = _loss([math.log(1.5)], [0.0], [-1.0], clip=0.2)
    assert high.item() == pytest.approx(1.5) and grad_high.item() == pytest.approx(1.5)


def test_metrics_closed_form():
    log_prob, old = [0.1, -0.3, 0.0], [0.0, 0.0, 0.0]
    _, metrics, _ = _loss(log_prob, old, [1.0, 1.0, 1.0], clip=0.2)
    ratios = [math.exp(x) for x in log_prob]
    assert metrics["approx_kl"] == pytest.approx(0.5 * (0.01 + 0.09) / 3)
    assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / 3)
    assert metrics["ratio_max"] == pytest.approx(max(ratios))
    assert metrics["clip_frac"] == pytest.approx(1 / 3)  # only exp(-0.3) = 0.74 is outside [0.8, 1.2]


def test_kl_term_closed_form_and_gradient():
    mean = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64).reshape(2, 1)
    kl = transition_kl(mean, ref, sigma)
    expected = torch.tensor([(1 + 4) / 2 / (2 * 0.25), (0 + 4) / 2 / (2 * 4.0)], dtype=torch.float64)
    torch.testing.assert_close(kl, expected)

    beta = 0.1
    log_prob = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, metrics = flowgrpo_policy_loss(log_prob, log_prob.detach(), adv, 0.2, mean, ref, sigma, beta=beta)
    loss.backward()
    assert loss.item() == pytest.approx(0.0 + beta * expected.mean().item())  # pg = mean(-A) = 0
    assert metrics["kl"] == pytest.approx(expected.mean().item())
    # d/d mean of beta * mean_b(mean_d((m - ref)^2) / (2 s_b^2)) = beta * (m - ref) / (B * D * s_b^2)
    grad_expected = beta * (mean.detach() - ref) / (2 * 2 * sigma**2)
    torch.testing.assert_close(mean.grad, grad_expected)


def test_beta_zero_reports_kl_without_adding_it():
    mean = torch.ones(2, 4, requires_grad=True)
    log_prob = torch.zeros(2, requires_grad=True)
    loss, metrics = flowgrpo_policy_loss(
        log_prob, torch.zeros(2), torch.tensor([1.0, 3.0]), 0.2, mean, torch.zeros(2, 4), torch.tensor(1.0)
    )
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert metrics["kl"] == pytest.approx(0.5)  # mean_d(1^2) / (2 * 1^2)
    assert mean.grad is None  # beta = 0: the KL is reported, never trained on


def test_bad_arguments():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="missing \\['prev_sample_mean', 'ref_prev_sample_mean', 'kl_std'\\]"):
        flowgrpo_policy_loss(z, z, z, 0.2, beta=0.1)
    with pytest.raises(ValueError, match="clip_range"):
        flowgrpo_policy_loss(z, z, z, 0.0)
    with pytest.raises(ValueError, match="share one 1-D shape"):
        flowgrpo_policy_loss(z, torch.zeros(3), z, 0.2)
    with pytest.raises(ValueError, match="kl_std"):
        transition_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


def test_kl_std_reference_has_no_dt_and_transition_is_the_exact_gaussian_scale():
    a = 0.7
    sigmas = torch.tensor([1.0, 0.8, 0.3])
    sigmas_next = torch.tensor([0.9, 0.6, 0.0])
    ref = kl_std("reference", sigmas, sigmas_next, a)
    # a * sqrt(s / (1 - s)), with 1 - s_next in the denominator at s == 1 (the reference's sigma_max)
    expected = torch.tensor([a * math.sqrt(1.0 / 0.1), a * math.sqrt(0.8 / 0.2), a * math.sqrt(0.3 / 0.7)])
    torch.testing.assert_close(ref, expected)
    transition = kl_std("transition", sigmas, sigmas_next, a)
    torch.testing.assert_close(transition, expected * torch.sqrt(sigmas - sigmas_next))
    # the same beta is 1 / |dt| stronger with the transition form
    mean, ref_mean = torch.ones(3, 4), torch.zeros(3, 4)
    ratio = transition_kl(mean, ref_mean, transition) / transition_kl(mean, ref_mean, ref)
    torch.testing.assert_close(ratio, 1.0 / (sigmas - sigmas_next))
    with pytest.raises(ValueError, match="kl_form='exact'.*reference, transition"):
        kl_std("exact", sigmas, sigmas_next, a)
