"""The ``vllm_omni`` rollout server where the real engine cannot be used here.

The real engine (vllm-omni on vLLM's CPU build) is tested in tests/vllm_omni_engine (`make test-vllm-omni`): generation,
groups, trajectories, LoRA, abort, stats, close and the recipe. This file keeps, without vllm-omni installed:
pure functions (request building, engine options, the LoRA scaling fold, RPC result checks), the answers a real
engine gives only when something is wrong (a stock pipeline's output without a trajectory, another schedule), and
what vLLM's CPU build cannot do at all: full-weight updates through the worker extension and sleep mode (GPU only).
For those the server runs against :class:`FakeAsyncOmni`, a double of vllm-omni's ``AsyncOmni`` that answers the
way verl-omni's custom pipeline does (the project's one SDE loop with a toy velocity, packed with the same protocol
functions). The GPU engine test at the end runs only on a CUDA machine with a checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from verl_omni.pipelines.flow_match_sde import SDETrajectory, sample_sde_trajectory
from verl_omni.pipelines.sd3.sampling import scheduler_sigmas
from verl_omni.pipelines.vllm_omni_protocol import (
    EXTRA_ARGS_KEY,
    LOAD_WEIGHTS_METHOD,
    WORKER_EXTENSION,
    FlowGRPOArgs,
    check_rpc_results,
    pack_trajectory,
)
from verl_omni.workers.rollout.backends import missing_vllm_omni_modules
from verl_omni.workers.rollout.vllm_omni_server import (
    VllmOmniRolloutServer,
    engine_kwargs,
    unit_scaled_lora,
)

SIZE = 16  # pixels; the fake checkpoint's VAE scale factor is 2, so latents are (4, 8, 8)
STEPS = {"num_inference_steps": 4}


def toy_velocity(x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, *negative: Any):
    """Stands in for the SD3 transformer: depends on the latents, the noise level and the conditioning."""
    return -x * (1.0 - sigma) + pooled.mean(dim=1).view(-1, 1, 1, 1)


def write_checkpoint(root: Path, pipeline_class: str = "StableDiffusion3Pipeline") -> Path:
    """The JSON configs of a diffusers-format checkpoint (no weights): all the server reads itself."""
    components = {
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    configs = {
        "transformer/config.json": {"patch_size": 2, "sample_size": 8, "in_channels": 4, "pos_embed_max_size": 16},
        "vae/config.json": {"block_out_channels": [4, 4], "latent_channels": 4},
        "scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
    }
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class, **components}))
    for name in components:
        (root / name).mkdir()
    for rel, cfg in configs.items():
        (root / rel).write_text(json.dumps(cfg))
    return root


class FakeAsyncOmni:
    """A double of vllm-omni's ``AsyncOmni`` (vllm-omni needs CUDA) that behaves like it with our custom pipeline.

    ``hold`` (an ``asyncio.Event``) keeps every request in flight until set. ``mode`` = ``"stock"`` answers as
    vllm-omni's stock SD3 pipeline (an image, no trajectory); ``"bad_timesteps"`` shifts the timesteps;
    ``"no_noise"`` / ``"bad_noise"`` drop / cut the noise a request asked for. ``trajectories``: each answer's.
    """

    def __init__(self, model_path: str, kwargs: dict[str, Any]):  # noqa: D107
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model_path, self.kwargs = model_path, kwargs
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler")
        self.requests: list[tuple[Any, Any, str]] = []
        self.calls: list[tuple] = []
        self.aborted: set[str] = set()
        self.trajectories: list[SDETrajectory] = []
        self.hold: asyncio.Event | None = None
        self.mode = "pipeline"

    async def generate(self, prompt: dict, sampling_params: Any, request_id: str = ""):
        self.requests.append((prompt, sampling_params, request_id))
        if self.hold is not None:
            await self.hold.wait()
        if request_id in self.aborted:
            yield SimpleNamespace(request_id=request_id, images=[], error="aborted")
            return
        sp = sampling_params
        args = FlowGRPOArgs.from_extra_args(sp.extra_args)
        sigmas = scheduler_sigmas(self.scheduler, sp.num_inference_steps, sp.height, sp.width, 2, 2)
        seed = torch.Generator().manual_seed(sp.seed)
        embeds, pooled = torch.randn(1, 3, 8, generator=seed), torch.randn(1, 6, generator=seed)
        negative = (torch.zeros(1, 3, 8), torch.zeros(1, 6)) if sp.guidance_scale > 1 else (None, None)
        traj = sample_sde_trajectory(
            toy_velocity,
            sigmas,
            [embeds, pooled, *negative],
            [torch.Generator().manual_seed(sp.seed)],
            (4, sp.height // 2, sp.width // 2),
            noise_level=args.noise_level,
            sde_window=args.sde_window,
            chunk_size=args.chunk_size,
        )
        cond = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
        neg = None if negative[0] is None else {"prompt_embeds": negative[0][0], "pooled_prompt_embeds": negative[1][0]}
        self.trajectories.append(traj)
        fields = pack_trajectory(traj, 0, cond, neg, record_noise=args.record_noise)
        if self.mode == "stock":
            fields = {"trajectory_latents": None, "trajectory_timesteps": None, "trajectory_log_probs": None}
        elif self.mode == "bad_timesteps":
            fields["trajectory_timesteps"] = fields["trajectory_timesteps"] + 1.0
        elif self.mode == "no_noise":
            del fields["trajectory_latents"]["noise"]
        elif self.mode == "bad_noise":
            fields["trajectory_latents"]["noise"] = fields["trajectory_latents"]["noise"][1:]
        image = Image.fromarray(np.full((sp.height, sp.width, 3), sp.seed % 256, dtype=np.uint8))
        yield SimpleNamespace(request_id=request_id, images=[image], **fields)

    async def abort(self, request_ids: list[str]) -> None:
        self.calls.append(("abort", tuple(request_ids)))
        self.aborted.update(request_ids)

    async def add_lora(self, lora_request: Any) -> bool:
        self.calls.append(("add_lora", lora_request))
        return True

    async def remove_lora(self, adapter_id: int) -> bool:
        self.calls.append(("remove_lora", adapter_id))
        return True

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (), kwargs=None):
        self.calls.append(("collective_rpc", method, args))
        if self.mode == "rpc_fails":  # as vllm-omni reports a worker call that raised
            return [{"supported": False, "error": "Attempted to load weight into parameter"}]
        return [len(args[0])]

    async def sleep(self, level: int = 2) -> list:
        self.calls.append(("sleep", level))
        return []

    async def wake_up(self) -> list:
        self.calls.append(("wake_up",))
        return []

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))


class SamplingParams(SimpleNamespace):
    """Stands in for ``OmniDiffusionSamplingParams`` (a keyword-constructed dataclass)."""


class LoRARequest(SimpleNamespace):
    """Stands in for verl's ``TensorLoRARequest`` (lora_name, lora_int_id, lora_path, peft_config, lora_tensors)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "sd3"))


