"""Wan text-to-video on the diffusers backend: the tiny local WanPipeline, FlowGRPO sampling of 5-D video latents
bound to Wan's velocity (true CFG, two passes), the trainer's recompute, frame-count rules, and the server.

All real: the tiny Wan is built with random weights and loaded with ``from_pretrained``; the reference is the stock
``diffusers.WanPipeline``.
"""

from __future__ import annotations

import pytest
import torch

from verl_omni.pipelines.flow_match_sde import sde_step_with_logprob, standard_normal
from verl_omni.pipelines.registry import adapter_path, load_adapter, load_trainer_binding
from verl_omni.pipelines.wan.conditioning import predict_velocity
from verl_omni.pipelines.wan.sampling import compute_log_prob, decode_videos, sample_flow_match_sde, scheduler_sigmas
from verl_omni.utils.batch_invariant import map_chunks
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.rollout.model_spec import ModelSpec
from verl_omni.workers.rollout.sampling_params import resolve_sampling_params

PROMPTS = ["a red car", "a dog", "a blue bird"]
LATENT = (16, 2, 4, 4)  # 5 frames of 32 x 32: (5 - 1) / 4 + 1 latent frames, 8x smaller pixels
CFG = 4.5


@pytest.fixture(scope="module")
def wan_dir(tiny_model):
    return tiny_model("wan")


