"""The ``diffusers`` rollout backend: server batching, prompt cache, weight updates, bad input, and two
replicas launched through ``OmniLLMServerManager`` on a local CPU Ray.

In-process tests drive ``DiffusersRolloutServer`` directly (same code the actor runs). Bit-identity of
batched and lone requests is checked on the Ray actors: it needs ``MKL_CBWR`` set before MKL loads,
which the replica does for its actors' processes.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import ray
import torch
from hydra import compose, initialize_config_module

from verl_omni.models.tiny_sd3 import ensure_tiny_sd3
from verl_omni.protocol import Sample, SampleGroup
from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer
from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerClient, OmniLLMServerManager

PROMPT = "a photo of a cat"
FAST = {"num_inference_steps": 4}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(ensure_tiny_sd3(tmp_path_factory.mktemp("models"), seed=0))


@pytest.fixture
async def make_server(tiny_dir):
    servers: list[DiffusersRolloutServer] = []

    def make(**config) -> DiffusersRolloutServer:
        server = DiffusersRolloutServer(tiny_dir, {"admission_window_ms": 50, **config}, server_id="test-server")
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


async def _sample(server, *args, **kwargs) -> Sample:
    """``generate``'s one sample (the server answers with a group of one)."""
    group = await server.generate(*args, **kwargs)
    assert isinstance(group, SampleGroup) and len(group.samples) == 1
    return group.samples[0]


async def _gather(server, n, prompt=PROMPT, seed0=0, **params):
    return await asyncio.gather(
        *[_sample(server, f"r{seed0 + i}", prompt, {"seed": seed0 + i, **FAST, **params}) for i in range(n)]
    )


# ----- in-process server ---------------------------------------------------------------------------


async def test_concurrent_requests_fuse_and_the_prompt_is_encoded_once(make_server):
    server = make_server(guidance_scale=4.5)
    outs = await _gather(server, 8)
    out = outs[0]
    assert out.image.dtype == torch.uint8 and out.image.shape == (3, 64, 64)
    assert out.latents.shape == (5, 4, 8, 8) and out.sigmas.shape == (5,)  # x and sigma before each step, then after
    assert out.log_probs.shape == (4,)
    assert out.conditioning == PROMPT and out.negative_conditioning == ""  # keys of the group's conditioning
    for o in outs:
        ef = o.extra_fields
        assert ef["server_id"] == "test-server" and ef["batch_size"] == 8
        assert ef["global_steps"] == o.model_version == 0
        assert ef["queue_s"] >= 0 and ef["generate_s"] > 0
    # The first request of the batch encoded the prompt; the other seven reused it.
    assert [o.extra_fields["cache_hit"] for o in outs] == [False] + [True] * 7
    assert len({o.extra_fields["seed"] for o in outs}) == 8
    assert len({o.image.numpy().tobytes() for o in outs}) == 8  # different seeds, different images

    stats = await server.get_stats()
    assert stats["batches"] == 1 and stats["max_batch_size"] == 8 and stats["mean_batch_size"] == 8
    assert stats["texts_encoded"] == 2  # the prompt and the shared negative prompt, once each
    assert stats["prompt_cache"]["misses"] == 2 and stats["prompt_cache"]["hits"] == 14

    again = await _sample(server, "later", PROMPT, {"seed": 99, **FAST})
    assert again.extra_fields["cache_hit"] is True and again.extra_fields["batch_size"] == 1
    stats = await server.get_stats()
    assert stats["texts_encoded"] == 2 and stats["requests_served"] == 9 and stats["batches"] == 2


async def test_without_cache_every_request_encodes_its_prompts(make_server):
    server = make_server(guidance_scale=4.5, prompt_cache_size=0)
    await _gather(server, 4)
    stats = await server.get_stats()
    assert stats["texts_encoded"] == 8 and stats["prompt_cache"]["hits"] == 0 and stats["prompt_cache"]["size"] == 0