@pytest.fixture
def make_server(checkpoint):
    def make(**config: Any) -> VllmOmniRolloutServer:
        def factory(model_path: str, kwargs: dict[str, Any]) -> SimpleNamespace:
            return SimpleNamespace(
                engine=FakeAsyncOmni(model_path, kwargs),
                sampling_params_cls=SamplingParams,
                lora_request_cls=LoRARequest,
            )

        device = config.pop("device", "cuda")
        return VllmOmniRolloutServer(
            checkpoint, {"chunk_size": 2, **config}, "vo-0", device=device, engine_factory=factory
        )

    return make


# ----- requests --------------------------------------------------------------------------------------


async def test_a_request_becomes_one_vllm_omni_request_with_the_flowgrpo_knobs(make_server, checkpoint):
    server = make_server(negative_prompt="blurry", max_sequence_length=77)
    await server.generate("r1", "a cat", {"seed": 7, "sde_window": [1, 3], "guidance_scale": 5.0, **STEPS})
    ((prompt, sp, engine_id),) = server.engine.requests
    assert prompt == {"prompt": "a cat", "negative_prompt": "blurry"}
    assert engine_id.startswith("r1-") and engine_id != "r1"  # unique in the engine, the caller's id reported
    assert (sp.num_inference_steps, sp.guidance_scale, sp.seed, sp.height, sp.width) == (4, 5.0, 7, SIZE, SIZE)
    assert sp.max_sequence_length == 77 and sp.num_outputs_per_prompt == 1 and sp.return_trajectory_latents
    assert sp.extra_args == {
        EXTRA_ARGS_KEY: {
            "noise_level": 0.7,
            "sde_window": [1, 3],
            "chunk_size": 2,
            "sde_type": "sde",
            "record_noise": False,
        }
    }
    assert not hasattr(sp, "lora_request")
    kwargs = server.engine.kwargs
    assert kwargs["custom_pipeline_args"] == {
        "pipeline_class": "verl_omni.pipelines.sd3.vllm_omni_pipeline.SD3FlowGRPOPipeline"
    }
    assert kwargs["worker_extension_cls"] == WORKER_EXTENSION and kwargs["enable_sleep_mode"] is True
    assert kwargs["dtype"] == "bfloat16" and server.engine.model_path == str(Path(checkpoint).resolve())


