"""FlowGRPO SDE math (closed forms) and the sampler on the tiny SD3 transformer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from verl_omni.models.tiny_sd3 import build_tiny_sd3
from verl_omni.pipelines.flow_match_sde import (
    ode_step,
    score_transitions,
    sde_std,
    sde_step,
    sde_step_with_logprob,
    standard_normal,
)
from verl_omni.pipelines.sd3.sampling import compute_log_prob, sample_flow_match_sde
from verl_omni.pipelines.sde_window import resolve_sde_window


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    path = build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3", seed=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.requires_grad_(False)
    return pipe


def _cond(embeds, pooled):
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _encode(pipe, prompts, negative="", cfg=True):
    with torch.no_grad():
        return pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=cfg, negative_prompt=negative, max_sequence_length=16
        )


def _sigmas(pipe, steps):
    pipe.scheduler.set_timesteps(steps)
    return pipe.scheduler.sigmas.clone()


def test_log_prob_is_the_gaussian_density_averaged_over_dims():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    v = torch.randn(3, 4, 8, 8, generator=g)
    nxt = torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    sigma_next = torch.tensor([0.8, 0.3, 0.0])
    out = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7, prev_sample=nxt)

    # Closed form from FLOWGRPO.md, written out independently.
    s, sn = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    dt = sn - s
    std = 0.7 * torch.sqrt(s / (1 - s))
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * torch.sqrt(-dt)
    expected = torch.distributions.Normal(mean, scale).log_prob(nxt).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample_mean, mean)
    torch.testing.assert_close(out.std_dev, scale)
    assert torch.equal(out.prev_sample, nxt)


def test_first_step_std_uses_the_second_sigma():
    sigma, sigma_next = torch.tensor([1.0]), torch.tensor([0.96])
    assert torch.isfinite(sde_std(sigma, sigma_next, 0.7)).all()
    torch.testing.assert_close(sde_std(sigma, sigma_next, 0.7), torch.tensor([0.7 * math.sqrt(1.0 / (1 - 0.96))]))
    torch.testing.assert_close(sde_std(torch.tensor([0.5]), torch.tensor([0.4]), 0.7), torch.tensor([0.7]))


def test_sampled_step_is_mean_plus_scaled_noise_and_per_sample_generators():
    x = torch.randn(2, 4, 4, 4)
    v = torch.randn(2, 4, 4, 4)
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    out = sde_step_with_logprob(v, x, 0.6, 0.5, noise_level=0.7, generator=gens)
    noise = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    torch.testing.assert_close(out.prev_sample, out.prev_sample_mean + out.std_dev * noise)
    # Row i's noise depends only on generator i, not on the batch around it.
    alone = standard_normal((1, 4, 4, 4), [torch.Generator().manual_seed(12)], "cpu")
    assert torch.equal(alone[0], noise[1])


def test_noise_level_zero_is_the_ode_euler_step():
    x = torch.randn(2, 4, 8, 8)
    v = torch.randn(2, 4, 8, 8)
    out = sde_step_with_logprob(v, x, 0.7, 0.55, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    euler = x + v * (0.55 - 0.7)
    torch.testing.assert_close(out.prev_sample, euler)
    assert torch.equal(out.prev_sample, ode_step(v, x, 0.7, 0.55))
    assert torch.equal(out.log_prob, torch.zeros(2))


@pytest.mark.parametrize(
    ("window", "message"),
    [([3, 12], "outside the schedule"), ([5, 5], "outside the schedule"), ([-1, 2], "outside"), ("0:3", "two ints")],
)
def test_sde_window_outside_schedule_is_rejected(window, message):
    with pytest.raises(ValueError, match=message):
        resolve_sde_window(10, window)
    assert resolve_sde_window(10, None) == (0, 10)
    assert resolve_sde_window(10, [2, 5]) == (2, 5)


def test_recorded_log_probs_recompute_exactly_from_stored_latents_with_cfg(pipe):
    prompts = ["a photo of a cat", "a red car", "a dog"]
    pe, npe, pp, npp = _encode(pipe, prompts)
    sigmas = _sigmas(pipe, 6)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    traj = sample_flow_match_sde(
        pipe.transformer, sigmas, _cond(pe, pp), _cond(npe, npp), gens, (4, 8, 8), guidance_scale=4.5, noise_level=0.7
    )
    # a chain: x before each of the 6 steps, then after the last, at the schedule's noise levels
    assert traj.latents.shape == (3, 7, 4, 8, 8) and traj.log_probs.shape == (3, 6)
    assert torch.equal(traj.sigmas, sigmas)
    torch.testing.assert_close(traj.sigmas[:-1] * 1000, pipe.scheduler.timesteps)
    torch.testing.assert_close(traj.latents[:, -1], traj.final_latents, rtol=0, atol=0)

    # Same batch, same weights: the trainer's recomputation is bit-identical (on-policy ratio exactly 1).
    for t in range(6):
        logp, _, _ = compute_log_prob(
            pipe.transformer,
            traj.latents[:, t],
            traj.latents[:, t + 1],
            traj.sigmas[t].expand(3),
            traj.sigmas[t + 1].expand(3),
            _cond(pe, pp),
            _cond(npe, npp),
            guidance_scale=4.5,
            noise_level=0.7,
        )
        assert torch.equal(logp, traj.log_probs[:, t])

    # A trainer mini-batch mixes samples and steps: equal up to float rounding of the batched matmuls.
    rows, steps = torch.tensor([2, 0, 1, 2, 0]), torch.tensor([5, 0, 3, 1, 4])
    logp, mean, std = compute_log_prob(
        pipe.transformer,
        traj.latents[rows, steps],
        traj.latents[rows, steps + 1],
        traj.sigmas[steps],
        traj.sigmas[steps + 1],
        _cond(pe[rows], pp[rows]),
        _cond(npe[rows], npp[rows]),
        guidance_scale=4.5,
        noise_level=0.7,
    )
    torch.testing.assert_close(logp, traj.log_probs[rows, steps], rtol=0, atol=1e-4)
    assert mean.shape == (5, 4, 8, 8) and std.shape == (5, 1, 1, 1)


def test_compute_log_prob_has_gradients_for_the_trainer(pipe):
    pe, npe, pp, npp = _encode(pipe, ["a cat"])
    x = torch.randn(1, 4, 8, 8)
    pipe.transformer.requires_grad_(True)
    try:
        logp, _, _ = compute_log_prob(
            pipe.transformer,
            x,
            x * 0.9,
            torch.tensor([0.8]),
            torch.tensor([0.7]),
            _cond(pe, pp),
            _cond(npe, npp),
            4.5,
            0.7,
        )
        logp.sum().backward()
        grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    finally:
        pipe.transformer.zero_grad(set_to_none=True)
        pipe.transformer.requires_grad_(False)


def test_sde_window_records_only_window_steps(pipe):
    pe, _, pp, _ = _encode(pipe, ["a cat"], cfg=False)
    sigmas = _sigmas(pipe, 8)
    traj = sample_flow_match_sde(
        pipe.transformer, sigmas, _cond(pe, pp), None, [torch.Generator().manual_seed(0)], (4, 8, 8), sde_window=(2, 5)
    )
    assert traj.latents.shape == (1, 4, 4, 8, 8) and traj.log_probs.shape == (1, 3)
    assert traj.step_indices.tolist() == [2, 3, 4]
    assert torch.equal(traj.sigmas, sigmas[2:6])

    ode = sample_flow_match_sde(
        pipe.transformer, sigmas, _cond(pe, pp), None, [torch.Generator().manual_seed(0)], (4, 8, 8), noise_level=0.0
    )
    assert ode.latents.shape == (1, 0, 4, 8, 8) and ode.log_probs.shape == (1, 0) and ode.sigmas.shape == (0,)
    assert not torch.equal(ode.final_latents, traj.final_latents)  # the window's noise changed the sample


def test_ode_sampling_matches_the_stock_diffusers_pipeline(pipe):
    """noise_level=0 is plain SD3 sampling: same latents as StableDiffusion3Pipeline for the same seed."""
    pe, npe, pp, npp = _encode(pipe, ["a photo of a cat"], negative="blurry")
    sigmas = _sigmas(pipe, 5)
    ours = sample_flow_match_sde(
        pipe.transformer,
        sigmas,
        _cond(pe, pp),
        _cond(npe, npp),
        [torch.Generator().manual_seed(7)],
        (4, 8, 8),
        guidance_scale=3.0,
        noise_level=0.0,
    )
    stock = pipe(
        "a photo of a cat",
        negative_prompt="blurry",
        num_inference_steps=5,
        guidance_scale=3.0,
        height=64,
        width=64,
        max_sequence_length=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(7),
    ).images
    torch.testing.assert_close(ours.final_latents, stock, rtol=0, atol=1e-6)


class _ScaledByCondition(torch.nn.Module):
    """v = w * pooled[:, :1]: the velocity's derivative in w is the conditioning itself (closed form)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        return (self.w * pooled_projections[:, :1, None, None].expand_as(hidden_states),)


