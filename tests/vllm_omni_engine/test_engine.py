"""The ``vllm_omni`` rollout server on the real engine: vllm-omni 0.28 on vLLM's CPU build, through verl-omni's CPU
platform, serving the tiny SD3 model (float32, 64 px, 4 steps, CFG 4.5).

One engine serves the module (starting one takes 10-20 s on 2 cores). No test double: what the CPU engine cannot do
(full-weight updates, sleep mode) is tested as refused / logged here, and against a double of the engine in
tests/test_vllm_omni_server.py, which says so.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import pytest_asyncio
import torch
from lora_adapters import random_lora
from peft.utils import get_peft_model_state_dict

from verl_omni.pipelines.sd3.sampling import compute_log_prob
from verl_omni.utils.batch_invariant import map_chunks
from verl_omni.workers.diffusion_actor import load_transformer
from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer
from verl_omni.workers.rollout.vllm_omni_cpu_plugin import PLATFORM, cpu_omni_platform_plugin
from verl_omni.workers.rollout.vllm_omni_server import VllmOmniRolloutServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONFIG = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 4,
    "guidance_scale": 4.5,
    "dtype": "float32",
    "batch_invariant": True,
    "chunk_size": 4,
}
PROMPT = "a red square on a blue background"
# Trained steps recomputed by the trainer agree with the engine's log-probs to this (float32; vLLM's CPU linear
# layers run their own oneDNN GEMM, torch's run MKL, so the last bits differ: see docs/advanced_features/backends.md).
RECOMPUTE_ATOL = 1e-4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_sd3):
    server = VllmOmniRolloutServer(str(tiny_sd3), CONFIG, server_id="vllm-omni-cpu-0", device="cpu")
    yield server
    if server._api is not None:
        await server.close()


def request(i: int, seed: int, prompt: str = PROMPT) -> dict:
    return {"request_id": f"req-{i}", "prompt_ids": prompt, "sampling_params": {"seed": seed}}


async def one(server, *args, **kwargs):
    """``generate``'s one sample and its group's conditioning table (the server answers with a group of one)."""
    group = await server.generate(*args, **kwargs)
    assert len(group.samples) == 1
    return group.samples[0], group.conditioning


def recompute_steps(
    transformer: torch.nn.Module, out, table, guidance_scale: float = 4.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trainer's ``(log_prob, mean, std_dev)`` of one output's recorded transitions, in the actor's
    batch-invariant chunks."""
    steps = out.log_probs.shape[0]
    names = ("prompt_embeds", "pooled_prompt_embeds")

    def rows(key):
        entry = table.get(key) if key is not None else None
        return [None] * 2 if entry is None else [entry[n].unsqueeze(0).expand(steps, *entry[n].shape) for n in names]

    def call(latents, next_latents, sigmas, sigmas_next, pe, pp, npe, npp):
        negative = None if npe is None else dict(zip(names, (npe, npp), strict=True))
        cond = dict(zip(names, (pe, pp), strict=True))
        return compute_log_prob(
            transformer, latents, next_latents, sigmas, sigmas_next, cond, negative, guidance_scale, 0.7
        )

    inputs = [out.latents[:-1], out.latents[1:], out.sigmas[:-1], out.sigmas[1:]]
    inputs += rows(out.conditioning) + rows(out.negative_conditioning)
    with torch.no_grad():
        return map_chunks(call, [x if x is None else x.contiguous() for x in inputs], CONFIG["chunk_size"])


def recompute(transformer: torch.nn.Module, out, table, guidance_scale: float = 4.5) -> torch.Tensor:
    """The trainer's log-probs of one output's recorded transitions."""
    return recompute_steps(transformer, out, table, guidance_scale)[0]


async def test_the_cpu_platform_serves_the_custom_pipeline(server):
    assert cpu_omni_platform_plugin() == PLATFORM  # vLLM's CPU build, no CUDA device here
    ready = await server.ready()
    assert ready["device"] == "cpu" and ready["backend"] == "vllm_omni" and ready["dtype"] == "float32"
    assert ready["pipeline_class"] == "verl_omni.pipelines.sd3.vllm_omni_pipeline.SD3FlowGRPOPipeline"
    print(f"vllm-omni engine start on CPU: {ready['engine_start_s']:.1f} s")