def test_auto_dtype_is_float32_on_cpu_as_the_trainer_computes(make_server):
    """vLLM's default on CPU is bfloat16: with it the recipe's first-step ratio was 3.6e-3 off (float32: 2e-7)."""
    assert make_server(device="cpu").engine.kwargs["dtype"] == "float32"
    assert make_server(device="cuda").engine.kwargs["dtype"] == "bfloat16"  # the rollout's dtype, else bf16
    assert make_server(device="cpu", dtype="bfloat16").engine.kwargs["dtype"] == "bfloat16"


def test_an_engine_that_lost_a_port_race_is_started_again(checkpoint):
    """Two replicas starting together can race for vllm-omni's torch.distributed port (seen once on CPU)."""
    attempts = []

    def factory(model_path: str, kwargs: dict[str, Any]) -> SimpleNamespace:
        attempts.append(model_path)
        if len(attempts) == 1:
            raise RuntimeError("Orchestrator initialization failed: ... code: -98, name: EADDRINUSE, message: ...")
        return SimpleNamespace(engine=FakeAsyncOmni(model_path, kwargs), sampling_params_cls=SamplingParams)

    assert VllmOmniRolloutServer(checkpoint, engine_factory=factory).engine is not None and len(attempts) == 2
    with pytest.raises(ValueError, match="another error"):  # anything else is not retried
        VllmOmniRolloutServer(checkpoint, engine_factory=lambda *_: (_ for _ in ()).throw(ValueError("another error")))


def test_engine_options():
    from verl_omni.workers.config.diffusion import DiffusionRolloutConfig

    kwargs = engine_kwargs("pkg.Pipe", "bfloat16", DiffusionRolloutConfig(admission_window_ms=25), "cuda")
    assert (
        kwargs["request_batch_max_wait_ms"] == 25.0 and kwargs["custom_pipeline_args"]["pipeline_class"] == "pkg.Pipe"
    )
    assert kwargs["max_num_seqs"] == 16 and kwargs["enable_sleep_mode"] is True
    # vLLM's CPU build has no cumem allocator: sleep mode would fail the engine's start-up.
    assert engine_kwargs("pkg.Pipe", "float32", DiffusionRolloutConfig(), "cpu")["enable_sleep_mode"] is False


@pytest.mark.parametrize(
    ("call", "match"),
    [
        ({"sampling_params": {"temperature": 1.0}}, "unknown sampling_params field"),
        ({"sampling_params": {"height": 18}}, "sampling_params.height=18 is not a multiple of 4"),
        ({"sampling_params": {"sde_window": [3, 12]}}, "sampling_params.sde_window=.* is outside the schedule"),
        ({"image_data": [object()]}, "image_data=list is not supported: the vllm_omni backend"),
        ({"top_k": 3}, "unexpected argument"),
    ],
)
async def test_bad_requests_fail_before_reaching_the_engine(make_server, call, match):
    server = make_server()
    kwargs = {"request_id": "r", "prompt_ids": "a cat", "sampling_params": STEPS, **call}
    with pytest.raises(ValueError, match=match):
        await server.generate(**kwargs)
    with pytest.raises(ValueError, match=match):  # one bad request fails the whole group, nothing is sent
        await server.generate_group([{"request_id": "ok", "prompt_ids": "a dog", "sampling_params": STEPS}, kwargs])
    assert server.engine.requests == []


