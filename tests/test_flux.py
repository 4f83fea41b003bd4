"""FLUX.1 on the diffusers backend: the tiny local FluxPipeline, FlowGRPO sampling bound to FLUX's velocity
(packed latents, position ids, embedded guidance), the trainer's recompute, and the server serving it.

All real: the tiny FLUX is built with random weights and loaded with ``from_pretrained``; the reference is the
stock ``diffusers.FluxPipeline``.
"""

from __future__ import annotations

import pytest
import torch

from verl_omni.pipelines.flow_match_sde import sde_step_with_logprob, standard_normal
from verl_omni.pipelines.flux.conditioning import pack_latents, predict_velocity, unpack_latents
from verl_omni.pipelines.flux.sampling import compute_log_prob, sample_flow_match_sde, scheduler_sigmas
from verl_omni.pipelines.registry import adapter_path, load_adapter, load_trainer_binding
from verl_omni.utils.batch_invariant import map_chunks
from verl_omni.workers.rollout.model_spec import ModelSpec

PROMPTS = ["a photo of a cat", "a red car", "a dog"]
LATENT = (16, 8, 8)  # 64 x 64 pixels


@pytest.fixture(scope="module")
def flux_dir(tiny_model):
    return tiny_model("flux")


@pytest.fixture(scope="module")
def pipe(flux_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.requires_grad_(False)
    return pipe


def _cond(pipe, prompts):
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=16)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def test_tiny_flux_is_a_flux_pipeline_the_registry_and_spec_read(pipe, flux_dir):
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer.config.guidance_embeds
    spec = ModelSpec.from_path(flux_dir)
    # 8x VAE, 2x2 packing: sizes are multiples of 16; the latents the samples carry are the VAE's 16 channels
    assert (spec.size_multiple, spec.latent_channels, spec.t5_max_length) == (16, 16, 16)
    assert load_adapter("FluxPipeline", "diffusers").__name__ == "FluxDiffusersAdapter"
    assert load_trainer_binding("FluxPipeline") is compute_log_prob
    # the vllm_omni adapter is imported only inside vllm-omni's workers: named here, loaded in tests/vllm_omni_engine
    assert adapter_path("FluxPipeline", "vllm_omni").endswith("flux.vllm_omni_pipeline.FluxFlowGRPOPipeline")


def test_packing_round_trips():
    x = torch.randn(2, 16, 8, 6)
    assert pack_latents(x).shape == (2, 12, 64)
    assert torch.equal(unpack_latents(pack_latents(x), 8, 6), x)


def test_ode_sampling_matches_the_stock_flux_pipeline(pipe):
    """noise_level=0 is plain FLUX sampling: same schedule and latents as FluxPipeline for the same seeds."""
    cond = _cond(pipe, PROMPTS[:2])
    sigmas = scheduler_sigmas(pipe.scheduler, 5, 64, 64, 8)
    ours = sample_flow_match_sde(
        pipe.transformer,
        sigmas,
        cond,
        [torch.Generator().manual_seed(s) for s in (7, 8)],
        LATENT,
        guidance_scale=3.5,
        noise_level=0.0,
    )
    stock = pipe(
        PROMPTS[:2],
        num_inference_steps=5,
        guidance_scale=3.5,
        height=64,
        width=64,
        max_sequence_length=16,
        output_type="latent",
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
    ).images
    assert torch.equal(pipe.scheduler.sigmas, sigmas)  # the dynamic shift for 16 image tokens
    assert torch.equal(pack_latents(ours.final_latents), stock)
    # the embedded guidance is an input: another scale, another image
    other = sample_flow_match_sde(
        pipe.transformer, sigmas, cond, [torch.Generator().manual_seed(s) for s in (7, 8)], LATENT, 1.0, 0.0
    )
    assert not torch.equal(other.final_latents, ours.final_latents)