async def test_same_seed_same_image_and_a_group_keeps_order(server):
    first, _ = await one(server, "a", PROMPT, {"seed": 7})
    again, _ = await one(server, "b", PROMPT, {"seed": 7})
    other, _ = await one(server, "c", PROMPT, {"seed": 8})
    assert first.image.shape == (3, 64, 64) and first.image.dtype == torch.uint8
    assert torch.equal(first.image, again.image) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.equal(first.image, other.image)
    returned = await server.generate_group([request(i, seed) for i, seed in enumerate([8, 7, 9, 10])])
    group = returned.samples
    assert [o.request_id for o in group] == ["req-0", "req-1", "req-2", "req-3"]
    assert list(returned.conditioning) == [PROMPT, ""]  # the prompt and the CFG negative, once for the group
    assert [o.extra_fields["seed"] for o in group] == [8, 7, 9, 10]
    # Batch-invariant chunks: a sample is the same whether it ran alone or in a group.
    assert torch.equal(group[1].image, first.image) and torch.equal(group[0].latents, other.latents)


async def test_every_trajectory_field_is_filled_and_recomputes_with_the_trainer(server, tiny_sd3):
    group = await server.generate_group([request(i, 100 + i) for i in range(4)])
    transformer = load_transformer(str(tiny_sd3)).eval()
    worst = 0.0
    for out in group.samples:
        steps = out.log_probs.shape[0]
        # x and sigma before each of the 4 consecutive SDE steps, then after the last
        assert steps == 4 and out.latents.shape[::2] == (steps + 1, 8) and out.sigmas.shape == (steps + 1,)
        assert out.negative_conditioning == "" and set(group.conditioning[""]) == {
            "prompt_embeds",
            "pooled_prompt_embeds",
        }
        assert out.extra_fields["sde_step_indices"] == [0, 1, 2, 3] and out.model_version == 0
        assert out.noise is None  # only on request
        worst = max(worst, (recompute(transformer, out, group.conditioning) - out.log_probs).abs().max().item())
    print(f"max |trainer log-prob - vllm-omni log-prob| over 16 steps: {worst:.3g}")
    assert worst <= RECOMPUTE_ATOL


async def test_record_noise_returns_each_steps_draw_about_the_trainers_mean(server, tiny_sd3):
    out, table = await one(server, "noise", PROMPT, {"seed": 100, "record_noise": True})
    assert out.noise.shape == out.latents[1:].shape and 0.9 < out.noise.std().item() < 1.1  # (T, C, h, w)
    _, mean, std_dev = recompute_steps(load_transformer(str(tiny_sd3)).eval(), out, table)
    gap = (out.latents[1:] - std_dev * out.noise - mean).abs().max().item()
    print(f"max |x_next - std * noise - trainer's mean| over 4 steps: {gap:.3g}")
    assert gap <= RECOMPUTE_ATOL


async def test_lora_sync_samples_the_policy_the_adapter_defines(server, tiny_sd3):
    base, _ = await one(server, "base", PROMPT, {"seed": 3})
    transformer = load_transformer(str(tiny_sd3)).eval()
    lora_config = random_lora(transformer, seed=0, targets=["to_q", "to_k", "to_v", "to_out.0"])
    lora = get_peft_model_state_dict(transformer)
    assert await server.update_weights(lora_state_dict=lora, lora_config=lora_config, version=5) == 5
    tuned, tuned_table = await one(server, "tuned", PROMPT, {"seed": 3})
    assert tuned.model_version == 5 and not torch.equal(tuned.image, base.image)
    # The trainer's peft model with the adapter computes the engine's log-probs; the base model does not.
    gap = (recompute(transformer, tuned, tuned_table) - tuned.log_probs).abs().max().item()
    transformer.disable_adapters()
    base_gap = (recompute(transformer, tuned, tuned_table) - tuned.log_probs).abs().max().item()
    print(f"LoRA: max log-prob gap {gap:.3g} with the adapter, {base_gap:.3g} without")
    assert gap <= RECOMPUTE_ATOL < base_gap

    # The diffusers backend with the same adapter (peft, merged into its transformer) draws the same image.
    reference = DiffusersRolloutServer(str(tiny_sd3), CONFIG, server_id="diffusers-0", device="cpu")
    try:
        await reference.update_weights(lora_state_dict=lora, lora_config=lora_config, version=5)
        same, _ = await one(reference, "ref", PROMPT, {"seed": 3})
    finally:
        await reference.close()
    image_gap = (same.image.int() - tuned.image.int()).abs().max().item()
    print(f"LoRA: diffusers vs vllm-omni image, max |difference| = {image_gap} (uint8 levels)")
    assert image_gap <= 2 and (same.log_probs - tuned.log_probs).abs().max().item() <= RECOMPUTE_ATOL

    # A second update replaces the adapter (vllm-omni keeps one): back to the base policy with a zero adapter.
    zero = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in lora.items()}
    assert await server.update_weights(lora_state_dict=zero, lora_config=lora_config) == 6
    again, _ = await one(server, "zero", PROMPT, {"seed": 3})
    assert (again.log_probs - base.log_probs).abs().max().item() <= RECOMPUTE_ATOL
    assert (await server.get_stats())["lora_adapter_id"] == 2