@pytest.mark.parametrize("detach_uncond", [True, False])
def test_cfg_gradient_flows_through_the_conditional_branch_only_when_detached(detach_uncond):
    from verl_omni.pipelines.sd3.conditioning import predict_velocity

    model, g = _ScaledByCondition(), 4.5
    x = torch.zeros(1, 1, 1, 1)
    pos, neg = torch.tensor([[2.0]]), torch.tensor([[3.0]])
    emb = torch.zeros(1, 1, 1)
    v = predict_velocity(model, x, 0.5, _cond(emb, pos), _cond(emb, neg), guidance_scale=g, detach_uncond=detach_uncond)
    # forward: v_neg + g (v_pos - v_neg), the same either way
    assert v.item() == pytest.approx(3.0 + g * (2.0 - 3.0))
    v.sum().backward()
    # d v / d w: g * pos (+ (1 - g) * neg when the unconditional branch is trained too)
    expected = g * 2.0 if detach_uncond else g * 2.0 + (1 - g) * 3.0
    assert model.w.grad.item() == pytest.approx(expected)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_a_recentred_transitions_score_has_no_stale_part(sde_type):
    """Re-centred on the current mean with the sampler's noise z, a transition's log-prob gradient is z / std_dev (per
    element, averaged) through the mean; scored as stored, a transition drawn around an older mean adds
    (mu_old - mu) / std_dev^2, the part every stale batch shares."""
    g = torch.Generator().manual_seed(3)
    x, v_old, z = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    v = (v_old + 0.5 * torch.randn(4, 4, 8, 8, generator=g)).requires_grad_(True)
    sigma, sigma_next = torch.full((4,), 0.8), torch.full((4,), 0.6)
    stored = sde_step(sde_type)(v_old, x, sigma, sigma_next, 0.7, noise=z)
    elements = z[0].numel()

    log_prob, mean, std_dev = score_transitions(v, x, stored.prev_sample, sigma, sigma_next, 0.7, sde_type, noise=z)
    (grad,) = torch.autograd.grad(log_prob.sum(), v, retain_graph=True)
    (expected,) = torch.autograd.grad((mean * (z / std_dev / elements)).sum(), v)
    torch.testing.assert_close(grad, expected)
    # at other weights the moved sample's log-prob is still the sampler's: the ratio is 1
    torch.testing.assert_close(log_prob.detach(), stored.log_prob, rtol=0, atol=1e-5)

    stale_log_prob, stale_mean, _ = score_transitions(v, x, stored.prev_sample, sigma, sigma_next, 0.7, sde_type)
    (stale_grad,) = torch.autograd.grad(stale_log_prob.sum(), v, retain_graph=True)
    stale_part = (stored.prev_sample_mean - stale_mean.detach()) / std_dev**2 / elements
    (expected_stale,) = torch.autograd.grad((stale_mean * (z / std_dev / elements + stale_part)).sum(), v)
    torch.testing.assert_close(stale_grad, expected_stale)
    assert (stale_grad - grad).abs().max() > 0.1 * grad.abs().max()