def test_recorded_log_probs_recompute_exactly_from_stored_latents(pipe):
    """A sampled trajectory replayed step by step against the shared SDE math, with the embedded guidance."""
    cond = _cond(pipe, PROMPTS)
    sigmas = scheduler_sigmas(pipe.scheduler, 4, 64, 64, 8)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    traj = sample_flow_match_sde(pipe.transformer, sigmas, cond, gens, LATENT, guidance_scale=3.5, chunk_size=2)
    assert traj.latents.shape == (3, 5, *LATENT) and traj.log_probs.shape == (3, 4)
    assert torch.equal(traj.sigmas, sigmas)

    # Replay: each sample's own initial noise and per-step noise, FLUX's velocity in the sampler's chunks of 2 rows,
    # and the SDE step from the shared module: every recorded transition and its log-prob, bit for bit.
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    x = standard_normal((3, *LATENT), gens, "cpu")
    assert torch.equal(x, traj.latents[:, 0])
    for t in range(4):

        def velocity(xs, embeds, pooled, sigma=sigmas[t]):
            c = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            return predict_velocity(pipe.transformer, xs, sigma, c, 3.5)

        with torch.no_grad():
            v = map_chunks(velocity, [x, *cond.values()], 2)
        noise = standard_normal(x.shape, gens, "cpu")
        step = sde_step_with_logprob(v, x, sigmas[t], sigmas[t + 1], 0.7, noise=noise)
        assert torch.equal(step.prev_sample, traj.latents[:, t + 1])
        assert torch.equal(step.log_prob, traj.log_probs[:, t])
        x = step.prev_sample
    assert torch.equal(x, traj.final_latents)

    # Step by step, in the sampler's chunks of 2 rows: the trainer's recompute is bit-identical (ratio exactly 1).
    def recompute(x, nxt, sig, sig_next, embeds, pooled):
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        return compute_log_prob(pipe.transformer, x, nxt, sig, sig_next, cond, guidance_scale=3.5, noise_level=0.7)

    for t in range(4):
        logp, _, _ = map_chunks(
            recompute,
            [traj.latents[:, t], traj.latents[:, t + 1], sigmas[t].expand(3), sigmas[t + 1].expand(3), *cond.values()],
            2,
        )
        assert torch.equal(logp, traj.log_probs[:, t])

    # A trainer mini-batch mixes samples and steps: equal up to float rounding of the batched matmuls.
    rows, steps = torch.tensor([2, 0, 1, 2]), torch.tensor([3, 0, 2, 1])
    logp, mean, std = recompute(
        traj.latents[rows, steps],
        traj.latents[rows, steps + 1],
        sigmas[steps],
        sigmas[steps + 1],
        cond["prompt_embeds"][rows],
        cond["pooled_prompt_embeds"][rows],
    )
    torch.testing.assert_close(logp, traj.log_probs[rows, steps], rtol=0, atol=1e-4)
    assert mean.shape == (4, *LATENT) and std.shape == (4, 1, 1, 1)


def test_compute_log_prob_has_gradients_and_refuses_a_negative(pipe):
    cond = _cond(pipe, PROMPTS[:2])
    x, nxt = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
    sig, sig_next = torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.3])
    pipe.transformer.requires_grad_(True)
    try:
        logp, _, _ = compute_log_prob(pipe.transformer, x, nxt, sig, sig_next, cond, guidance_scale=3.5)
        logp.sum().backward()
        grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    finally:
        pipe.transformer.zero_grad(set_to_none=True)
        pipe.transformer.requires_grad_(False)
    with pytest.raises(ValueError, match="negative_conditioning must be None"):
        compute_log_prob(pipe.transformer, x, nxt, sig, sig_next, cond, negative_conditioning=cond)


async def test_diffusers_server_serves_flux_with_conditioning_once_and_no_negative(flux_dir, pipe):
    """A GRPO group through the real server: embedded guidance 3.5 encodes no negative prompt; the samples'
    recorded log-probs are what the trainer binding recomputes from the group's conditioning."""
    from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer

    config = {"admission_window_ms": 50, "guidance_scale": 3.5, "height": 64, "width": 64}  # FLUX default: 1024
    server = DiffusersRolloutServer(flux_dir, config, server_id="flux")
    try:
        requests = [
            {"request_id": f"g{s}", "prompt_ids": PROMPTS[0], "sampling_params": {"seed": s, "num_inference_steps": 3}}
            for s in range(3)
        ]
        group = await server.generate_group(requests)
    finally:
        await server.close()
    samples = group.samples
    assert [s.request_id for s in samples] == ["g0", "g1", "g2"]
    assert list(group.conditioning) == [PROMPTS[0]]  # once for the group's three copies; no negative
    assert {s.conditioning for s in samples} == {PROMPTS[0]} and {s.negative_conditioning for s in samples} == {None}
    assert samples[0].image.shape == (3, 64, 64) and samples[0].image.dtype == torch.uint8
    assert samples[0].latents.shape == (4, *LATENT) and samples[0].log_probs.shape == (3,)
    assert not torch.equal(samples[0].latents, samples[1].latents)  # per-request seeds

    entry = group.conditioning[PROMPTS[0]]
    cond = {k: v.expand(3, *v.shape) for k, v in entry.items()}
    latents = torch.stack([s.latents for s in samples])
    sigmas = samples[0].sigmas
    for t in range(3):
        logp, _, _ = compute_log_prob(
            pipe.transformer,
            latents[:, t],
            latents[:, t + 1],
            sigmas[t].expand(3),
            sigmas[t + 1].expand(3),
            cond,
            guidance_scale=3.5,
        )
        torch.testing.assert_close(logp, torch.stack([s.log_probs[t] for s in samples]), rtol=0, atol=1e-4)


async def test_a_negative_prompt_is_refused_on_a_guidance_distilled_checkpoint(flux_dir):
    """FLUX.1-dev runs no classifier-free guidance: a negative prompt would be silently ignored, so it is an error
    naming the field (per request at the server; the recipe's config check before Ray: tests/test_model_configs.py)."""
    from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer

    server = DiffusersRolloutServer(flux_dir, {"height": 64, "width": 64}, server_id="flux")
    try:
        with pytest.raises(ValueError, match=r"sampling_params\.negative_prompt='blurry': a FluxPipeline checkpoint"):
            await server.generate("r0", PROMPTS[0], {"seed": 0, "negative_prompt": "blurry"})
    finally:
        await server.close()
