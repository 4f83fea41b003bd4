"""Qwen-Image on the real vllm-omni engine: vllm-omni 0.28's Qwen-Image pipeline on vLLM's CPU build, through
verl-omni's CPU platform, running ``QwenImageFlowGRPOPipeline`` on the tiny Qwen-Image model (float32, 64 px, 4
steps, true CFG 4 with the negative " ", every text padded to 32 tokens).

One engine serves the module. The server's family-independent behaviour is tested with SD3 (test_engine.py); these
check the Qwen-Image binding: the trajectory with its prompt and negative, its recompute by the trainer's Qwen-Image
``compute_log_prob``, agreement with the diffusers backend and LoRA sync.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio
import torch
from lora_adapters import random_lora
from peft.utils import get_peft_model_state_dict

from verl_omni.pipelines.qwen_image.conditioning import CONDITIONING_FIELDS
from verl_omni.pipelines.qwen_image.sampling import compute_log_prob
from verl_omni.utils.batch_invariant import map_chunks
from verl_omni.workers.diffusion_actor import load_transformer
from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer
from verl_omni.workers.rollout.vllm_omni_server import VllmOmniRolloutServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

CFG = 4.0
NEGATIVE = " "
CONFIG = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 4,
    "guidance_scale": CFG,
    "negative_prompt": NEGATIVE,
    "max_sequence_length": 32,
    "dtype": "float32",
    "batch_invariant": True,
    "chunk_size": 4,
}
PROMPT = "a red square on a blue background"
NAMES = CONDITIONING_FIELDS
RECOMPUTE_ATOL = 1e-4  # as test_engine.py: vLLM's CPU layers are not guaranteed to compute torch's bits
# model=qwen_image's targets: both streams' attention (fused to_qkv / add_kv_proj in vllm-omni) and MLPs
LORA_TARGETS = [
    *("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj"),
    *("attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj"),
    "txt_mlp.net.2",
]


@pytest.fixture(scope="module")
def tiny_qwen_image(tiny_model) -> Path:
    return Path(tiny_model("qwen_image"))  # the session's build, which test_family_recipes.py's run trains too


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_qwen_image):
    server = VllmOmniRolloutServer(str(tiny_qwen_image), CONFIG, server_id="vllm-omni-qwen-0", device="cpu")
    yield server
    await server.close()


async def one(server, request_id: str, params: dict):
    group = await server.generate(request_id, PROMPT, params)
    assert len(group.samples) == 1
    return group.samples[0], group.conditioning


def recompute(transformer: torch.nn.Module, out, table) -> torch.Tensor:
    """The trainer's Qwen-Image log-probs (true CFG) of one output's transitions, in batch-invariant chunks."""
    steps = out.log_probs.shape[0]

    def rows(key):
        return [table[key][n].unsqueeze(0).expand(steps, *table[key][n].shape).contiguous() for n in NAMES]

    def call(latents, next_latents, sigmas, sigmas_next, pe, pm, npe, npm):
        cond, neg = dict(zip(NAMES, (pe, pm), strict=True)), dict(zip(NAMES, (npe, npm), strict=True))
        return compute_log_prob(transformer, latents, next_latents, sigmas, sigmas_next, cond, neg, CFG, 0.7)[0]

    inputs = [out.latents[:-1], out.latents[1:], out.sigmas[:-1], out.sigmas[1:]]
    inputs += rows(out.conditioning) + rows(out.negative_conditioning)
    with torch.no_grad():
        return map_chunks(call, [x.contiguous() for x in inputs], CONFIG["chunk_size"])


async def test_qwen_image_is_served_with_seeds_groups_and_its_negative(server):
    ready = await server.ready()
    assert ready["pipeline_class"] == "verl_omni.pipelines.qwen_image.vllm_omni_pipeline.QwenImageFlowGRPOPipeline"
    print(f"vllm-omni Qwen-Image engine start on CPU: {ready['engine_start_s']:.1f} s")
    first, _ = await one(server, "a", {"seed": 7})
    again, _ = await one(server, "b", {"seed": 7})
    other, _ = await one(server, "c", {"seed": 8})
    assert first.image.shape == (3, 64, 64) and first.image.dtype == torch.uint8
    assert torch.equal(first.image, again.image) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.equal(first.image, other.image)
    requests = [
        {"request_id": f"req-{i}", "prompt_ids": PROMPT, "sampling_params": {"seed": s}}
        for i, s in enumerate([8, 7, 9, 10])
    ]
    group = await server.generate_group(requests)
    assert [o.request_id for o in group.samples] == ["req-0", "req-1", "req-2", "req-3"]
    assert list(group.conditioning) == [PROMPT, NEGATIVE]  # the prompt and the CFG negative, once for the group
    assert group.conditioning[PROMPT]["prompt_embeds_mask"].shape == (32,)  # padded to max_sequence_length
    assert all(o.negative_conditioning == NEGATIVE for o in group.samples)
    assert torch.equal(group.samples[1].image, first.image) and torch.equal(group.samples[0].latents, other.latents)


async def test_trajectories_recompute_with_the_trainers_qwen_image_log_prob(server, tiny_qwen_image):
    group = await server.generate_group(
        [{"request_id": f"r{i}", "prompt_ids": PROMPT, "sampling_params": {"seed": 100 + i}} for i in range(4)]
    )
    transformer = load_transformer(str(tiny_qwen_image)).eval()
    worst = 0.0
    for out in group.samples:
        assert out.log_probs.shape == (4,) and out.extra_fields["sde_step_indices"] == [0, 1, 2, 3]
        worst = max(worst, (recompute(transformer, out, group.conditioning) - out.log_probs).abs().max().item())
    print(f"Qwen-Image: max |trainer log-prob - vllm-omni log-prob| over 16 steps: {worst:.3g}")
    assert worst <= RECOMPUTE_ATOL


async def test_lora_sync_samples_the_adapters_policy_and_matches_the_diffusers_backend(server, tiny_qwen_image):
    base, _ = await one(server, "base", {"seed": 3})
    reference = DiffusersRolloutServer(str(tiny_qwen_image), CONFIG, server_id="diffusers-qwen-0", device="cpu")
    try:
        ref_base, _ = await one(reference, "ref-base", {"seed": 3})
        transformer = load_transformer(str(tiny_qwen_image)).eval()
        lora_config = random_lora(transformer, seed=0, targets=LORA_TARGETS)
        lora = get_peft_model_state_dict(transformer)
        await reference.update_weights(lora_state_dict=lora, lora_config=lora_config, version=5)
        ref_tuned, _ = await one(reference, "ref-tuned", {"seed": 3})
    finally:
        await reference.close()
    assert torch.equal(ref_base.latents[0], base.latents[0])  # the initial noise, as QwenImagePipeline draws it
    base_image_gap = (ref_base.image.int() - base.image.int()).abs().max().item()
    base_latent_gap = (ref_base.latents - base.latents).abs().max().item()
    print(f"Qwen-Image base: diffusers vs vllm-omni image gap {base_image_gap} levels, latents {base_latent_gap:.3g}")
    assert base_image_gap <= 2 and base_latent_gap <= 1e-4

    assert await server.update_weights(lora_state_dict=lora, lora_config=lora_config, version=5) == 5
    tuned, tuned_table = await one(server, "tuned", {"seed": 3})
    assert tuned.model_version == 5 and not torch.equal(tuned.image, base.image)
    gap = (recompute(transformer, tuned, tuned_table) - tuned.log_probs).abs().max().item()
    transformer.disable_adapters()
    base_gap = (recompute(transformer, tuned, tuned_table) - tuned.log_probs).abs().max().item()
    print(f"Qwen-Image LoRA: max log-prob gap {gap:.3g} with the adapter, {base_gap:.3g} without")
    assert gap <= RECOMPUTE_ATOL < base_gap
    image_gap = (ref_tuned.image.int() - tuned.image.int()).abs().max().item()
    print(f"Qwen-Image LoRA: diffusers vs vllm-omni image, max |difference| = {image_gap} (uint8 levels)")
    assert image_gap <= 2 and (ref_tuned.log_probs - tuned.log_probs).abs().max().item() <= RECOMPUTE_ATOL