async def test_prompt_cache_is_lru(make_server):
    server = make_server(guidance_scale=1.0, prompt_cache_size=1)
    for prompt in ("a cat", "a dog", "a cat"):
        out = await _sample(server, prompt, prompt, {"seed": 0, **FAST})
        assert out.extra_fields["cache_hit"] is False and out.negative_conditioning is None
    assert (await _sample(server, "x", "a cat", {"seed": 0, **FAST})).extra_fields["cache_hit"] is True
    stats = await server.get_stats()
    assert stats["texts_encoded"] == 3 and stats["prompt_cache"]["evictions"] == 2


async def test_token_ids_and_text_share_one_encoding(make_server):
    server = make_server()
    text_out = await _sample(server, "t", PROMPT, {"seed": 1, **FAST})
    ids = server.engine.pipe.tokenizer(PROMPT).input_ids
    ids_out = await _sample(server, "i", ids, {"seed": 1, **FAST})
    assert ids_out.extra_fields["cache_hit"] is True
    assert torch.equal(ids_out.image, text_out.image)  # both ran alone: same inputs, same image


async def test_incompatible_requests_are_not_fused_and_the_cap_holds(make_server):
    server = make_server(max_num_seqs=3, chunk_size=3)
    four = [_sample(server, f"a{i}", PROMPT, {"seed": i, "num_inference_steps": 4}) for i in range(5)]
    three = [_sample(server, f"b{i}", PROMPT, {"seed": i, "num_inference_steps": 3}) for i in range(2)]
    outs = await asyncio.gather(*four, *three)
    assert sorted(o.extra_fields["batch_size"] for o in outs[:5]) == [2, 2, 3, 3, 3]
    assert [o.extra_fields["batch_size"] for o in outs[5:]] == [2, 2]
    assert [o.log_probs.shape[0] for o in outs] == [4] * 5 + [3] * 2
    stats = await server.get_stats()
    assert stats["batch_size_histogram"] == {2: 2, 3: 1} and stats["max_batch_size"] == 3


def _group(prefix: str, seeds: range, prompt: str = PROMPT, **params) -> list[dict]:
    return [
        {"request_id": f"{prefix}{s}", "prompt_ids": prompt, "sampling_params": {"seed": s, **FAST, **params}}
        for s in seeds
    ]


async def test_a_group_fuses_with_other_pending_requests_and_comes_back_in_order(make_server):
    server = make_server(guidance_scale=1.0)
    group = server.generate_group(_group("g", range(3)))
    singles = [_sample(server, f"s{i}", "another prompt", {"seed": 10 + i, **FAST}) for i in range(2)]
    group, *single_outs = await asyncio.gather(group, *singles)
    outs = group.samples
    assert [o.request_id for o in outs] == ["g0", "g1", "g2"]
    # the group's conditioning comes back once, not per copy: one prompt, no CFG negative
    assert list(group.conditioning) == [PROMPT] and {o.conditioning for o in outs} == {PROMPT}
    assert set(group.conditioning[PROMPT]) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert [o.extra_fields["seed"] for o in outs] == [0, 1, 2]
    assert {o.extra_fields["batch_size"] for o in [*outs, *single_outs]} == {5}  # one fused run of all five
    assert [o.extra_fields["cache_hit"] for o in outs] == [False, True, True]  # the group's prompt encoded once
    stats = await server.get_stats()
    assert stats["batches"] == 1 and stats["requests_served"] == 5 and stats["generate_calls"] == 3


async def test_a_group_larger_than_max_num_seqs_is_split_and_keeps_its_order(make_server):
    server = make_server(max_num_seqs=3, chunk_size=3)
    group = await server.generate_group(_group("g", range(5)))
    outs = group.samples
    assert [o.request_id for o in outs] == [f"g{i}" for i in range(5)]
    assert list(group.conditioning) == [PROMPT, ""]  # two batches, one entry per distinct text
    assert [o.extra_fields["batch_size"] for o in outs] == [3, 3, 3, 2, 2]
    assert (await server.get_stats())["batch_size_histogram"] == {2: 1, 3: 1}
    assert (await server.generate_group([])).samples == []


