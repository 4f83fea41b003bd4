"""Why ``trainer.rollout_mode=one_step_off`` learns less per step: a stale batch's policy gradient against fresh ones.

    python -m benchmarks.stale_gradient_bench --batches 12 --optimizer-steps 4 --seed 0

On the cached tiny pretrained SD3, in one process (no Ray), with the recipe's defaults (8 prompts x 8 samples, 8
denoising steps at 64 px, noise level 0.7, 7 trained steps, clip 2e-2, AdamW lr 3e-4): weights ``theta0`` sample
``M`` batches, ``K`` AdamW steps on one more batch (``K`` mini-batches, as the recipe's 4 optimizer steps a training
step) give ``theta1``, which samples ``M`` fresh batches. At ``theta1``, the FlowGRPO loss's gradient of each batch:

- ``fresh``: a batch ``theta1`` drew (what ``sync`` trains on);
- ``stale``: a batch ``theta0`` drew, ratio against its stored log-probs (what ``one_step_off`` trains on);
- ``re-centred``: the stale batch with each transition's noise moved onto ``theta1``'s mean,
  ``x' = mu_theta1(x) + std z`` with ``z`` the sampler's own draw (``x_next = mu_theta0(x) + std z``): what
  ``theta1`` would have drawn with the same noise from the same state, as ``actor.recentre_stale`` trains on;
- ``stale - re-centred``: the part a stale transition adds, ``(mu_theta0 - mu_theta1) / std^2`` in its score.

Per kind: the mean norm of one batch's gradient, the norm of the mean of ``M`` (noise shrinks like 1/sqrt(M), a
bias does not), the cosine between the means of the two halves of the ``M`` (about 0 for noise; near 1 for a
direction every batch shares) and the cosine of the kind's mean with the fresh mean. FlowGRPO's log-prob is a mean
over latent elements, so its ratio stays near 1 and cannot weigh that part away.

``--train-steps N`` first trains N steps from ``theta0`` in each of ``sync``, ``one_step_off`` and ``one_step_off``
with every gradient on re-centred stale transitions (the same process and fixed prompts, the recipe's step order),
and prints the reward of the batch the weights draw, per 5 steps: whether removing that part gives the learning back.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "recipes" / "flowgrpo" / "data" / "prompts.txt"
PROMPTS_PER_BATCH, GROUP = 8, 8
STEPS, TRAINED, NOISE, SIZE, CHUNK = 8, 7, 0.7, 64, 8
CLIP, LR, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-2, 3e-4, 1e-4, 1.0


@dataclass
class Batch:
    """One sampled batch: trajectories, the sampler's log-probs, group advantages and the text conditioning."""

    latents: torch.Tensor  # (N, STEPS + 1, *latent)
    log_probs: torch.Tensor  # (N, STEPS)
    sigmas: torch.Tensor  # (STEPS + 1,)
    advantages: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (N,)
    conditioning: dict[str, torch.Tensor]
    noise: torch.Tensor  # (N, STEPS, *latent): the sampler's draw of each transition


