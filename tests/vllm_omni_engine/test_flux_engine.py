"""FLUX.1 on the real vllm-omni engine: vllm-omni 0.28's FLUX pipeline on vLLM's CPU build, through verl-omni's CPU
platform, running ``FluxFlowGRPOPipeline`` on the tiny FLUX model (float32, 64 px, 4 steps, embedded guidance 3.5).

One engine serves the module. What the SD3 tests (test_engine.py) cover for the server itself (abort, update
ordering, failed RPCs, refusals) is family-independent and not repeated here; these check the FLUX binding: the
trajectory, its recompute by the trainer's FLUX ``compute_log_prob``, agreement with the diffusers backend, the
per-request FlowGRPO knobs and LoRA sync.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio
import torch
from lora_adapters import random_lora
from peft.utils import get_peft_model_state_dict

from verl_omni.pipelines.flux.sampling import compute_log_prob
from verl_omni.utils.batch_invariant import map_chunks
from verl_omni.workers.diffusion_actor import load_transformer
from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer
from verl_omni.workers.rollout.vllm_omni_server import VllmOmniRolloutServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

GUIDANCE = 3.5
CONFIG = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 4,
    "guidance_scale": GUIDANCE,
    "dtype": "float32",
    "batch_invariant": True,
    "chunk_size": 4,
}
PROMPT = "a red square on a blue background"
NAMES = ("prompt_embeds", "pooled_prompt_embeds")
# As test_engine.py: vLLM's CPU linear layers run their own (oneDNN) GEMM, the trainer torch's, so the trainer's
# recompute agrees to float32 rounding, not bit for bit.
RECOMPUTE_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_flux(tiny_model) -> Path:
    return Path(tiny_model("flux"))  # the session's build, which test_family_recipes.py's run trains too


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_flux):
    server = VllmOmniRolloutServer(str(tiny_flux), CONFIG, server_id="vllm-omni-flux-0", device="cpu")
    yield server
    await server.close()


async def one(server, request_id: str, params: dict):
    group = await server.generate(request_id, PROMPT, params)
    assert len(group.samples) == 1
    return group.samples[0], group.conditioning


def recompute(transformer: torch.nn.Module, out, table, sde_type: str = "sde", noise_level: float = 0.7):
    """The trainer's FLUX log-probs of one output's recorded transitions, in the actor's batch-invariant chunks."""
    steps = out.log_probs.shape[0]
    entry = table[out.conditioning]

    def call(latents, next_latents, sigmas, sigmas_next, embeds, pooled):
        cond = dict(zip(NAMES, (embeds, pooled), strict=True))
        return compute_log_prob(
            transformer,
            latents,
            next_latents,
            sigmas,
            sigmas_next,
            cond,
            None,
            GUIDANCE,
            noise_level,
            sde_type=sde_type,
        )[0]

    inputs = [out.latents[:-1], out.latents[1:], out.sigmas[:-1], out.sigmas[1:]]
    inputs += [entry[n].unsqueeze(0).expand(steps, *entry[n].shape).contiguous() for n in NAMES]
    with torch.no_grad():
        return map_chunks(call, [x.contiguous() for x in inputs], CONFIG["chunk_size"])


async def test_flux_is_served_by_the_flowgrpo_pipeline_with_seeds_groups_and_no_negative(server):
    ready = await server.ready()
    assert ready["pipeline_class"] == "verl_omni.pipelines.flux.vllm_omni_pipeline.FluxFlowGRPOPipeline"
    print(f"vllm-omni FLUX engine start on CPU: {ready['engine_start_s']:.1f} s")
    first, _ = await one(server, "a", {"seed": 7})
    again, _ = await one(server, "b", {"seed": 7})
    other, _ = await one(server, "c", {"seed": 8})
    assert first.image.shape == (3, 64, 64) and first.image.dtype == torch.uint8
    assert torch.equal(first.image, again.image) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.equal(first.image, other.image)
    # unpacked latents (C, h, w): 16 channels at 64 px / 8 (the tiny VAE's scale factor is read, not assumed)
    assert first.latents.shape[:2] == (5, 16) and first.latents.shape[2:] == first.latents.shape[-2:]
    requests = [
        {"request_id": f"req-{i}", "prompt_ids": PROMPT, "sampling_params": {"seed": s}}
        for i, s in enumerate([8, 7, 9, 10])
    ]
    group = await server.generate_group(requests)
    assert [o.request_id for o in group.samples] == ["req-0", "req-1", "req-2", "req-3"]
    # guidance-distilled: guidance 3.5 is an input of the transformer, no negative is encoded or returned
    assert list(group.conditioning) == [PROMPT] and set(group.conditioning[PROMPT]) == set(NAMES)
    assert all(o.negative_conditioning is None for o in group.samples)
    # batch-invariant chunks: a sample is bit-identical alone or in a group
    assert torch.equal(group.samples[1].image, first.image) and torch.equal(group.samples[0].latents, other.latents)


