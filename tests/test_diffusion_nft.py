"""DiffusionNFT (algorithm.name=diffusion_nft) against closed forms, in float64 on small tensors: the optimality
probability, the old policy's decay schedule and soft update, the loss in its velocity form and its gradient at
theta = old, the KL term, the deterministic recorded step, and the settings refused before Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pipeline_dirs import write_json_pipeline
from test_recipe_cli import assert_refused

from verl_omni.pipelines.flow_match_sde import (
    cps_step_with_logprob,
    ode_step,
    ode_step_with_logprob,
    sample_sde_trajectory,
    sde_step,
)
from verl_omni.trainer.flowgrpo.nft import draw_timesteps, nft_loss, old_policy_decay, optimality_probability
from verl_omni.workers.config.algorithm import AlgorithmConfig, check_nft_guidance, check_nft_settings
from verl_omni.workers.config.schema import ConfigError
from verl_omni.workers.ema import OldPolicyWeights

F64 = torch.float64


def test_optimality_probability_is_the_papers_clipped_map_and_the_authors_formula():
    advantages = torch.tensor([-12.0, -5.0, -2.5, -0.1, 0.0, 1.0, 5.0, 7.0], dtype=F64)
    r = optimality_probability(advantages, 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.49, 0.5, 0.6, 1.0, 1.0], dtype=F64))
    # the authors' code: clamp(clip(A, -5, 5) / 5 / 2 + 0.5, 0, 1)
    authors = torch.clamp(torch.clamp(advantages, -5, 5) / 5 / 2 + 0.5, 0, 1)
    torch.testing.assert_close(r, authors)
    with pytest.raises(ValueError, match="reward_norm must be > 0"):
        optimality_probability(advantages, 0.0)


@pytest.mark.parametrize(
    ("flat", "rate", "maximum", "expected"),
    [
        (0, 0.0, 0.0, {0: 0.0, 500: 0.0}),  # the authors' decay_type 0: the old policy is the trained one
        (0, 0.001, 0.5, {0: 0.0, 1: 0.001, 100: 0.1, 500: 0.5, 2000: 0.5}),  # type 1, their default
        (75, 0.0075, 0.999, {0: 0.0, 74: 0.0, 75: 0.0, 175: 0.75, 208: 0.9975, 209: 0.999, 10_000: 0.999}),  # 2: OCR
    ],
)
def test_old_policy_decay_follows_the_authors_schedules(flat, rate, maximum, expected):
    for step, decay in expected.items():
        assert old_policy_decay(step, flat, rate, maximum) == pytest.approx(decay, abs=1e-12)


def test_old_policy_soft_update_and_swap():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    old = OldPolicyWeights([("w", param)])
    with torch.no_grad():
        param.copy_(torch.tensor([3.0, 6.0], dtype=F64))
    old.soft_update(0.25)  # 0.25 old + 0.75 theta
    torch.testing.assert_close(old.shadow[0], torch.tensor([2.5, 5.0], dtype=F64))
    with old.swapped_in():
        torch.testing.assert_close(param.detach(), torch.tensor([2.5, 5.0], dtype=F64))
    torch.testing.assert_close(param.detach(), torch.tensor([3.0, 6.0], dtype=F64))
    old.soft_update(0.0)  # exactly the trained weights
    assert torch.equal(old.shadow[0], param.detach()) and old.steps == 2
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        old.soft_update(1.0)


def _case(batch: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 2, 3, 3)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64) * 0.9 + 0.05
    tt = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    v_old = (eps - x0) + 0.3 * torch.randn(shape, generator=g, dtype=F64)
    v_theta = v_old + 0.1 * torch.randn(shape, generator=g, dtype=F64)
    r = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=F64)[:batch]
    return x0, eps, t, tt, x_t, v_old, v_theta, r


def _velocity_form(x0, eps, tt, v_old, v_theta, r, beta, z):
    """The loss written on velocities: target eps - x0; each term's error in data space is t (v - target)."""
    target = eps - x0
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    dims = (1, 2, 3)

    def term(v):
        err = tt * (v - target)
        return err.pow(2).mean(dims) / err.abs().mean(dims).clamp(min=1e-5)

    return z * ((r * term(v_pos) + (1 - r) * term(v_neg)) / beta).mean()


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.5])
def test_loss_equals_its_velocity_form(beta):
    x0, eps, t, tt, x_t, v_old, v_theta, r = _case()
    x0_theta, x0_old = x_t - tt * v_theta, x_t - tt * v_old
    loss, metrics, rows = nft_loss(x0_theta, x0_old, x0, t, r, beta=beta, reward_norm=5.0)
    torch.testing.assert_close(loss, _velocity_form(x0, eps, tt, v_old, v_theta, r, beta, 5.0), rtol=1e-12, atol=0)
    assert metrics["kl"] == 0.0 and metrics["r_abs_dev"] == pytest.approx(float((r - 0.5).abs().mean()))
    dev = v_theta - v_old  # what the metrics report: the trained velocity's distance from the old one
    torch.testing.assert_close(rows["old_dev_max"], dev.abs().amax(dim=(1, 2, 3)))
    torch.testing.assert_close(rows["old_dev_sq"], dev.pow(2).mean(dim=(1, 2, 3)))