# ----- responses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "match"), [("stock", "carries no FlowGRPO trajectory"), ("bad_timesteps", "not the schedule's")]
)
async def test_outputs_without_a_usable_trajectory_are_errors(make_server, mode, match):
    server = make_server()
    server.engine.mode = mode
    with pytest.raises(RuntimeError, match=match):
        await server.generate("r1", "a cat", STEPS)
    assert (await server.get_stats())["requests_failed"] == 1


async def test_record_noise_returns_the_samplers_draws(make_server):
    server = make_server()
    plain = (await server.generate("plain", "a cat", {"seed": 3, **STEPS})).samples[0]
    noisy = (await server.generate("noisy", "a cat", {"seed": 3, "record_noise": True, **STEPS})).samples[0]
    assert plain.noise is None and torch.equal(noisy.latents, plain.latents)  # asking for it changes no sample
    assert [sp.extra_args[EXTRA_ARGS_KEY]["record_noise"] for _, sp, _ in server.engine.requests] == [False, True]
    plain_traj, noisy_traj = server.engine.trajectories
    assert noisy.noise.shape == (4, 4, 8, 8) and torch.equal(noisy.noise, noisy_traj.noise[0])
    assert "noise" not in pack_trajectory(plain_traj, 0, {}, None, record_noise=False)["trajectory_latents"]
    ode = await server.generate("ode", "a cat", {"seed": 3, "record_noise": True, "noise_level": 0.0, **STEPS})
    assert ode.samples[0].noise.shape == (0, 4, 8, 8)  # nothing recorded, as the latents


@pytest.mark.parametrize(("mode", "got"), [("no_noise", "no noise"), ("bad_noise", r"noise of shape \(3, 4, 8, 8\)")])
async def test_noise_asked_for_and_not_returned_is_an_error(make_server, mode, got):
    server = make_server()
    server.engine.mode = mode
    with pytest.raises(
        RuntimeError, match=rf"request 'r1' set record_noise and returned {got}; .* need \(4, 4, 8, 8\)"
    ):
        await server.generate("r1", "a cat", {"seed": 3, "record_noise": True, **STEPS})


# ----- weights ---------------------------------------------------------------------------------------


async def test_full_weights_go_to_every_worker_through_the_extension(make_server):
    """GPU only (vLLM's CPU layers repack their weights; the CPU server refuses: tests/vllm_omni_engine)."""
    server = make_server()
    state = {"pos_embed.proj.weight": torch.zeros(3)}
    assert await server.update_weights(state_dict=state) == 1
    assert server.engine.calls == [("collective_rpc", LOAD_WEIGHTS_METHOD, (state,))]


async def test_a_failed_full_weight_update_raises_and_keeps_the_version(make_server):
    """vllm-omni answers a worker call that raised with a result, not an exception: the server must look."""
    server = make_server()
    server.engine.mode = "rpc_fails"
    with pytest.raises(RuntimeError, match=r"vo-0: collective_rpc\('verl_omni_load_transformer_weights'\) failed"):
        await server.update_weights(state_dict={"pos_embed.proj.weight": torch.zeros(3)})
    assert server.version == 0


def test_rpc_results_are_checked():
    assert check_rpc_results([[True], 3], "m", "r0") == [[True], 3]
    for bad in ([{"supported": False, "error": "boom"}], [{"todo": True}], [SimpleNamespace(status="FAILED")]):
        with pytest.raises(RuntimeError, match=r"r0: collective_rpc\('m'\) failed: stage 0"):
            check_rpc_results(bad, "m", "r0")


def test_lora_scaling_is_folded_into_lora_b():
    lora = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)}
    tensors, config = unit_scaled_lora(lora, {"r": 2, "lora_alpha": 4, "target_modules": ["a"]})
    assert config == {"r": 2, "lora_alpha": 2, "use_rslora": False, "target_modules": ["a"]}
    assert torch.equal(tensors["a.lora_A.weight"], lora["a.lora_A.weight"])
    assert torch.equal(tensors["a.lora_B.weight"], 2 * lora["a.lora_B.weight"])  # alpha / r
    tensors, _ = unit_scaled_lora(lora, {"r": 4, "lora_alpha": 4, "use_rslora": True})
    assert torch.equal(tensors["a.lora_B.weight"], 2 * lora["a.lora_B.weight"])  # alpha / sqrt(r)
    with pytest.raises(ValueError, match="alpha_pattern"):
        unit_scaled_lora(lora, {"r": 2, "alpha_pattern": {"a": 8}})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "update_weights needs state_dict"),
        ({"version": True}, "version=True must be an integer"),
        ({"lora_config": {"r": 2}}, "lora_config without lora_state_dict"),
        ({"lora_state_dict": {"a.lora_A.weight": torch.ones(1)}}, "no LoRA adapter is loaded: pass lora_config"),
    ],
)
async def test_bad_weight_updates_are_refused(make_server, kwargs, match):
    server = make_server()
    with pytest.raises(ValueError, match=match):
        await server.update_weights(**kwargs)
    assert server.engine.calls == [] and server.version == 0