def _record_rows(engine, calls: dict[str, list[int]]) -> None:
    """Record the rows (first dim of the first tensor input) of every call of each network of the pipeline."""

    def hook(name):
        def record(module, args, kwargs):
            first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
            calls.setdefault(name, []).append(first.shape[0])

        return record

    pipe = engine.pipe
    networks = {"transformer": pipe.transformer, "vae_decoder": pipe.vae.decoder}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        networks[name] = getattr(pipe, name)
    for name, module in networks.items():
        module.register_forward_pre_hook(hook(name), with_kwargs=True)


@pytest.mark.parametrize("batch_invariant", [True, False])
async def test_batch_invariant_mode_runs_every_network_at_the_chunk_shape(make_server, batch_invariant):
    """6 requests with CFG and no prompt cache: 12 texts, 6 latents. Invariant mode: each encoder and the VAE
    see chunks of exactly 4, the transformer [negative; positive] of a chunk (8 rows); free: whole batches."""
    server = make_server(guidance_scale=4.5, prompt_cache_size=0, chunk_size=4, batch_invariant=batch_invariant)
    calls: dict[str, list[int]] = {}
    _record_rows(server.engine, calls)
    outs = await _gather(server, 6)
    assert {o.extra_fields["batch_size"] for o in outs} == {6}
    if batch_invariant:
        expected = {"text_encoder": [4] * 3, "transformer": [8] * 2 * 4, "vae_decoder": [4] * 2}
    else:
        expected = {"text_encoder": [12], "transformer": [12] * 4, "vae_decoder": [6]}
    for name in ("text_encoder_2", "text_encoder_3"):
        expected[name] = expected["text_encoder"]
    assert calls == expected


async def test_one_bad_request_fails_its_group_before_anything_is_queued(make_server):
    server = make_server()
    bad = _group("g", range(3))
    bad[2]["sampling_params"]["num_inference_steps"] = 0
    with pytest.raises(ValueError, match=r"num_inference_steps=0"):
        await server.generate_group(bad)
    with pytest.raises(ValueError, match=r"routing_key='u'"):
        await server.generate_group([{**_group("h", range(1))[0], "routing_key": "u"}])
    stats = await server.get_stats()
    assert stats["pending"] == 0 and stats["requests_served"] == 0 and stats["generate_calls"] == 0


async def test_sde_window_and_ode_requests(make_server):
    server = make_server()
    windowed = await _sample(server, "w", PROMPT, {"seed": 0, "num_inference_steps": 6, "sde_window": [1, 4]})
    assert windowed.latents.shape[0] == 4 and windowed.extra_fields["sde_step_indices"] == [1, 2, 3]
    ode_group = await server.generate("o", PROMPT, {"seed": 0, "num_inference_steps": 6, "noise_level": 0.0})
    ode = ode_group.samples[0]
    assert ode.latents.shape[0] == 0 and ode.log_probs.shape == (0,) and ode.extra_fields["sde_step_indices"] == []
    # the conditioning comes back only with recorded steps (the trainer recomputes those)
    assert windowed.conditioning == PROMPT
    assert ode.conditioning is None and ode_group.conditioning == {}


async def test_full_state_dict_update_changes_output_and_bumps_version(make_server):
    server = make_server()
    before = await _sample(server, "a", PROMPT, {"seed": 5, **FAST})
    original = {k: v.clone() for k, v in server.engine.transformer.state_dict().items()}
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    assert await server.update_weights(state_dict=perturbed) == 1
    after = await _sample(server, "b", PROMPT, {"seed": 5, **FAST})
    assert after.model_version == after.extra_fields["global_steps"] == 1
    assert not torch.equal(after.image, before.image)

    assert await server.update_weights(state_dict=original, version=7) == 7
    restored = await _sample(server, "c", PROMPT, {"seed": 5, **FAST})
    assert restored.model_version == 7 and torch.equal(restored.image, before.image)
    assert (await server.get_stats())["model_version"] == 7

    with pytest.raises(ValueError, match="not_a_weight"):
        await server.update_weights(state_dict={"not_a_weight": torch.zeros(1)})
    key = next(iter(original))
    with pytest.raises(ValueError, match="shape"):
        await server.update_weights(state_dict={key: torch.zeros(3, 3, 3, 3, 3)})


