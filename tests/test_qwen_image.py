"""Qwen-Image on the diffusers backend: the tiny local QwenImagePipeline, prompt embeddings padded to one length
with their mask, FlowGRPO sampling bound to Qwen-Image's velocity (packed latents, true CFG with the norm
rescale), the trainer's recompute, decoding with the 3-D VAE, and the server serving it (conditioning once per
distinct text, weight and LoRA updates).

All real: the tiny Qwen-Image is built with random weights and loaded with ``from_pretrained``; the reference is
the stock ``diffusers.QwenImagePipeline``.
"""

from __future__ import annotations

import pytest
import torch

from verl_omni.models.tiny_qwen_image import TINY_QWEN_IMAGE_MAX_SEQUENCE_LENGTH
from verl_omni.pipelines.flow_match_sde import sde_step_with_logprob
from verl_omni.pipelines.qwen_image.conditioning import (
    encode_prompts,
    pack_latents,
    predict_velocity,
    unpack_latents,
)
from verl_omni.pipelines.qwen_image.sampling import (
    compute_log_prob,
    decode_latents,
    sample_flow_match_sde,
    scheduler_sigmas,
)
from verl_omni.pipelines.registry import adapter_path, load_adapter, load_trainer_binding
from verl_omni.utils.batch_invariant import map_chunks
from verl_omni.workers.rollout.model_spec import ModelSpec

PROMPTS = ["a photo of a cat", "a red car parked by the sea at night", "a dog"]
NEGATIVE = " "  # the reference's negative prompt
LATENT = (16, 8, 8)  # 64 x 64 pixels
L = TINY_QWEN_IMAGE_MAX_SEQUENCE_LENGTH
CFG = 4.0  # the reference's true_cfg_scale


@pytest.fixture(scope="module")
def qwen_dir(tiny_model):
    return tiny_model("qwen_image")


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.requires_grad_(False)
    return pipe


def _cond(pipe, prompts):
    embeds, mask = encode_prompts(pipe, prompts, L, torch.device("cpu"))
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def test_tiny_qwen_image_is_a_qwen_image_pipeline_the_registry_and_spec_read(pipe, qwen_dir):
    assert type(pipe).__name__ == "QwenImagePipeline"
    spec = ModelSpec.from_path(qwen_dir)
    # 8x VAE, 2x2 packing (the transformer's patch_size 2 is the packing): sizes are multiples of 16; 16 channels
    assert (spec.vae_scale_factor, spec.size_multiple, spec.latent_channels) == (8, 16, 16)
    assert spec.latent_shape(64, 64) == LATENT and (spec.default_height, spec.default_width) == (1024, 1024)
    assert load_adapter("QwenImagePipeline", "diffusers").__name__ == "QwenImageDiffusersAdapter"
    assert load_trainer_binding("QwenImagePipeline") is compute_log_prob
    # the vllm_omni adapter is imported only inside vllm-omni's workers: named here, loaded in tests/vllm_omni_engine
    assert adapter_path("QwenImagePipeline", "vllm_omni").endswith(".vllm_omni_pipeline.QwenImageFlowGRPOPipeline")
    # the template's system prefix is as many tokens as the pipeline drops: the embeddings start at the prompt
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34


def test_packing_round_trips():
    x = torch.randn(2, 16, 8, 6)
    assert pack_latents(x).shape == (2, 12, 64)
    assert torch.equal(unpack_latents(pack_latents(x), 8, 6), x)


def test_prompt_embeddings_are_the_pipelines_padded_to_one_length_with_a_mask(pipe):
    ours = _cond(pipe, PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=L)
    lengths = mask.sum(dim=1)
    assert ours["prompt_embeds"].shape == (3, L, 32) and ours["prompt_embeds_mask"].shape == (3, L)
    assert torch.equal(ours["prompt_embeds_mask"].sum(dim=1), lengths)  # the same tokens are the prompt's
    for i, n in enumerate(lengths.tolist()):
        # the text encoder ran at another padded length: equal up to float rounding
        torch.testing.assert_close(ours["prompt_embeds"][i, :n], embeds[i, :n], rtol=0, atol=1e-5)
        assert not ours["prompt_embeds"][i, n:].any() and not ours["prompt_embeds_mask"][i, n:].any()
    # fixed shapes: a text's embedding does not depend on the texts encoded beside it
    alone = _cond(pipe, [PROMPTS[2], "", ""])
    assert torch.equal(alone["prompt_embeds"][0], _cond(pipe, PROMPTS[1:])["prompt_embeds"][1])
    # a prompt longer than L keeps its first L tokens, as encode_prompt cuts it
    long = _cond(pipe, ["a very long prompt " * 20])
    assert long["prompt_embeds_mask"].all()