# ----- control ---------------------------------------------------------------------------------------


async def test_sleep_offloads_and_an_update_wakes_the_engine(make_server):
    """GPU only: sleep mode needs vLLM's cumem allocator (off on CPU, with a log line: tests/vllm_omni_engine)."""
    server = make_server()
    await server.sleep()
    await server.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="asleep: call wake_up"):
        await server.generate("r", "a cat", STEPS)
    await server.update_weights(version=1)
    await server.sleep()
    await server.wake_up()
    assert [c[0] for c in server.engine.calls] == ["sleep", "wake_up", "sleep", "wake_up"]
    assert server.engine.calls[0] == ("sleep", 1)
    info, stats = await server.ready(), await server.get_stats()
    assert info["backend"] == "vllm_omni" and info["model_version"] == 1 and info["default_height"] == SIZE
    assert stats["sleeping"] is False and stats["in_flight"] == 0 and stats["chunk_size"] == 2
    await server.close()
    assert server.engine.calls[-1] == ("shutdown",)


def test_start_up_errors_name_the_problem(make_server, tmp_path):
    with pytest.raises(ValueError, match="device='tpu' is not a device of the vllm_omni rollout backend; valid"):
        VllmOmniRolloutServer(str(write_checkpoint(tmp_path / "a")), device="tpu")
    sdxl = write_checkpoint(tmp_path / "sdxl", "StableDiffusionXLPipeline")
    with pytest.raises(ValueError, match=r"'StableDiffusionXLPipeline' pipeline.*valid choices: StableDiffusion3Pipel"):
        VllmOmniRolloutServer(str(sdxl))


def test_the_replica_is_registered_and_placed_like_the_diffusers_one(monkeypatch):
    import ray
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
    from verl_omni.workers.rollout.backends import register_rollout_backends
    from verl_omni.workers.rollout.vllm_omni_replica import VllmOmniRolloutReplica

    register_rollout_backends()
    assert RolloutReplicaRegistry.get("vllm_omni") is VllmOmniRolloutReplica
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    replica = SimpleNamespace(diffusion_config=DiffusionRolloutConfig(num_gpus_per_replica=0.5))
    assert VllmOmniRolloutReplica.placement(replica) == ("cpu", 0.0)  # vLLM's CPU build
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    assert VllmOmniRolloutReplica.placement(replica) == ("cuda", 0.5)


# ----- the real engine (GPU only) --------------------------------------------------------------------

GPU_MODEL = os.environ.get("VERL_OMNI_VLLM_OMNI_TEST_MODEL")


@pytest.mark.skipif(
    not torch.cuda.is_available() or bool(missing_vllm_omni_modules()) or not GPU_MODEL,
    reason="GPU only (the CPU engine runs in tests/vllm_omni_engine): needs CUDA, `pip install -e .[vllm-omni]` and "
    "VERL_OMNI_VLLM_OMNI_TEST_MODEL=<SD3 checkpoint dir>",
)
async def test_real_engine_returns_a_recomputable_trajectory():
    server = VllmOmniRolloutServer(GPU_MODEL, {"num_inference_steps": 4, "height": 256, "width": 256})
    try:
        group = await server.generate_group(
            [{"request_id": f"r{i}", "prompt_ids": "a red apple", "sampling_params": {"seed": i}} for i in range(2)]
        )
        outs = group.samples
        for out in outs:
            assert (
                out.image.shape == (3, 256, 256) and out.log_probs.shape == (4,) and torch.isfinite(out.log_probs).all()
            )
            assert out.conditioning in group.conditioning and out.latents.shape[0] == 5
        assert not torch.equal(outs[0].image, outs[1].image)
    finally:
        await server.close()
