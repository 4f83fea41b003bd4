"""bf16 on-policy pieces without Ray: the actor's copy of the transformer casts like the rollout's, the FSDP2 policy
leaves the inputs to the caller, the old-log-prob options fail or warn at start-up naming their keys, the
recompute and truncated importance weights compute what they say, and the trainer's step line reports an
off-policy first step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recipes.flowgrpo.config_compose import compose_recipe
from recipes.flowgrpo.schema import parse_recipe_config
from verl_omni.trainer.flowgrpo.loss import flowgrpo_policy_loss, truncated_is_weights
from verl_omni.trainer.flowgrpo.old_log_prob import recompute_old_log_probs, rollout_gap_metrics
from verl_omni.workers.config.actor_fsdp import ActorFSDPConfig
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.config.precision import precision_warning
from verl_omni.workers.config.training import TrainingSections
from verl_omni.workers.precision import cast_floating_buffers, torch_dtype


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3

    return ensure_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny_sd3")


def test_actor_copy_casts_like_the_rollouts_from_pretrained(tiny_pipeline):
    """The rollout loads bf16 with from_pretrained; the actor loads fp32, casts its buffers, and FSDP2 casts the
    parameters: every tensor the bf16 forward reads must then be the same."""
    from verl_omni.workers.diffusion_actor import load_transformer

    rollout = load_transformer(str(tiny_pipeline), torch.bfloat16)
    actor = load_transformer(str(tiny_pipeline), torch.float32)
    assert cast_floating_buffers(actor, torch.bfloat16) >= 1  # SD3's positional embedding is a buffer
    buffers = dict(actor.named_buffers())
    for name, buf in rollout.named_buffers():
        assert buffers[name].dtype == buf.dtype and torch.equal(buffers[name], buf), name
    params = dict(actor.named_parameters())
    for name, param in rollout.named_parameters():
        assert torch.equal(params[name].to(torch.bfloat16), param), name  # FSDP2's cast: round to nearest
    assert cast_floating_buffers(actor, torch.bfloat16) == 0  # idempotent


def test_cast_floating_buffers_leaves_integer_buffers_and_fp32_modules():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(2))
            self.register_buffer("index", torch.arange(3))
            self.register_buffer("cache", torch.zeros(1), persistent=False)

    class Model(torch.nn.Module):
        _keep_in_fp32_modules = ["norm"]

        def __init__(self):
            super().__init__()
            self.block, self.norm = Block(), Block()

    model = Model()
    assert cast_floating_buffers(model, torch.bfloat16) == 2
    assert model.block.scale.dtype == model.block.cache.dtype == torch.bfloat16
    assert model.block.index.dtype == torch.int64 and model.norm.scale.dtype == torch.float32
    assert "cache" not in model.state_dict(prefix="") and "block.cache" not in model.state_dict()
    with pytest.raises(ValueError, match="float64"):
        torch_dtype("float64")


def test_fsdp_policy_leaves_the_input_cast_to_the_caller():
    policy = ActorFSDPConfig(param_dtype="bfloat16").mp_policy()
    assert policy.param_dtype == torch.bfloat16 and policy.cast_forward_inputs is False


def _cfg(**actor):
    return OmegaConf.create(
        {
            "actor_rollout_ref": {
                "actor": {"fsdp_config": {"mixed_precision": {"param_dtype": "bfloat16"}}, **actor},
                "rollout": {"dtype": "bfloat16"},
            },
            "trainer": {},
        }
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["actor_rollout_ref.actor.recompute_old_log_prob=yes"],
            r"actor_rollout_ref\.actor\.recompute_old_log_prob='yes'",
        ),
        (
            ["actor_rollout_ref.actor.recompute_old_log_prob=true", "actor_rollout_ref.actor.rollout_is_threshold=0"],
            r"rollout_is_threshold=0 must be",
        ),
        (
            ["actor_rollout_ref.actor.rollout_is_threshold=2.0"],
            r"set actor_rollout_ref\.actor\.recompute_old_log_prob=true",
        ),
        (
            ["trainer.warn_clip_frac_first=1.5"],
            r"trainer\.warn_clip_frac_first=1\.5 is outside the valid range \[0, 1\]",
        ),
    ],
)
def test_bad_old_log_prob_options_name_key_value_and_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe_config(compose_recipe(*overrides))


def test_precision_warning_names_both_keys_and_the_option_that_fixes_it():
    fp32_rollout = DiffusionRolloutConfig(device="cpu", dtype="float32")
    warning = precision_warning(_cfg(), fp32_rollout, gpus_available=False)
    assert "actor_rollout_ref.rollout.diffusion.dtype=float32" in warning
    assert "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bfloat16" in warning
    assert "actor_rollout_ref.actor.recompute_old_log_prob=true" in warning
    # auto is float32 on CPU: the same mismatch, shown as resolved
    auto = precision_warning(_cfg(), DiffusionRolloutConfig(device="auto"), gpus_available=False)
    assert "dtype=auto (float32 on CPU)" in auto
    # fine: recompute on; equal dtypes (auto on GPU is the rollout's bf16; the SD3.5 config's explicit bf16)
    assert precision_warning(_cfg(recompute_old_log_prob=True), fp32_rollout, gpus_available=False) is None
    assert precision_warning(_cfg(), DiffusionRolloutConfig(device="auto"), gpus_available=True) is None
    assert precision_warning(_cfg(), DiffusionRolloutConfig(device="cpu", dtype="bfloat16"), False) is None


def test_recompute_replaces_this_ranks_rows_in_micro_batches():
    rollout = torch.zeros(5, 3)
    calls = []

    def log_prob(idx: torch.Tensor, t: int) -> torch.Tensor:
        calls.append((idx.tolist(), t))
        return idx.float() * 10 + t

    old = recompute_old_log_probs(log_prob, rollout, rows=[0, 2, 4], micro_batch=2)
    assert calls == [([0, 2], 0), ([0, 2], 1), ([0, 2], 2), ([4], 0), ([4], 1), ([4], 2)]
    assert old[[1, 3]].abs().sum() == 0 and rollout.abs().sum() == 0  # other ranks' rows and the input untouched
    assert old[4].tolist() == [40.0, 41.0, 42.0]
    gap = rollout_gap_metrics(torch.tensor([[0.0, 0.5]]), torch.tensor([[0.0, -0.5]]))
    assert gap["actor/rollout_log_prob_gap_max"] == 1.0 and gap["actor/rollout_log_prob_gap_mean"] == 0.5
    assert gap["actor/rollout_ratio_max_abs_dev"] == pytest.approx(torch.expm1(torch.tensor(1.0)).item())


def test_truncated_importance_weights_scale_the_policy_gradient_term():
    old, rollout = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.0, 0.0, 0.0])
    weights = truncated_is_weights(old, rollout, threshold=2.0)
    assert weights.tolist() == pytest.approx([1.0, 2.0, float(torch.exp(torch.tensor(-1.0)))])
    log_prob = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 2.0])
    plain, _ = flowgrpo_policy_loss(log_prob, old, advantages, clip_range=10.0)
    weighted, metrics = flowgrpo_policy_loss(log_prob, old, advantages, clip_range=10.0, is_weights=weights)
    per_row = -advantages * torch.exp(log_prob.detach() - old)
    assert plain.item() == pytest.approx(per_row.mean().item())
    assert weighted.item() == pytest.approx((per_row * weights).mean().item())
    assert metrics["is_weight_mean"] == pytest.approx(weights.mean().item())
    with pytest.raises(ValueError, match="is_weights must have shape"):
        flowgrpo_policy_loss(log_prob, old, advantages, clip_range=0.1, is_weights=weights[:2])


def test_step_line_reports_an_off_policy_first_step(tmp_path, capsys):
    from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer

    config = OmegaConf.create(
        {
            "trainer": {"total_training_steps": 3, "warn_clip_frac_first": 0.05},
            "actor_rollout_ref": {"actor": {"clip_ratio": 1e-4}, "rollout": {}},
        }
    )
    trainer = FlowGRPOTrainer(
        config,
        batcher=None,
        agent_loop_manager=None,
        actor_wg=None,
        replicas=[],
        run_dir=tmp_path,
        sections=TrainingSections(),
    )
    metrics = {
        "reward/mean": 0.5,
        "timing_s/step": 1.0,
        "actor/clip_frac_first": 0.85,
        "actor/clip_frac": 0.6,
        "actor/ratio_max_abs_dev": 9.8e-3,
    }
    line = trainer._console_line(0, metrics, {})
    assert "clip_first 0.85" in line and "ratio_dev 9.8e-03 > clip_ratio 1.0e-04" in line
    assert "> clip_ratio" not in trainer._console_line(0, {**metrics, "actor/ratio_max_abs_dev": 0.0}, {})
    assert "shift" not in line
    recentred = trainer._console_line(1, {**metrics, "actor/recentre_shift_rms": 0.0751}, {})
    assert "shift 0.075" in recentred  # one_step_off: how far the stale transitions were moved, in noise stds
    trainer._warn_off_policy(0, metrics)
    trainer._warn_off_policy(1, metrics)  # once per run
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and "actor_rollout_ref.actor.recompute_old_log_prob=true" in out
    assert "85%" in out and "trainer.warn_clip_frac_first=0.05" in out