def test_at_theta_equal_old_the_gradient_is_2r_minus_1_times_flow_matching():
    # with v_theta = v_old both implicit policies are v_old and their adaptive weights are equal (w): the gradient
    # w.r.t. x0_theta is Z / B * (2 r - 1) * 2 (x0_old - x0) / (D w): good samples (r > 1/2) pull the estimate towards
    # themselves, bad ones push it away, a sample at the group mean (r = 1/2) gives none
    x0, eps, t, tt, x_t, v_old, _, r = _case()
    x0_old = x_t - tt * v_old
    x0_theta = x0_old.clone().requires_grad_(True)
    loss, _, _ = nft_loss(x0_theta, x0_old, x0, t, r, beta=0.7, reward_norm=5.0)
    loss.backward()
    err = x0_old - x0
    w = err.abs().mean(dim=(1, 2, 3), keepdim=True)
    batch, dims = x0.shape[0], err[0].numel()
    expected = 5.0 / batch * (2 * r - 1).reshape(-1, 1, 1, 1) * 2 * err / (dims * w)
    torch.testing.assert_close(x0_theta.grad, expected, rtol=1e-10, atol=1e-14)
    assert x0_theta.grad[2].abs().max() < 1e-15  # r = 1/2: none (rounding of the mixtures aside)


def test_kl_term_is_the_velocity_mse_to_the_reference():
    x0, _, t, tt, x_t, v_old, v_theta, r = _case()
    v_ref = v_old - 0.2
    x0_theta, x0_old, x0_ref = x_t - tt * v_theta, x_t - tt * v_old, x_t - tt * v_ref
    plain, _, _ = nft_loss(x0_theta, x0_old, x0, t, r, beta=1.0, reward_norm=5.0)
    with_kl, metrics, _ = nft_loss(x0_theta, x0_old, x0, t, r, beta=1.0, reward_norm=5.0, x0_ref=x0_ref, kl_coef=1e-2)
    kl = (v_theta - v_ref).pow(2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(with_kl - plain, 1e-2 * kl, rtol=1e-10, atol=1e-14)
    assert metrics["kl"] == pytest.approx(float(kl), rel=1e-10)


def test_loss_refuses_bad_shapes_and_beta():
    x0, _, t, _, _, _, _, r = _case()
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_loss(x0, x0, x0, t, r, beta=0.0, reward_norm=5.0)
    with pytest.raises(ValueError, match="must have shape"):
        nft_loss(x0, x0, x0, t[:2], r, beta=1.0, reward_norm=5.0)


def test_draw_timesteps_gives_distinct_levels_per_row_reproducibly():
    a = draw_timesteps(6, 8, 7, torch.Generator().manual_seed(3))
    b = draw_timesteps(6, 8, 7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (6, 7)
    assert all(len(set(row.tolist())) == 7 and max(row) < 8 for row in a)
    with pytest.raises(ValueError, match=r"count must be in \[1, 8\]"):
        draw_timesteps(2, 8, 9, torch.Generator())


def test_ode_step_is_euler_with_log_prob_zero_and_records_the_whole_trajectory():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    out = ode_step_with_logprob(v, x, 0.6, 0.4, 0.7, noise=torch.randn(3, 2, 4, 4, generator=g))
    assert torch.equal(out.prev_sample, ode_step(v, x, 0.6, 0.4)) and torch.equal(out.log_prob, torch.zeros(3))
    assert sde_step("ode") is ode_step_with_logprob and torch.equal(out.std_dev, torch.zeros(3, 1, 1, 1))
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    cond = torch.zeros(2, 1)

    def velocity(x, sigma, c):
        return 0.5 * x + sigma

    def run(sde_type, window, noise_level):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return sample_sde_trajectory(velocity, sigmas, [cond], gens, (2, 2), noise_level, window, sde_type=sde_type)

    ode, plain = run("ode", [0, 4], 0.7), run("cps", None, 0.0)  # cps at noise level 0 is the ODE, recording nothing
    assert torch.equal(ode.final_latents, plain.final_latents) and plain.latents.shape[1] == 0
    assert ode.latents.shape == (2, 5, 2, 2) and torch.equal(ode.latents[:, -1], ode.final_latents)
    assert torch.equal(ode.sigmas, sigmas) and torch.equal(ode.log_probs, torch.zeros(2, 4))


def test_cps_step_to_zero_gives_the_data_estimate_exactly():
    # the actor's x0 estimate of any family: its trainer binding with a CPS step to s_next = 0
    g = torch.Generator().manual_seed(2)
    x_t, v = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.9, 0.5, 0.2, 1.0])
    for noise_level in (0.0, 0.7, 1.0):
        out = cps_step_with_logprob(v, x_t, t, torch.zeros(4), noise_level, prev_sample=x_t)
        assert torch.equal(out.prev_sample_mean, x_t - t.reshape(-1, 1, 1, 1) * v)