async def test_trajectories_recompute_with_the_trainers_flux_log_prob(server, tiny_flux):
    group = await server.generate_group(
        [{"request_id": f"r{i}", "prompt_ids": PROMPT, "sampling_params": {"seed": 100 + i}} for i in range(4)]
    )
    transformer = load_transformer(str(tiny_flux)).eval()
    worst = 0.0
    for out in group.samples:
        assert out.log_probs.shape == (4,) and out.extra_fields["sde_step_indices"] == [0, 1, 2, 3]
        worst = max(worst, (recompute(transformer, out, group.conditioning) - out.log_probs).abs().max().item())
    print(f"FLUX: max |trainer log-prob - vllm-omni log-prob| over 16 steps: {worst:.3g}")
    assert worst <= RECOMPUTE_ATOL


async def test_per_request_sde_window_sde_type_and_noise_level_are_honoured(server, tiny_flux):
    transformer = load_transformer(str(tiny_flux)).eval()
    window, _ = await one(server, "window", {"seed": 4, "sde_window": [1, 3]})
    assert window.log_probs.shape == (2,) and window.latents.shape[0] == 3
    assert window.extra_fields["sde_step_indices"] == [1, 2]
    full, table = await one(server, "full", {"seed": 4})
    # the window's steps of the same schedule; step 0 ran as an ODE step, so it starts elsewhere than the full run
    assert torch.equal(window.sigmas, full.sigmas[1:4]) and not torch.equal(window.latents[0], full.latents[1])
    cps, cps_table = await one(server, "cps", {"seed": 4, "sde_type": "cps", "noise_level": 0.5})
    assert not torch.allclose(cps.log_probs, full.log_probs)
    gap = (recompute(transformer, cps, cps_table, "cps", 0.5) - cps.log_probs).abs().max().item()
    wrong = (recompute(transformer, cps, cps_table, "sde", 0.5) - cps.log_probs).abs().max().item()
    print(f"FLUX cps: recompute gap {gap:.3g} with sde_type=cps, {wrong:.3g} with sde")
    assert gap <= RECOMPUTE_ATOL < wrong
    ode, ode_table = await one(server, "ode", {"seed": 4, "noise_level": 0.0})
    assert ode.log_probs.shape == (0,) and ode_table == {} and ode.image.shape == (3, 64, 64)


LORA_TARGETS = [
    *("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj"),
    *("attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
]


async def test_lora_sync_samples_the_adapters_policy_and_matches_the_diffusers_backend(server, tiny_flux):
    base, _ = await one(server, "base", {"seed": 3})

    # Without an update both backends draw the same initial noise and (to float rounding) the same image.
    reference = DiffusersRolloutServer(str(tiny_flux), CONFIG, server_id="diffusers-flux-0", device="cpu")
    try:
        ref_base, _ = await one(reference, "ref-base", {"seed": 3})
        transformer = load_transformer(str(tiny_flux)).eval()
        lora_config = random_lora(transformer, seed=0, targets=LORA_TARGETS)
        lora = get_peft_model_state_dict(transformer)
        await reference.update_weights(lora_state_dict=lora, lora_config=lora_config, version=5)
        ref_tuned, _ = await one(reference, "ref-tuned", {"seed": 3})
    finally:
        await reference.close()
    assert torch.equal(ref_base.latents[0], base.latents[0])  # the initial noise, as FluxPipeline draws it
    base_image_gap = (ref_base.image.int() - base.image.int()).abs().max().item()
    base_latent_gap = (ref_base.latents - base.latents).abs().max().item()
    print(f"FLUX base: diffusers vs vllm-omni image gap {base_image_gap} levels, latents {base_latent_gap:.3g}")
    assert base_image_gap <= 2 and base_latent_gap <= 1e-4
    assert (ref_base.log_probs - base.log_probs).abs().max().item() <= RECOMPUTE_ATOL

    assert await server.update_weights(lora_state_dict=lora, lora_config=lora_config, version=5) == 5
    tuned, tuned_table = await one(server, "tuned", {"seed": 3})
    assert tuned.model_version == 5 and not torch.equal(tuned.image, base.image)
    gap = (recompute(transformer, tuned, tuned_table) - tuned.log_probs).abs().max().item()
    transformer.disable_adapters()
    base_gap = (recompute(transformer, tuned, tuned_table) - tuned.log_probs).abs().max().item()
    print(f"FLUX LoRA: max log-prob gap {gap:.3g} with the adapter, {base_gap:.3g} without")
    assert gap <= RECOMPUTE_ATOL < base_gap
    image_gap = (ref_tuned.image.int() - tuned.image.int()).abs().max().item()
    print(f"FLUX LoRA: diffusers vs vllm-omni image, max |difference| = {image_gap} (uint8 levels)")
    assert image_gap <= 2 and (ref_tuned.log_probs - tuned.log_probs).abs().max().item() <= RECOMPUTE_ATOL

    # A zero adapter replaces it: back to the base policy.
    zero = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in lora.items()}
    assert await server.update_weights(lora_state_dict=zero, lora_config=lora_config) == 6
    again, _ = await one(server, "zero", {"seed": 3})
    assert (again.log_probs - base.log_probs).abs().max().item() <= RECOMPUTE_ATOL