@pytest.fixture(scope="module")
def pipe(wan_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(wan_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.requires_grad_(False)
    return pipe


def _cond(pipe, prompts):
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
    return {"prompt_embeds": embeds}


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_tiny_wan_is_a_wan_pipeline_the_registry_and_spec_read(pipe, wan_dir):
    assert type(pipe).__name__ == "WanPipeline" and type(pipe.vae).__name__ == "AutoencoderKLWan"
    spec = ModelSpec.from_path(wan_dir)
    # 8x VAE x 2x2 patches: sizes are multiples of 16; 4x in time; the UMT5 tokenizer's length is read
    assert (spec.size_multiple, spec.latent_channels, spec.temporal_scale_factor, spec.t5_max_length) == (16, 16, 4, 16)
    assert (spec.default_num_frames, spec.default_height, spec.default_width) == (81, 480, 832)  # WanPipeline's
    assert spec.latent_shape(32, 32, 5) == LATENT and spec.latent_shape(32, 32) == (16, 4, 4)
    assert load_adapter("WanPipeline", "diffusers").__name__ == "WanDiffusersAdapter"
    assert load_trainer_binding("WanPipeline") is compute_log_prob
    # vllm-omni's Wan22Pipeline subclass (imported only inside vllm-omni's workers)
    assert adapter_path("WanPipeline", "vllm_omni").endswith("wan.vllm_omni_pipeline.WanFlowGRPOPipeline")


def test_frame_counts_the_causal_vae_cannot_take_are_refused(wan_dir, tiny_model):
    spec = ModelSpec.from_path(wan_dir)
    assert [spec.check_num_frames("k", n) for n in (1, 5, 33, 81)] == [1, 5, 33, 81]
    for bad in (0, 4, 6, 32, None, 5.0, True):
        with pytest.raises(ValueError, match=r"^k=.*valid choices: 4k \+ 1 frames \(1, 5, 9, 13, 17, \.\.\.\)$"):
            spec.check_num_frames("k", bad)
    with pytest.raises(ValueError, match=r"^sampling_params\.height=40 is not a multiple of 16"):
        resolve_sampling_params({"height": 40}, DiffusionRolloutConfig(), spec)
    # requests: the frame count is a sampling parameter (the family's default when unset) and part of the batch key
    defaults = DiffusionRolloutConfig(height=32, width=32)
    assert resolve_sampling_params({"seed": 0}, defaults, spec).num_frames == 81
    five = resolve_sampling_params({"seed": 0, "num_frames": 5}, defaults, spec)
    assert five.num_frames == 5 and five.batch_key != resolve_sampling_params({"seed": 0}, defaults, spec).batch_key
    with pytest.raises(ValueError, match=r"^sampling_params\.num_frames=6: the WanPipeline VAE"):
        resolve_sampling_params({"num_frames": 6}, defaults, spec)
    # an image family takes no frame count (and gets none by default)
    image_spec = ModelSpec.from_path(tiny_model("sd3"))
    assert resolve_sampling_params({"seed": 0}, DiffusionRolloutConfig(), image_spec).num_frames is None
    with pytest.raises(ValueError, match=r"^sampling_params\.num_frames=5: a StableDiffusion3Pipeline checkpoint "):
        resolve_sampling_params({"num_frames": 5}, DiffusionRolloutConfig(), image_spec)


def test_scheduler_sigmas_read_the_published_unipc_flow_schedule():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    # the scheduler config Wan2.1-T2V checkpoints ship (flow sigmas, shift 3)
    unipc = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero"
    )
    a = scheduler_sigmas(unipc, 10)
    assert a.shape == (11,) and float(a[-1]) == 0.0 and torch.equal(a, unipc.sigmas)
    assert bool((a[1:] < a[:-1]).all()) and 0.99 < float(a[0]) <= 1.0
    # FlowMatchEuler (the tiny build's) takes N points of its own grid: another schedule of the same shift
    euler = scheduler_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    assert euler.shape == (11,) and not torch.allclose(euler, a, atol=1e-2)
    with pytest.raises(ValueError, match="sets no flow-matching schedule"):
        scheduler_sigmas(DDIMScheduler(), 10)


def test_the_vllm_omni_wire_carries_frames_and_rounds_videos_as_the_diffusers_backend(
    pipe, wan_dir, tiny_model, tmp_path
):
    """The vllm_omni backend's side of Wan: the frame count in the request and its sub-batch key, the checkpoint's
    own scheduler on the server, and videos back from vllm-omni's post-processing rounded as ``decode_videos``."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.video_processor import VideoProcessor

    from verl_omni.pipelines.vllm_omni_protocol import sampling_kwargs, video_tensor
    from verl_omni.pipelines.wan.sampling import decode_pixels, schedule_sigmas, videos_to_uint8
    from verl_omni.workers.rollout.model_spec import load_scheduler

    params = resolve_sampling_params(
        {"num_frames": 5, "seed": 1}, DiffusionRolloutConfig(), ModelSpec.from_path(wan_dir)
    )
    assert sampling_kwargs(params, 16, None)["num_frames"] == 5
    image_params = resolve_sampling_params({}, DiffusionRolloutConfig(), ModelSpec.from_path(tiny_model("sd3")))
    assert "num_frames" not in sampling_kwargs(image_params, 16, None)
    # the server's schedule is the sampler's: the class the checkpoint names (a published UniPC with its flow_shift)
    assert type(load_scheduler(wan_dir)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert torch.equal(schedule_sigmas(load_scheduler(wan_dir), 4, 32, 32, 8, 2), scheduler_sigmas(pipe.scheduler, 4))
    unipc_dir = tmp_path / "unipc"
    (unipc_dir / "scheduler").mkdir(parents=True)
    (unipc_dir / "model_index.json").write_text('{"scheduler": ["diffusers", "UniPCMultistepScheduler"]}')
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero"
    ).save_config(unipc_dir / "scheduler")
    unipc = load_scheduler(unipc_dir)
    assert type(unipc).__name__ == "UniPCMultistepScheduler" and unipc.config.flow_shift == 3.0
    # frames: what vllm-omni's Wan post-processing makes of the decoded video, rounded as the diffusers backend
    latents = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    pixels = decode_pixels(pipe.vae, latents, None)
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(pixels[1:2], output_type="np")  # (1, F, H, W, 3)
    assert torch.equal(video_tensor(frames), videos_to_uint8(pixels)[1]) and video_tensor(frames).shape == (
        5,
        3,
        32,
        32,
    )
    assert torch.equal(videos_to_uint8(pixels), decode_videos(pipe.vae, latents, None))
    with pytest.raises(ValueError, match="not \\(F, H, W, 3\\) frames"):
        video_tensor(frames[0, 0])


def test_ode_sampling_matches_the_stock_wan_pipeline(pipe):
    """noise_level=0 is plain Wan sampling with true CFG: same latents and same decoded frames as WanPipeline."""
    cond, neg = _cond(pipe, PROMPTS[:2]), _cond(pipe, ["blurry", "blurry"])
    sigmas = scheduler_sigmas(pipe.scheduler, 3)
    ours = sample_flow_match_sde(pipe.transformer, sigmas, cond, neg, _gens(7, 8), LATENT, CFG, noise_level=0.0)
    call = dict(num_frames=5, height=32, width=32, num_inference_steps=3, guidance_scale=CFG, max_sequence_length=16)
    stock = pipe(PROMPTS[:2], negative_prompt="blurry", output_type="latent", generator=_gens(7, 8), **call).frames
    assert torch.equal(pipe.scheduler.sigmas, sigmas)
    assert torch.equal(ours.final_latents, stock)
    frames = pipe(PROMPTS[:2], negative_prompt="blurry", output_type="pt", generator=_gens(7, 8), **call).frames
    videos = decode_videos(pipe.vae, ours.final_latents, chunk_size=None)
    assert videos.shape == (2, 5, 3, 32, 32) and videos.dtype == torch.uint8
    assert torch.equal(videos, (frames * 255).round().to(torch.uint8))
    # the negative prompt is used: another negative, another video
    other = sample_flow_match_sde(
        pipe.transformer, sigmas, cond, _cond(pipe, ["", ""]), _gens(7, 8), LATENT, CFG, noise_level=0.0
    )
    assert not torch.equal(other.final_latents, ours.final_latents)


def test_a_sampled_trajectory_replays_step_by_step_against_the_shared_sde_math(pipe):
    """Each recorded transition of a video trajectory is the shared SDE step from the recorded latents with the
    sample's own noise, and its log-prob is the step's Gaussian log-density (mean over C, f, h, w)."""
    cond, neg = _cond(pipe, PROMPTS), _cond(pipe, [""] * 3)
    sigmas = scheduler_sigmas(pipe.scheduler, 4)
    traj = sample_flow_match_sde(pipe.transformer, sigmas, cond, neg, _gens(1, 2, 3), LATENT, CFG, chunk_size=3)
    assert traj.latents.shape == (3, 5, *LATENT) and traj.log_probs.shape == (3, 4)
    gens = _gens(1, 2, 3)
    x = standard_normal((3, *LATENT), gens, "cpu")
    assert torch.equal(x, traj.latents[:, 0])
    for t in range(4):
        noise = standard_normal(x.shape, gens, "cpu")
        with torch.no_grad():
            v = predict_velocity(pipe.transformer, x, sigmas[t], cond, neg, CFG)
        step = sde_step_with_logprob(v, x, sigmas[t], sigmas[t + 1], 0.7, noise=noise)
        assert torch.equal(step.prev_sample, traj.latents[:, t + 1])
        assert torch.equal(step.log_prob, traj.log_probs[:, t])
        x = step.prev_sample
    assert torch.equal(x, traj.final_latents)


def test_recorded_log_probs_recompute_exactly_from_stored_latents(pipe):
    cond, neg = _cond(pipe, PROMPTS), _cond(pipe, [""] * 3)
    sigmas = scheduler_sigmas(pipe.scheduler, 4)
    traj = sample_flow_match_sde(pipe.transformer, sigmas, cond, neg, _gens(1, 2, 3), LATENT, CFG, chunk_size=2)

    def recompute(x, nxt, sig, sig_next, embeds, neg_embeds):
        return compute_log_prob(
            pipe.transformer, x, nxt, sig, sig_next, {"prompt_embeds": embeds}, {"prompt_embeds": neg_embeds}, CFG
        )

    # in the sampler's chunks of 2 rows the trainer's recompute is bit-identical (ratio exactly 1)
    for t in range(4):
        stored = [traj.latents[:, t], traj.latents[:, t + 1], sigmas[t].expand(3), sigmas[t + 1].expand(3)]
        logp, _, _ = map_chunks(recompute, [*stored, cond["prompt_embeds"], neg["prompt_embeds"]], 2)
        assert torch.equal(logp, traj.log_probs[:, t])
    # a trainer mini-batch mixes samples and steps: equal up to float rounding of the batched matmuls
    rows, steps = torch.tensor([2, 0, 1, 2]), torch.tensor([3, 0, 2, 1])
    logp, mean, std = recompute(
        traj.latents[rows, steps],
        traj.latents[rows, steps + 1],
        sigmas[steps],
        sigmas[steps + 1],
        cond["prompt_embeds"][rows],
        neg["prompt_embeds"][rows],
    )
    torch.testing.assert_close(logp, traj.log_probs[rows, steps], rtol=0, atol=1e-4)
    assert mean.shape == (4, *LATENT) and std.shape == (4, 1, 1, 1, 1)


def test_compute_log_prob_trains_the_conditional_branch_only_when_detaching(pipe):
    cond, neg = _cond(pipe, PROMPTS[:2]), _cond(pipe, ["", ""])
    x, nxt = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
    sig, sig_next = torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.3])
    weight = pipe.transformer.proj_out.weight

    def grad(detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pipe.transformer.requires_grad_(True)
        try:
            logp, _, _ = compute_log_prob(pipe.transformer, x, nxt, sig, sig_next, cond, neg, CFG, detach_uncond=detach)
            logp.sum().backward()
            return logp.detach(), weight.grad.clone()
        finally:
            pipe.transformer.zero_grad(set_to_none=True)
            pipe.transformer.requires_grad_(False)

    (logp_d, g_d), (logp_f, g_f) = grad(True), grad(False)
    assert torch.equal(logp_d, logp_f)  # same forward values
    assert g_d.abs().sum() > 0 and g_f.abs().sum() > 0 and not torch.allclose(g_d, g_f)
    with pytest.raises(ValueError, match="needs the negative conditioning"):
        compute_log_prob(pipe.transformer, x, nxt, sig, sig_next, cond, None, CFG)


async def test_diffusers_server_serves_wan_videos_and_syncs_weights(wan_dir, pipe):
    """A GRPO group through the real server: the prompt and the CFG negative are encoded once each, the samples are
    uint8 videos (F, 3, H, W) with 5-D latents whose log-probs the trainer binding recomputes; a weight push changes
    the next videos to exactly what the pushed weights sample."""
    from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer

    config = {"admission_window_ms": 50, "guidance_scale": CFG, "height": 32, "width": 32, "num_frames": 5}
    server = DiffusersRolloutServer(wan_dir, config, server_id="wan")
    params = {"num_inference_steps": 3, "negative_prompt": "blurry"}
    requests = [
        {"request_id": f"g{s}", "prompt_ids": PROMPTS[0], "sampling_params": {"seed": s, **params}} for s in (0, 1, 2)
    ]
    try:
        group = await server.generate_group(requests)
        updated = {k: v + 0.05 * torch.randn_like(v) for k, v in pipe.transformer.state_dict().items()}
        assert await server.update_weights(state_dict=updated) == 1
        after = await server.generate_group(requests[:1])
    finally:
        await server.close()
    samples = group.samples
    assert list(group.conditioning) == [PROMPTS[0], "blurry"]  # once for the group's three copies
    assert samples[0].image.shape == (5, 3, 32, 32) and samples[0].image.dtype == torch.uint8
    assert samples[0].latents.shape == (4, *LATENT) and samples[0].log_probs.shape == (3,)
    assert not torch.equal(samples[0].latents, samples[1].latents)  # per-request seeds

    table = group.conditioning
    cond, neg = ({k: v.expand(3, *v.shape) for k, v in table[key].items()} for key in (PROMPTS[0], "blurry"))
    latents, sigmas = torch.stack([s.latents for s in samples]), samples[0].sigmas
    for t in range(3):
        sig, sig_next = sigmas[t].expand(3), sigmas[t + 1].expand(3)
        logp, _, _ = compute_log_prob(pipe.transformer, latents[:, t], latents[:, t + 1], sig, sig_next, cond, neg, CFG)
        torch.testing.assert_close(logp, torch.stack([s.log_probs[t] for s in samples]), rtol=0, atol=1e-4)

    # after the push: the seed-0 video is what the updated transformer samples, not the old one
    from diffusers import WanTransformer3DModel

    moved = WanTransformer3DModel.from_config(pipe.transformer.config).eval()
    moved.load_state_dict(updated)
    one = {k: v[:1] for k, v in cond.items()}, {k: v[:1] for k, v in neg.items()}
    expected = sample_flow_match_sde(moved, scheduler_sigmas(pipe.scheduler, 3), *one, _gens(0), LATENT, CFG)
    assert after.samples[0].model_version == 1
    torch.testing.assert_close(after.samples[0].latents, expected.latents[0], rtol=0, atol=1e-5)
    assert not torch.allclose(after.samples[0].latents, samples[0].latents, atol=1e-3)


def _compose(*overrides: str):
    from hydra.core.global_hydra import GlobalHydra

    from recipes.flowgrpo.config_compose import compose_recipe

    GlobalHydra.instance().clear()
    return compose_recipe(*overrides)


def test_model_configs_select_wan_with_valid_frames_sizes_and_the_reference_settings(wan_dir, monkeypatch):
    """``model=wan_tiny`` runs on CPU; ``model=wan2_1_t2v_1_3b`` validates on one 8-GPU node (the tiny Wan stands in
    for the checkpoint: only its configs are read) with the reference's video size, steps, CFG, LoRA and beta."""
    from recipes.flowgrpo.validate import num_rollout_replicas, validate_model_options, validate_recipe_config

    tiny = _compose("model=wan_tiny")
    assert tiny.actor_rollout_ref.model.tiny == "wan" and tiny.reward.name == "video_color"
    validate_recipe_config(tiny, available_gpus=0)
    validate_model_options(tiny, wan_dir)
    monkeypatch.setenv("MODEL_PATH", wan_dir)
    cfg = _compose("model=wan2_1_t2v_1_3b")
    validate_recipe_config(cfg, available_gpus=8)
    validate_model_options(cfg, wan_dir)  # frames and sizes fit the VAE; the LoRA targets exist in Wan's blocks
    m, actor, rollout = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    d = rollout.diffusion
    assert (d.num_frames, d.height, d.width, d.num_inference_steps, d.guidance_scale) == (33, 240, 416, 20, 4.5)
    assert (m.lora_rank, m.lora_alpha, actor.kl_loss_coef) == (32, 64, 0.004)
    assert (actor.optim.lr, actor.clip_ratio, actor.ema.enable) == (1e-4, 1e-3, True)
    assert (rollout.n, rollout.diffusion_val.num_inference_steps, num_rollout_replicas(cfg)) == (4, 50, 4)
    samples, ranks = cfg.data.train_batch_size * rollout.n, cfg.trainer.n_gpus_per_node
    assert samples % num_rollout_replicas(cfg) == 0 and samples % rollout.agent.num_workers == 0
    assert (actor.ppo_mini_batch_size // ranks) % actor.ppo_micro_batch_size_per_gpu == 0
    assert d.max_num_seqs % d.chunk_size == 0


RECORD_ARGV = "import json, os, sys; print(json.dumps({'cwd': os.getcwd(), 'argv': sys.argv[1:]}))"


@pytest.mark.parametrize("rollout", [None, "vllm_omni"])
def test_the_wan_run_script_passes_the_checkpoint_backend_and_prompts_to_hydra(wan_dir, tmp_path, tiny_model, rollout):
    """recipes/flowgrpo/run_wan_lora.sh with a stand-in interpreter (records its arguments instead of training)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from recipes.flowgrpo.validate import validate_recipe_config

    root = Path(__file__).resolve().parents[1]
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{RECORD_ARGV}" "$@"\n')
    python.chmod(0o755)
    (tmp_path / "my prompts.txt").write_text("a red ball\n")
    env = {**os.environ, "PYTHON": str(python), "MODEL_PATH": wan_dir, "PROMPTS": str(tmp_path / "my prompts.txt")}
    if rollout:
        env["ROLLOUT"] = rollout
    script = root / "recipes" / "flowgrpo" / "run_wan_lora.sh"
    result = subprocess.run(
        ["bash", str(script), "trainer.total_training_steps=7"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout)
    assert call["cwd"] == str(root) and call["argv"][:3] == ["-m", "recipes.flowgrpo.main", "model=wan2_1_t2v_1_3b"]
    cfg = _compose(*call["argv"][2:])
    assert cfg.actor_rollout_ref.model.path == wan_dir and cfg.reward.name == "video_color"
    assert cfg.data.train_files == str(tmp_path / "my prompts.txt")  # a path with a space, intact
    assert cfg.actor_rollout_ref.rollout.name == (rollout or "diffusers") and cfg.trainer.total_training_steps == 7
    if rollout is None:  # the vllm_omni backend validates only where its extra is installed
        validate_recipe_config(cfg, available_gpus=8)
    for bad_env, message in [
        ({"ROLLOUT": "sglang"}, "ROLLOUT=sglang is not a rollout backend; valid choices: diffusers, vllm_omni"),
        ({"MODEL_PATH": tiny_model("sd3")}, "is not a WanPipeline checkpoint"),
    ]:
        result = subprocess.run(["bash", str(script)], env={**env, **bad_env}, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["model=wan_tiny", "actor_rollout_ref.rollout.diffusion.num_frames=6"],
            "config error: actor_rollout_ref.rollout.diffusion.num_frames=6: the WanPipeline VAE compresses time 4x "
            "and keeps the first frame; valid choices: 4k + 1 frames (1, 5, 9, 13, 17, ...)",
        ),
        (
            ["model=flux_tiny", "actor_rollout_ref.rollout.diffusion.num_frames=5"],
            "config error: actor_rollout_ref.rollout.diffusion.num_frames=5: a FluxPipeline checkpoint generates "
            "images; valid choices: null",
        ),
        (
            ["model=wan_tiny", "reward.name=geneval_color"],
            "config error: reward.name='geneval_color': a WanPipeline checkpoint generates videos and this reward "
            "scores images; valid choices: video_color (or a reward of your own: 'package.module:function')",
        ),
    ],
    ids=["wan_frames", "image_family", "image_reward"],
)
def test_a_frame_count_the_model_cannot_take_is_one_config_error_before_ray(tmp_path, verl_omni_cache, args, line):
    import os

    import warm_recipe

    run_dir = tmp_path / "run"
    proc = warm_recipe.run(
        [*args, f"trainer.default_local_dir={run_dir}"],
        timeout=300,
        env={**os.environ, "VERL_OMNI_CACHE": str(verl_omni_cache)},  # the tiny model is built (or found) before Ray
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [e for e in proc.stderr.splitlines() if e.startswith("config error: ")] == [line], proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (run_dir / "config.yaml").exists()