async def test_lora_adapter_update(make_server, tiny_dir):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    server = make_server()
    base = await _sample(server, "a", PROMPT, {"seed": 3, **FAST})
    lora_config = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}

    # The trainer's side: the same base transformer with a peft adapter, exported as peft does.
    trainer_model = SD3Transformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    trainer_model.add_adapter(LoraConfig(**lora_config))
    zero_adapter = get_peft_model_state_dict(trainer_model)  # lora_B starts at zero: the identity
    assert await server.update_weights(lora_state_dict=zero_adapter, lora_config=lora_config) == 1
    same = await _sample(server, "b", PROMPT, {"seed": 3, **FAST})
    assert same.model_version == 1 and torch.equal(same.image, base.image)

    trained = {k: (torch.randn_like(v) * 0.5 if "lora_B" in k else v) for k, v in zero_adapter.items()}
    assert await server.update_weights(lora_state_dict=trained) == 2  # config already loaded
    changed = await _sample(server, "c", PROMPT, {"seed": 3, **FAST})
    assert changed.model_version == 2 and not torch.equal(changed.image, base.image)

    # A new adapter shape (config as the trainer's OmegaConf section) replaces the old adapter.
    from omegaconf import OmegaConf

    smaller = SD3Transformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    smaller.add_adapter(LoraConfig(**{**lora_config, "r": 2}))
    section = OmegaConf.create({**lora_config, "r": 2})
    assert await server.update_weights(lora_state_dict=get_peft_model_state_dict(smaller), lora_config=section) == 3
    assert torch.equal((await _sample(server, "d", PROMPT, {"seed": 3, **FAST})).image, base.image)

    with pytest.raises(ValueError, match=r"lora_config=\{'rank': 4\} is not a peft LoraConfig"):
        await server.update_weights(lora_config={"rank": 4})
    with pytest.raises(ValueError, match="lora_config"):
        await make_server().update_weights(lora_state_dict=trained)


@pytest.mark.parametrize(
    ("kwargs", "params", "match"),
    [
        ({"routing_key": "g0"}, {}, r"routing_key='g0'"),
        ({}, {"temperature": 1.0}, r"temperature=1\.0"),
        ({}, {"num_inference_steps": 0}, r"num_inference_steps=0"),
        ({}, {"num_inference_steps": 10, "sde_window": [0, 11]}, r"sde_window=\[0, 11\] is outside the schedule"),
        ({}, {"height": 72}, r"height=72 is not a multiple of 16"),
        ({}, {"width": 4096}, r"width=4096 exceeds"),
        ({}, {"seed": -1}, r"seed=-1"),
        ({}, {"guidance_scale": "high"}, r"guidance_scale='high'"),
        ({"image_data": ["img"]}, {}, r"image_data=list is not supported"),
    ],
)
async def test_bad_requests_raise_value_error_naming_the_field(make_server, kwargs, params, match):
    server = make_server()
    with pytest.raises(ValueError, match=match):
        await _sample(server, "bad", PROMPT, params, **kwargs)
    ok = await asyncio.wait_for(_sample(server, "ok", PROMPT, {"seed": 0, **FAST}), timeout=30)
    assert ok.image.shape == (3, 64, 64)  # the server is still serving