def test_ode_sampling_with_true_cfg_matches_the_stock_pipeline(pipe):
    """noise_level=0 is plain Qwen-Image sampling: for the same embeddings and seeds, QwenImagePipeline with
    true_cfg_scale and a negative prompt gives the same latents bit for bit (two transformer calls per step and
    the per-token norm rescale, as it computes them), and the same decoded images."""
    cond, neg = _cond(pipe, PROMPTS[:2]), _cond(pipe, [NEGATIVE] * 2)
    sigmas = scheduler_sigmas(pipe.scheduler, 5, 64, 64, 8)
    ours = sample_flow_match_sde(
        pipe.transformer,
        sigmas,
        cond,
        neg,
        [torch.Generator().manual_seed(s) for s in (7, 8)],
        LATENT,
        guidance_scale=CFG,
        noise_level=0.0,
    )
    stock = dict(
        prompt_embeds=cond["prompt_embeds"],
        prompt_embeds_mask=cond["prompt_embeds_mask"],
        negative_prompt_embeds=neg["prompt_embeds"],
        negative_prompt_embeds_mask=neg["prompt_embeds_mask"],
        true_cfg_scale=CFG,
        num_inference_steps=5,
        height=64,
        width=64,
        max_sequence_length=L,
    )
    latents = pipe(**stock, output_type="latent", generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    assert torch.equal(pipe.scheduler.sigmas, sigmas)  # dynamic shift for 16 tokens, terminal sigma 0.02
    assert torch.equal(pack_latents(ours.final_latents), latents)
    images = pipe(**stock, output_type="pt", generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    decoded = decode_latents(pipe.vae, ours.final_latents, chunk_size=None)
    assert decoded.shape == (2, 3, 64, 64)
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=1e-6)

    # guidance 1: no negative runs, and the image differs
    plain = sample_flow_match_sde(
        pipe.transformer, sigmas, cond, None, [torch.Generator().manual_seed(s) for s in (7, 8)], LATENT, 1.0, 0.0
    )
    assert not torch.equal(plain.final_latents, ours.final_latents)


def test_recorded_log_probs_recompute_exactly_from_stored_latents(pipe):
    """A sampled trajectory replayed step by step against the shared SDE math, with true CFG."""
    cond, neg = _cond(pipe, PROMPTS), _cond(pipe, [NEGATIVE] * 3)
    sigmas = scheduler_sigmas(pipe.scheduler, 4, 64, 64, 8)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    traj = sample_flow_match_sde(pipe.transformer, sigmas, cond, neg, gens, LATENT, guidance_scale=CFG, chunk_size=2)
    assert traj.latents.shape == (3, 5, *LATENT) and traj.log_probs.shape == (3, 4)
    assert torch.equal(traj.sigmas, sigmas)

    # Replay: same initial noise, per-step noise and SDE step from the shared module
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    x = torch.stack([torch.randn(LATENT, generator=g) for g in gens])
    assert torch.equal(x, traj.latents[:, 0])
    for t in range(4):

        def velocity(xs, *c, sigma=sigmas[t]):
            return predict_velocity(
                pipe.transformer,
                xs,
                sigma,
                dict(zip(cond, c[:2], strict=True)),
                dict(zip(neg, c[2:], strict=True)),
                CFG,
            )

        v = map_chunks(velocity, [x, *cond.values(), *neg.values()], 2)
        noise = torch.stack([torch.randn(LATENT, generator=g) for g in gens])
        step = sde_step_with_logprob(v, x, sigmas[t], sigmas[t + 1], 0.7, noise=noise)
        assert torch.equal(step.prev_sample, traj.latents[:, t + 1])
        assert torch.equal(step.log_prob, traj.log_probs[:, t])
        x = step.prev_sample

    # The trainer's recompute in the sampler's chunks of 2 rows: bit-identical (ratio exactly 1).
    def recompute(x, nxt, sig, sig_next, embeds, mask, neg_embeds, neg_mask):
        return compute_log_prob(
            pipe.transformer,
            x,
            nxt,
            sig,
            sig_next,
            {"prompt_embeds": embeds, "prompt_embeds_mask": mask},
            {"prompt_embeds": neg_embeds, "prompt_embeds_mask": neg_mask},
            guidance_scale=CFG,
            noise_level=0.7,
        )

    for t in range(4):
        args = [traj.latents[:, t], traj.latents[:, t + 1], sigmas[t].expand(3), sigmas[t + 1].expand(3)]
        logp, _, _ = map_chunks(recompute, [*args, *cond.values(), *neg.values()], 2)
        assert torch.equal(logp, traj.log_probs[:, t])

    # A trainer mini-batch mixes samples and steps: equal up to float rounding of the batched matmuls.
    rows, steps = torch.tensor([2, 0, 1, 2]), torch.tensor([3, 0, 2, 1])
    logp, mean, std = recompute(
        traj.latents[rows, steps],
        traj.latents[rows, steps + 1],
        sigmas[steps],
        sigmas[steps + 1],
        *(v[rows] for v in cond.values()),
        *(v[rows] for v in neg.values()),
    )
    torch.testing.assert_close(logp, traj.log_probs[rows, steps], rtol=0, atol=1e-4)
    assert mean.shape == (4, *LATENT) and std.shape == (4, 1, 1, 1)


def test_compute_log_prob_has_gradients_through_the_conditional_branch_only(pipe):
    cond, neg = _cond(pipe, PROMPTS[:2]), _cond(pipe, [NEGATIVE] * 2)
    x, nxt = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
    sig, sig_next = torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.3])
    grads = {}
    pipe.transformer.requires_grad_(True)
    try:
        for detach in (True, False):
            logp, _, _ = compute_log_prob(
                pipe.transformer, x, nxt, sig, sig_next, cond, neg, guidance_scale=CFG, detach_uncond=detach
            )
            logp.sum().backward()
            grads[detach] = torch.cat([p.grad.flatten() for p in pipe.transformer.parameters() if p.grad is not None])
            pipe.transformer.zero_grad(set_to_none=True)
    finally:
        pipe.transformer.requires_grad_(False)
    assert grads[True].abs().sum() > 0
    assert not torch.allclose(grads[True], grads[False])  # the negative branch's gradient is what detach drops
    with pytest.raises(ValueError, match="needs the negative conditioning"):
        compute_log_prob(pipe.transformer, x, nxt, sig, sig_next, cond, None, guidance_scale=CFG)