class Policy:
    """The tiny SD3 pipeline whose transformer both samples and is trained (the rollout's and trainer's code)."""

    def __init__(self, prompts: list[str]) -> None:
        from diffusers import DiffusionPipeline

        from verl_omni.models.tiny_models import ensure_tiny_model
        from verl_omni.pipelines.sd3.diffusers_adapter import SD3DiffusersAdapter
        from verl_omni.rewards.color import GenEvalColorReward
        from verl_omni.workers.rollout.model_spec import ModelSpec

        cache = Path(os.environ.get("VERL_OMNI_CACHE", Path.home() / ".cache" / "verl_omni")) / "tiny_sd3"
        spec = ModelSpec.from_path(str(ensure_tiny_model("sd3", cache)), backend="diffusers")
        pipe = DiffusionPipeline.from_pretrained(spec.path, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.adapter = SD3DiffusersAdapter(pipe, spec, spec.default_max_sequence_length(), torch.device("cpu"))
        self.model = pipe.transformer.requires_grad_(True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.reward = GenEvalColorReward()
        self.prompts = prompts
        self.sampling = SimpleNamespace(
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            guidance_scale=1.0,
            noise_level=NOISE,
            sde_window=None,
            sde_type="sde",
        )
        texts = [p for p in prompts for _ in range(GROUP)]
        encodings = self.adapter.encode(texts, CHUNK)
        self.texts, self.encodings = texts, encodings
        self.conditioning = {k: torch.stack([e[k] for e in encodings]) for k in encodings[0]}

    @torch.no_grad()
    def sample(self, seed: int) -> Batch:
        """A batch of ``GROUP`` samples per prompt, each from its own seeded generator."""
        from verl_omni.trainer.flowgrpo.advantages import compute_group_advantages
        from verl_omni.utils.batch_invariant import onednn

        generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(self.texts))]
        with onednn(enabled=False):
            trajectory = self.adapter.sample(self.encodings, None, generators, self.sampling, CHUNK)
        rewards = self.reward(self.adapter.decode(trajectory.final_latents, CHUNK), self.texts)
        uids = [str(i // GROUP) for i in range(len(self.texts))]
        advantages = compute_group_advantages(rewards, uids, global_std=False, clip_max=5.0)
        return Batch(
            trajectory.latents,
            trajectory.log_probs,
            trajectory.sigmas,
            advantages,
            rewards,
            self.conditioning,
            trajectory.noise,
        )

    def _transition(self, batch: Batch, rows: torch.Tensor, t: int, recentre: bool = False):
        """The trainer's log-prob of rows' step ``t`` (``recentre``: moved onto the current means with their noise,
        as ``actor.recentre_stale`` does)."""
        from verl_omni.pipelines.sd3.sampling import compute_log_prob

        n = len(rows)
        return compute_log_prob(
            self.model,
            latents=batch.latents[rows, t],
            next_latents=batch.latents[rows, t + 1],
            noise=batch.noise[rows, t] if recentre else None,
            sigmas=batch.sigmas[t].expand(n).contiguous(),
            sigmas_next=batch.sigmas[t + 1].expand(n).contiguous(),
            conditioning={k: v[rows] for k, v in batch.conditioning.items()},
            noise_level=NOISE,
        )

    def gradient(self, batch: Batch, rows: torch.Tensor | None = None, recentre: bool = False) -> torch.Tensor:
        """The flattened gradient of the FlowGRPO loss over ``rows`` (all by default), weighted as one optimizer step
        of the trainer weighs its micro-batches; ``recentre``: the batch's noise on the current means."""
        from verl_omni.trainer.flowgrpo.loss import flowgrpo_policy_loss
        from verl_omni.utils.batch_invariant import onednn

        rows = torch.arange(batch.latents.shape[0]) if rows is None else rows
        self.model.zero_grad(set_to_none=True)
        with onednn(enabled=False):
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start : start + CHUNK]
                for t in range(TRAINED):
                    log_prob, _, _ = self._transition(batch, chunk, t, recentre)
                    loss, _ = flowgrpo_policy_loss(log_prob, batch.log_probs[chunk, t], batch.advantages[chunk], CLIP)
                    (loss * len(chunk) / len(rows) / TRAINED).backward()
        grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in self.params])
        self.model.zero_grad(set_to_none=True)
        return grad.double()

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)

    def train(
        self,
        batch: Batch,
        optimizer_steps: int,
        seed: int,
        optimizer: torch.optim.Optimizer | None = None,
        recentre: bool = False,
    ) -> None:
        """``optimizer_steps`` AdamW steps, one per equal share of the batch's rows (in a seeded order); a fresh
        optimizer unless one is passed; ``recentre``: every gradient on the batch's noise re-centred."""
        optimizer = optimizer or self.optimizer()
        order = torch.randperm(batch.latents.shape[0], generator=torch.Generator().manual_seed(seed))
        for rows in order.chunk(optimizer_steps):
            grad = self.gradient(batch, rows, recentre=recentre).float()
            offset = 0
            for p in self.params:
                p.grad = grad[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def report(kinds: dict[str, list[torch.Tensor]]) -> str:
    """One row per kind: single-batch norm, norm of the mean, cosine of the halves' means, cosine with fresh."""
    fresh = torch.stack(kinds["fresh"]).mean(0)
    lines = [
        "| gradient at theta1 | one batch, norm | mean of M, norm | cos(half 1, half 2) | cos(mean, fresh mean) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, grads in kinds.items():
        half = len(grads) // 2
        mean = torch.stack(grads).mean(0)
        single = sum(float(g.norm()) for g in grads) / len(grads)
        halves = _cos(torch.stack(grads[:half]).mean(0), torch.stack(grads[half:]).mean(0))
        with_fresh = "1" if name == "fresh" else f"{_cos(mean, fresh):.2f}"
        lines.append(f"| {name} | {single:.4f} | {float(mean.norm()):.4f} | {halves:.2f} | {with_fresh} |")
    return "\n".join(lines)


MODES = ("sync", "one_step_off", "one_step_off, re-centred")


def learning_curve(policy: Policy, mode: str, steps: int, optimizer_steps: int, seed: int) -> list[float]:
    """The mean reward of the batch the weights draw at each step, training as ``mode`` does from the weights the
    policy holds now. ``sync`` trains on that batch. ``one_step_off`` draws it before the update, for the next step,
    and trains on the batch the previous weights drew (the first step on an on-policy batch, as the recipe);
    ``re-centred``: with that stale batch's noise moved onto the current means at every gradient."""
    optimizer = policy.optimizer()
    recentre = mode.endswith("re-centred")
    rewards: list[float] = []
    stale = None if mode == "sync" else policy.sample(seed * 1_000 + 10_000)  # the recipe's first, on-policy batch
    for step in range(steps):
        drawn = policy.sample(seed * 1_000 + 10_001 + step)  # by the weights after `step` updates
        rewards.append(float(drawn.rewards.mean()))
        if stale is None:
            policy.train(drawn, optimizer_steps, seed + step, optimizer)
            continue
        policy.train(stale, optimizer_steps, seed + step, optimizer, recentre=recentre)
        stale = drawn
    return rewards


def curves(policy: Policy, steps: int, optimizer_steps: int, seed: int) -> str:
    """Each mode's learning curve from the same starting weights (restored after), as a table of 5-step means."""
    start = [p.detach().clone() for p in policy.params]
    rows = ["| mode | " + " | ".join(f"steps {i + 1}-{min(i + 5, steps)}" for i in range(0, steps, 5)) + " |"]
    rows.append("| --- |" + " --- |" * len(range(0, steps, 5)))
    for mode in MODES:
        rewards = learning_curve(policy, mode, steps, optimizer_steps, seed)
        with torch.no_grad():
            for p, p0 in zip(policy.params, start, strict=True):
                p.copy_(p0)
        blocks = [sum(rewards[i : i + 5]) / len(rewards[i : i + 5]) for i in range(0, steps, 5)]
        rows.append(f"| {mode} | " + " | ".join(f"{b:.3f}" for b in blocks) + " |")
    return "reward of the batch the weights draw (mean of 64 samples, then of 5 steps)\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=12, help="M: batches of each kind (even, >= 2)")
    parser.add_argument("--optimizer-steps", type=int, default=4, help="K: AdamW steps from theta0 to theta1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="also train this many steps from theta0 in each of sync, one_step_off and one_step_off re-centred, and "
        "print the reward of the batch the weights draw, per 5 steps",
    )
    args = parser.parse_args(argv)
    if args.batches < 2 or args.batches % 2:
        parser.error(f"--batches {args.batches}: an even number >= 2 (the halves are compared)")
    torch.set_num_threads(1)
    prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
    pick = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))[:PROMPTS_PER_BATCH]
    policy = Policy([prompts[i] for i in pick.tolist()])
    base = args.seed * 1_000
    if args.train_steps:
        print(curves(policy, args.train_steps, args.optimizer_steps, args.seed) + "\n", flush=True)
    stale = [policy.sample(base + 100 + j) for j in range(args.batches)]
    policy.train(policy.sample(base + 1), args.optimizer_steps, args.seed)
    fresh = [policy.sample(base + 500 + j) for j in range(args.batches)]
    kinds = {
        "fresh": [policy.gradient(b) for b in fresh],
        "stale": [policy.gradient(b) for b in stale],
        "re-centred": [policy.gradient(b, recentre=True) for b in stale],
    }
    kinds["stale - re-centred"] = [s - r for s, r in zip(kinds["stale"], kinds["re-centred"], strict=True)]
    print(
        f"seed {args.seed}, M = {args.batches} batches of {PROMPTS_PER_BATCH} prompts x {GROUP}, "
        f"K = {args.optimizer_steps} AdamW steps from theta0 to theta1\n"
    )
    print(report(kinds))


if __name__ == "__main__":
    main()