async def test_abort_holds_requests_until_resume_and_reject_fails_them(make_server):
    server = make_server(admission_window_ms=0)
    await server.abort_all_requests()
    held = asyncio.ensure_future(_sample(server, "held", PROMPT, {"seed": 0, **FAST}))
    await asyncio.sleep(0.2)
    assert not held.done() and (await server.get_stats())["pending"] == 1
    await server.resume_generation()
    assert (await asyncio.wait_for(held, timeout=30)).request_id == "held"

    await server.abort_all_requests()
    queued = asyncio.ensure_future(_sample(server, "queued", PROMPT, {"seed": 0, **FAST}))
    await asyncio.sleep(0.05)
    await server.abort_all_requests(reject_request=True)
    with pytest.raises(RuntimeError, match="rejected"):
        await queued
    with pytest.raises(RuntimeError, match="rejected"):
        await _sample(server, "new", PROMPT, {"seed": 0, **FAST})
    await server.resume_generation()
    assert (await _sample(server, "after", PROMPT, {"seed": 0, **FAST})).image.shape == (3, 64, 64)
    # CPU: memory controls are cheap no-ops that verl's replica may call at any time.
    for method in ("sleep", "wake_up", "clear_kv_cache", "release_kv_cache", "resume_kv_cache", "stop_profile"):
        assert await getattr(server, method)() is None


# ----- replicas on Ray, through OmniLLMServerManager and OmniLLMServerClient ----------------------