async def test_cpu_refuses_full_weights_and_logs_that_sleep_is_off(server, caplog):
    with pytest.raises(ValueError, match=r"vllm-omni-cpu-0: full-weight updates are not possible .* on CPU"):
        await server.update_weights(state_dict={"pos_embed.proj.weight": torch.zeros(1)})
    with caplog.at_level(logging.WARNING, logger="verl_omni.workers.rollout.vllm_omni_server"):
        await server.sleep()
    assert "sleep mode is off on CPU" in caplog.text
    assert (await server.get_stats())["sleeping"] is False
    await server.wake_up()
    assert (await one(server, "awake", PROMPT, {"seed": 1}))[0].image.shape == (3, 64, 64)


async def test_a_failed_worker_call_raises_naming_the_replica_and_the_call(server):
    with pytest.raises(RuntimeError, match=r"vllm-omni-cpu-0: collective_rpc\('no_such_method'\) failed: stage 0: "):
        await server._rpc("no_such_method")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling_params": {"seed": 1, "temperature": 1.0}}, "temperature"),
        ({"sampling_params": {"seed": 1, "height": 60}}, "height"),
        ({"image_data": [object()]}, "image_data"),
    ],
)
async def test_bad_requests_fail_before_reaching_the_engine(server, kwargs, match):
    served = (await server.get_stats())["requests_served"]
    with pytest.raises(ValueError, match=match):
        await server.generate("bad", PROMPT, **{"sampling_params": {"seed": 1}, **kwargs})
    assert (await server.get_stats())["requests_served"] == served


async def test_abort_pauses_admission_rejects_and_resumes(server):
    await server.abort_all_requests()
    waiting = asyncio.ensure_future(server.generate("paused", PROMPT, {"seed": 2}))
    done, _ = await asyncio.wait([waiting], timeout=1.0)
    assert not done and (await server.get_stats())["paused"] is True  # held while paused, on any machine
    await server.resume_generation()
    assert (await waiting).samples[0].request_id == "paused"

    # An in-flight request (many steps) is aborted in the engine; its caller gets an error, nothing hangs.
    long = asyncio.ensure_future(server.generate("long", PROMPT, {"seed": 2, "num_inference_steps": 400}))
    while not server._inflight:
        await asyncio.sleep(0.01)
    await server.abort_all_requests(reject_request=True)
    with pytest.raises(RuntimeError):
        await long
    with pytest.raises(RuntimeError, match="rejected"):
        await server.generate("rejected", PROMPT, {"seed": 2})
    await server.resume_generation()
    assert (await one(server, "after", PROMPT, {"seed": 2}))[0].image.shape == (3, 64, 64)


async def test_ode_sampling_records_nothing(server):
    params = {"seed": 1, "noise_level": 0.0, "guidance_scale": 1.0, "record_noise": True}
    out, table = await one(server, "ode", PROMPT, params)
    assert out.latents.shape[0] == 0 and out.log_probs.shape == (0,) and out.sigmas.shape == (0,)
    assert out.noise.shape == out.latents.shape  # no step drew any
    assert out.conditioning is None and table == {} and out.image.shape == (3, 64, 64)


async def test_an_update_waits_for_the_request_in_flight_and_later_requests_wait_for_it(server):
    version = server.version
    first = asyncio.ensure_future(server.generate("first", PROMPT, {"seed": 5, "num_inference_steps": 200}))
    while not server._inflight:
        await asyncio.sleep(0.01)
    update = asyncio.ensure_future(server.update_weights(version=version + 10))
    await asyncio.sleep(0)  # the update holds admission from here on
    later = asyncio.ensure_future(server.generate("later", PROMPT, {"seed": 5}))
    assert (await first).samples[0].model_version == version  # weights change between requests, never during one
    assert await update == version + 10 and (await later).samples[0].model_version == version + 10


async def test_stats_then_close(server):
    stats = await server.get_stats()
    assert stats["device"] == "cpu" and stats["in_flight"] == 0 and stats["requests_served"] >= 10
    assert stats["requests_failed"] >= 1 and stats["generate_calls"] >= stats["requests_served"] // 4
    await server.close()
    server._api = None  # closed: the fixture does not close it again
    with pytest.raises(RuntimeError):
        await server.generate("closed", PROMPT, {"seed": 1})