def test_zero_advantage_rows_are_kept_by_default_only_for_nft():
    assert AlgorithmConfig.from_config({"name": "diffusion_nft"}).drops_zero_advantage is False
    assert AlgorithmConfig.from_config({"name": "flow_grpo"}).drops_zero_advantage is True
    given = {"name": "diffusion_nft", "drop_zero_advantage": True}
    assert AlgorithmConfig.from_config(given).drops_zero_advantage is True


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: check_nft_settings("diffusion_nft", "one_step_off", False, None),
            "trainer.rollout_mode='one_step_off' with algorithm.name='diffusion_nft': one_step_off corrects the lag "
            "of its samples with log-prob ratios",
        ),
        (
            lambda: check_nft_settings("diffusion_nft", "sync", True, None),
            "actor_rollout_ref.actor.recompute_old_log_prob=True with algorithm.name='diffusion_nft'",
        ),
        (
            lambda: check_nft_settings("diffusion_nft", "sync", False, [0, 2]),
            "actor_rollout_ref.rollout.diffusion.sde_window=[0, 2] with algorithm.name='diffusion_nft'",
        ),
        (
            lambda: check_nft_guidance("diffusion_nft", 4.5, True),
            "actor_rollout_ref.rollout.diffusion.guidance_scale=4.5 with algorithm.name='diffusion_nft': DiffusionNFT "
            "is CFG-free",
        ),
        (
            lambda: AlgorithmConfig.from_config({"name": "grpo_guard", "nft": {"beta": 0.1}}),
            "algorithm.nft.beta=0.1 is an option of algorithm.name='diffusion_nft', but algorithm.name='grpo_guard'",
        ),
        (
            lambda: AlgorithmConfig.from_config({"name": "diffusion_nft", "nft": {"old_decay_max": 1.0}}),
            "algorithm.nft.old_decay_max=1.0 is outside the valid range [0, 1)",
        ),
    ],
)
def test_bad_nft_settings_name_key_value_and_choices(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value).startswith(message), str(err.value)
    assert "valid" in str(err.value)


def test_allowed_nft_settings_pass():
    check_nft_settings("diffusion_nft", "sync", False, None)
    check_nft_guidance("diffusion_nft", 3.5, False)  # FLUX.1's embedded guidance is no CFG
    check_nft_settings("flow_grpo", "one_step_off", True, [0, 2])  # other algorithms: not this rule's business


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.rollout_mode=one_step_off",
            "trainer.rollout_mode='one_step_off' with algorithm.name='diffusion_nft'",
        ),
        (
            "actor_rollout_ref.rollout.diffusion.guidance_scale=4.5",
            "actor_rollout_ref.rollout.diffusion.guidance_scale=4.5 with algorithm.name='diffusion_nft'",
        ),
    ],
)
def test_recipe_refuses_nft_settings_before_ray(override: str, message: str, tmp_path: Path) -> None:
    model = write_json_pipeline(tmp_path / "model")
    args = [
        "algorithm.name=diffusion_nft",
        override,
        f"actor_rollout_ref.model.path={model}",
        f"trainer.default_local_dir={tmp_path / 'run'}",
    ]
    assert_refused(args, "config error: " + message, tmp_path / "run")


def test_sigma_one_estimate_is_finite():
    # t = 1 (the schedule's first level): x_t is pure noise and the estimate x_t - v is finite; the loss divides by t
    # only in its metrics and KL, never at t = 0 (the schedule's final 0 is not drawn)
    x0, _, _, _, _, v_old, v_theta, r = _case()
    eps = torch.randn_like(x0)
    t = torch.ones(x0.shape[0], dtype=F64)
    loss, _, rows = nft_loss(eps - v_theta, eps - v_old, x0, t, r, beta=1.0, reward_norm=5.0)
    assert math.isfinite(float(loss)) and torch.isfinite(rows["old_dev_max"]).all()