@pytest.fixture
async def make_server(qwen_dir):
    from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer

    servers = []

    def make(**config):
        base = {"admission_window_ms": 50, "height": 64, "width": 64, "max_sequence_length": L}
        server = DiffusersRolloutServer(qwen_dir, {**base, **config}, server_id="qwen")
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


async def test_server_serves_a_group_with_true_cfg_and_its_conditioning_once(make_server, pipe):
    """A GRPO group through the real server: one entry for the prompt and one for the negative, whatever their
    token counts; the samples' recorded log-probs are what the trainer binding recomputes from them; the next
    group with the same prompt hits the prompt cache."""
    server = make_server(guidance_scale=CFG, negative_prompt=NEGATIVE)
    requests = [
        {"request_id": f"g{s}", "prompt_ids": PROMPTS[1], "sampling_params": {"seed": s, "num_inference_steps": 3}}
        for s in range(3)
    ]
    group = await server.generate_group(requests)
    samples = group.samples
    assert [s.request_id for s in samples] == ["g0", "g1", "g2"]
    assert list(group.conditioning) == [PROMPTS[1], NEGATIVE]
    assert {s.conditioning for s in samples} == {PROMPTS[1]}
    assert {s.negative_conditioning for s in samples} == {NEGATIVE}
    entry, negative = group.conditioning[PROMPTS[1]], group.conditioning[NEGATIVE]
    assert entry["prompt_embeds"].shape == negative["prompt_embeds"].shape == (L, 32)
    assert entry["prompt_embeds_mask"].sum() > negative["prompt_embeds_mask"].sum()  # variable lengths, one shape
    assert samples[0].image.shape == (3, 64, 64) and samples[0].image.dtype == torch.uint8
    assert samples[0].latents.shape == (4, *LATENT) and samples[0].log_probs.shape == (3,)
    assert not torch.equal(samples[0].latents, samples[1].latents)  # per-request seeds

    latents, sigmas = torch.stack([s.latents for s in samples]), samples[0].sigmas
    cond = {k: v.expand(3, *v.shape) for k, v in entry.items()}
    neg = {k: v.expand(3, *v.shape) for k, v in negative.items()}
    for t in range(3):
        logp, _, _ = compute_log_prob(
            pipe.transformer,
            latents[:, t],
            latents[:, t + 1],
            sigmas[t].expand(3),
            sigmas[t + 1].expand(3),
            cond,
            neg,
            guidance_scale=CFG,
        )
        torch.testing.assert_close(logp, torch.stack([s.log_probs[t] for s in samples]), rtol=0, atol=1e-4)

    again = await server.generate_group([{**r, "request_id": r["request_id"] + "b"} for r in requests])
    assert all(s.extra_fields["cache_hit"] for s in again.samples)
    assert (await server.get_stats())["texts_encoded"] == 2