def _trainer_config(model_path: str, *overrides: str):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose(
            "ppo_trainer",
            overrides=[
                "actor_rollout_ref.rollout.name=diffusers",
                "actor_rollout_ref.rollout.nnodes=1",
                "actor_rollout_ref.rollout.n_gpus_per_node=2",
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                f"actor_rollout_ref.model.path={model_path}",
                "+actor_rollout_ref.rollout.server_routing.policy=prompt_uid_affinity",
                "+actor_rollout_ref.rollout.diffusion.num_inference_steps=4",
                "+actor_rollout_ref.rollout.diffusion.admission_window_ms=100",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def manager(ray_local, tiny_dir):
    manager = OmniLLMServerManager.create(_trainer_config(tiny_dir))
    yield manager
    for replica in manager.get_replicas():
        ray.kill(replica.server_handle)


async def test_two_replicas_serve_concurrent_groups_through_the_client(manager):
    replicas = manager.get_replicas()
    assert [r.server_address for r in replicas] == ["diffusers-replica-0", "diffusers-replica-1"]
    client = manager.get_client()
    assert isinstance(client, OmniLLMServerClient)

    async def one(group: int, copy: int):
        group = await client.generate(
            f"g{group}-{copy}",
            prompt_ids=f"prompt {group}",
            sampling_params={"seed": 100 * group + copy},
            routing_key=f"uid-{group}",
        )
        return group.samples[0]

    outs = await asyncio.wait_for(asyncio.gather(*[one(g, c) for g in range(4) for c in range(4)]), timeout=120)
    servers_by_group = {}
    for (g, _c), out in zip([(g, c) for g in range(4) for c in range(4)], outs, strict=True):
        servers_by_group.setdefault(g, set()).add(out.extra_fields["server_id"])
        assert out.extra_fields["global_steps"] == 0 and out.image.shape == (3, 64, 64)
    assert all(len(s) == 1 for s in servers_by_group.values())  # each group co-located on one replica
    assert set().union(*servers_by_group.values()) == {"diffusers-replica-0", "diffusers-replica-1"}
    assert max(o.extra_fields["batch_size"] for o in outs) > 1  # co-located copies were fused

    stats = [await r.server_handle.get_stats.remote() for r in replicas]
    assert sum(s["requests_served"] for s in stats) == 16
    assert all(s["batch_invariant"] and s["chunk_size"] == 8 for s in stats)
    assert sum(s["texts_encoded"] for s in stats) == 4 + 2  # 4 prompts once each, "" once per replica
    status = await manager.global_load_balancer.get_status.remote()
    assert status["total_inflight"] == 0

    # The same seed gives the same image (bit for bit) alone or batched, on either replica: batch-invariant mode
    # runs every network call at 8 samples (a lone request is padded), whatever the admission window fused.
    batched = outs[4 * 2 + 3]  # group 2, copy 3: seed 203, ran in a fused batch
    for replica in replicas:
        alone = await replica.server_handle.generate.remote(
            request_id="alone", prompt_ids="prompt 2", sampling_params={"seed": 203}
        )
        alone = alone.samples[0]
        assert alone.extra_fields["batch_size"] == 1
        assert torch.equal(alone.image, batched.image)
        assert torch.equal(alone.log_probs, batched.log_probs)
        assert torch.equal(alone.latents, batched.latents)


async def test_the_balancer_holds_the_replicas_handles_without_loading_torch(manager):
    """Ray imports a server actor's module in every process that receives its handle: the balancer (it holds each
    replica's handle and hands them to clients) stays light because the diffusers server's module loads no torch."""
    status = await manager.global_load_balancer.get_status.remote()
    assert sorted(status["registered_handles"]) == ["diffusers-replica-0", "diffusers-replica-1"]
    watched = ("verl_omni.workers.rollout.diffusers_server", "torch", "diffusers", "verl")
    loaded = await manager.global_load_balancer.__ray_call__.remote(lambda _: [m for m in watched if m in sys.modules])
    assert loaded == ["verl_omni.workers.rollout.diffusers_server"]


async def test_bad_request_error_reaches_the_caller_not_a_hang(manager):
    client = manager.get_client()
    with pytest.raises(ValueError, match=r"temperature=0\.7"):
        await asyncio.wait_for(
            client.generate("bad", prompt_ids=PROMPT, sampling_params={"temperature": 0.7}, routing_key="u"),
            timeout=60,
        )
    for _ in range(50):  # release is fire-and-forget, as in verl
        if (await manager.global_load_balancer.get_status.remote())["total_inflight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await manager.global_load_balancer.get_status.remote())["total_inflight"] == 0


async def test_weight_update_through_the_replica_reaches_later_outputs(manager):
    replica = manager.get_replicas()[0]
    server = replica.server_handle
    before = (await server.generate.remote(request_id="w0", prompt_ids=PROMPT, sampling_params={"seed": 1})).samples[0]
    state = {"proj_out.bias": torch.full((16,), 0.3)}  # a partial update: one known parameter
    assert await server.update_weights.remote(state_dict=state, version=5) == 5
    after = (await server.generate.remote(request_id="w1", prompt_ids=PROMPT, sampling_params={"seed": 1})).samples[0]
    assert after.model_version == 5 and after.extra_fields["global_steps"] == 5
    assert not torch.equal(after.image, before.image)
    await replica.sleep()
    await replica.wake_up()
    await replica.clear_kv_cache()
    await replica.abort_all_requests()
    await replica.resume_generation()


# ----- bad configuration fails before any actor starts -----------------------------------------------


def _bad_model_dir(tmp_path, class_name):
    path = tmp_path / class_name
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(path)


@pytest.mark.parametrize(
    ("path_kind", "match"),
    [
        ("missing", r"actor_rollout_ref\.model\.path='.*nope' is not a directory"),
        ("not_diffusers", r"is not a diffusers pipeline \(no model_index\.json\)"),
        ("sdxl", r"holds a 'StableDiffusionXLPipeline' pipeline"),
    ],
)
def test_bad_model_path_is_rejected_before_replicas_start(tmp_path, path_kind, match):
    path = {
        "missing": str(tmp_path / "nope"),
        "not_diffusers": str(tmp_path),
        "sdxl": _bad_model_dir(tmp_path, "StableDiffusionXLPipeline"),
    }[path_kind]
    with pytest.raises(ValueError, match=match):
        OmniLLMServerManager.create(_trainer_config(path))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("+actor_rollout_ref.rollout.diffusion.height=72", r"actor_rollout_ref\.rollout\.diffusion\.height=72"),
        ("+actor_rollout_ref.rollout.diffusion.sde_window=[0,9]", r"diffusion\.sde_window=\[0, 9\] is outside"),
        ("+actor_rollout_ref.rollout.diffusion.admision_window_ms=5", r"Unknown key\(s\) \['admision_window_ms'\]"),
        ("+actor_rollout_ref.rollout.diffusion.device=tpu", r"diffusion\.device='tpu'"),
    ],
)
def test_bad_diffusion_config_is_rejected_before_replicas_start(tiny_dir, override, match):
    with pytest.raises(ValueError, match=match):
        OmniLLMServerManager.create(_trainer_config(tiny_dir, override))


def test_diffusers_backend_is_registered_and_a_diffusion_only_section_converts(tiny_dir):
    from omegaconf import open_dict
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
    from verl_omni.workers.config.rollout import OmniRolloutConfig, ensure_omni_rollout_target
    from verl_omni.workers.rollout.diffusers_replica import DiffusersRolloutReplica

    assert RolloutReplicaRegistry.get("diffusers") is DiffusersRolloutReplica
    rollout = _trainer_config(tiny_dir).actor_rollout_ref.rollout
    with open_dict(rollout):
        del rollout["server_routing"]  # a stock verl section plus only the diffusion section
    ensure_omni_rollout_target(rollout)
    converted = omega_conf_to_dataclass(rollout)
    assert isinstance(converted, OmniRolloutConfig)
    assert converted.diffusion == DiffusionRolloutConfig(num_inference_steps=4, admission_window_ms=100)


def test_replica_placement_one_gpu_each_when_the_cluster_has_gpus(tiny_dir, monkeypatch):
    """No GPU here: the cluster's resources are faked to check what the replica would ask Ray for."""
    from verl_omni.workers.rollout.diffusers_replica import DiffusersRolloutReplica

    def replica(*overrides):
        cfg = _trainer_config(tiny_dir, *overrides)
        return DiffusersRolloutReplica(1, cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.model, gpus_per_node=2)

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cpu = replica("+actor_rollout_ref.rollout.diffusion.cpu_threads=2")
    assert cpu.server_address == "diffusers-replica-1"
    assert cpu.placement() == ("cpu", 0.0) and not cpu.rollout_worker_use_gpu()
    assert cpu.server_env("cpu")["OMP_NUM_THREADS"] == "2" and cpu.server_env("cpu")["MKL_CBWR"].endswith("STRICT")
    with pytest.raises(ValueError, match=r"diffusion\.device='cuda' but the Ray cluster has no GPUs"):
        replica("+actor_rollout_ref.rollout.diffusion.device=cuda").placement()

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert replica().placement() == ("cuda", 1.0) and replica().server_env("cuda") == {}
    assert replica("+actor_rollout_ref.rollout.diffusion.device=cpu").placement() == ("cpu", 0.0)
    shared = replica("+actor_rollout_ref.rollout.diffusion.num_gpus_per_replica=0.5")
    assert shared.placement() == ("cuda", 0.5)


async def test_requests_that_ask_for_their_noise_get_it_and_still_fuse_with_others(make_server):
    """``record_noise`` changes the reply, not the sampling: such requests share a run with plain ones, get their draws
    (``latents[t + 1]`` minus ``std_dev`` times it is the step's mean: tests/test_flow_match_sde.py) and the same
    trajectory as without; a non-boolean value fails before anything is queued."""
    server = make_server(sde_window=[1, 3])
    asked, plain = await asyncio.gather(
        server.generate_group(_group("n", range(2), record_noise=True)), server.generate_group(_group("p", range(2)))
    )
    assert {o.extra_fields["batch_size"] for o in [*asked.samples, *plain.samples]} == {4}
    for noisy, bare in zip(asked.samples, plain.samples, strict=True):
        assert noisy.noise.shape == (2, *noisy.latents.shape[1:]) and bare.noise is None
        torch.testing.assert_close(noisy.latents, bare.latents, rtol=0, atol=1e-5)  # rows of one run: same inputs
        torch.testing.assert_close(noisy.log_probs, bare.log_probs, rtol=0, atol=1e-5)
        assert noisy.noise.std() > 0.5  # standard-normal draws, not zeros
    with pytest.raises(ValueError, match=r"sampling_params.record_noise='yes' must be true or false"):
        await server.generate_group(_group("b", range(1), record_noise="yes"))