def test_the_sampler_records_each_steps_noise_and_recentring_reproduces_it(pipe):
    prompts = ["a photo of a cat", "a red car", "a dog"]
    pe, npe, pp, npp = _encode(pipe, prompts)
    sigmas = _sigmas(pipe, 4)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    cond, neg = _cond(pe, pp), _cond(npe, npp)
    traj = sample_flow_match_sde(pipe.transformer, sigmas, cond, neg, gens, (4, 8, 8), guidance_scale=4.5)
    assert traj.noise.shape == (3, 4, 4, 8, 8)

    def score(transformer, t, noise=None):
        s, s_next = traj.sigmas[t].expand(3), traj.sigmas[t + 1].expand(3)
        return compute_log_prob(
            transformer, traj.latents[:, t], traj.latents[:, t + 1], s, s_next, cond, neg, 4.5, 0.7, noise=noise
        )

    stale = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for t in range(4):
        log_prob, mean, std_dev = score(pipe.transformer, t, traj.noise[:, t])
        # same weights, same batch: the recorded step is exactly mean + std_dev * noise, its log-prob the stored one
        assert torch.equal(mean + std_dev * traj.noise[:, t], traj.latents[:, t + 1])
        assert torch.equal(log_prob, traj.log_probs[:, t])
        # other weights: scored as stored the ratio moves; re-centred it stays 1 up to rounding
        moved, _, _ = score(stale, t)
        assert (moved - traj.log_probs[:, t]).abs().max() > 1e-4
        recentred, _, _ = score(stale, t, traj.noise[:, t])
        torch.testing.assert_close(recentred, traj.log_probs[:, t], rtol=0, atol=1e-5)

    ode = sample_flow_match_sde(pipe.transformer, sigmas, cond, neg, gens, (4, 8, 8), noise_level=0.0)
    assert ode.noise.shape == (3, 0, 4, 8, 8)