async def test_weight_and_lora_updates_change_the_served_images_as_pushed(make_server, qwen_dir):
    """Weight sync: a full state dict and then a peft adapter (the trainer's export), each served from the next
    request on, as the local model with the same weights samples it."""
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    server = make_server(guidance_scale=1.0)  # no CFG: one transformer call per step
    params = {"seed": 5, "num_inference_steps": 3}
    base = (await server.generate("a", PROMPTS[0], params)).samples[0]
    original = {k: v.clone() for k, v in server.engine.transformer.state_dict().items()}
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    assert await server.update_weights(state_dict=perturbed) == 1
    after = (await server.generate("b", PROMPTS[0], params)).samples[0]
    assert after.model_version == 1 and not torch.equal(after.image, base.image)

    group = await server.generate_group([{"request_id": "c", "prompt_ids": PROMPTS[0], "sampling_params": params}])
    sample, entry = group.samples[0], group.conditioning[PROMPTS[0]]

    def recorded_gap(state_dict):
        """max |recomputed - recorded| log-prob over the sample's steps, one row per call as the server ran it."""
        local = QwenImageTransformer2DModel.from_pretrained(qwen_dir, subfolder="transformer").eval()
        local.load_state_dict(state_dict)
        cond = {k: v[None] for k, v in entry.items()}
        x, sig = sample.latents, sample.sigmas
        with torch.no_grad():
            logps = [
                compute_log_prob(local, x[t, None], x[t + 1, None], sig[t, None], sig[t + 1, None], cond)[0]
                for t in range(3)
            ]
        return (torch.cat(logps) - sample.log_probs).abs().max().item()

    gap_pushed, gap_old = recorded_gap(perturbed), recorded_gap(original)
    assert gap_pushed < 1e-4 < 1e-2 < gap_old  # sampled with the pushed weights, not the old ones

    assert await server.update_weights(state_dict=original) == 2
    lora = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    trainer_model = QwenImageTransformer2DModel.from_pretrained(qwen_dir, subfolder="transformer")
    trainer_model.add_adapter(LoraConfig(**lora))
    zero = get_peft_model_state_dict(trainer_model)  # lora_B starts at zero: the identity
    assert await server.update_weights(lora_state_dict=zero, lora_config=lora) == 3
    assert torch.equal((await server.generate("d", PROMPTS[0], params)).samples[0].image, base.image)
    trained = {k: (torch.randn_like(v) * 0.5 if "lora_B" in k else v) for k, v in zero.items()}
    assert await server.update_weights(lora_state_dict=trained) == 4
    assert not torch.equal((await server.generate("e", PROMPTS[0], params)).samples[0].image, base.image)
