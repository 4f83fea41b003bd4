"""DiffusionNFT's objective (Zheng et al. 2025, arXiv 2509.16117): reinforcement on the forward process.

The old policy (the weights that sampled) draws clean samples ``x0``; a reward, normalised within the prompt's
group, becomes an optimality probability ``r`` in [0, 1]. At a noise level ``t`` and noise ``eps`` the forward
process gives ``x_t = (1 - t) x0 + t eps``, whose flow-matching target is ``eps - x0``. From the old velocity and the
trained one the loss builds two implicit policies,

    v+ = (1 - beta) v_old + beta v_theta,      v- = (1 + beta) v_old - beta v_theta,

and regresses the positive one on the good samples and the negative one on the bad ones:
``r ||v+ - (eps - x0)||^2 + (1 - r) ||v- - (eps - x0)||^2``. Minimising it moves ``v_theta`` along ``v+ - v-``
towards the samples the reward prefers, with no log-probability and no classifier-free guidance anywhere.

As the authors' code computes it (NVlabs/DiffusionNFT, ``scripts/train_nft_sd3.py``), each term is taken in the
data space, ``x0_hat = x_t - t v`` (``x0_hat - x0 = t (eps - x0 - v)``: the velocity error times ``t``), divided by
its own detached mean absolute error per sample (adaptive weighting), averaged over the latent dims, divided by
``beta`` and multiplied by the reward normaliser ``Z`` (their ``adv_clip_max``). Because ``x0_hat`` is linear in
``v``, the implicit policies' data estimates are the same mixtures of the trained and old estimates, which is how
:func:`nft_loss` takes them. Our own code; the formulas are checked against closed forms in
``tests/test_diffusion_nft.py``.
"""

from __future__ import annotations

import torch

WEIGHT_FLOOR = 1e-5  # the authors' clip(min=0.00001) of the adaptive weight


def optimality_probability(advantages: torch.Tensor, reward_norm: float) -> torch.Tensor:
    """``r = 1/2 + 1/2 clip(A / Z, -1, 1)``: the group-normalised advantage ``A`` (reward minus the group's mean,
    over the std) as a probability, ``Z = reward_norm`` stds mapping to 0 or 1 (the paper's normalisation; the
    authors' code: ``clamp(clip(A, +-5) / 5 / 2 + 1/2, 0, 1)``)."""
    if not reward_norm > 0:
        raise ValueError(f"reward_norm must be > 0, got {reward_norm!r}")
    return 0.5 + 0.5 * torch.clamp(advantages / reward_norm, -1.0, 1.0)


def old_policy_decay(optimizer_steps: int, flat: int, rate: float, maximum: float) -> float:
    """The old policy's decay after ``optimizer_steps`` optimizer steps: 0 before ``flat``, then ``rate`` per step
    up to ``maximum`` (the authors' ``return_decay``); the soft update is ``old <- d old + (1 - d) theta``."""
    if optimizer_steps < flat:
        return 0.0
    return min(rate * (optimizer_steps - flat), maximum)


def draw_timesteps(rows: int, schedule: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``(rows, count)`` indices into the sampling schedule's ``schedule`` noise levels: per row the first ``count``
    of a random permutation, so a sample trains on ``count`` distinct levels (the authors train on
    ``int(num_steps x timestep_fraction)`` of their sampler's timesteps, shuffled per sample)."""
    if not 1 <= count <= schedule:
        raise ValueError(f"count must be in [1, {schedule}], got {count}")
    return torch.stack([torch.randperm(schedule, generator=generator)[:count] for _ in range(rows)])


def _per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(like.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def _adaptive_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row ``mean((pred - target)^2) / max(mean|pred - target|, 1e-5)``, the weight detached (computed in
    float64, as the authors)."""
    dims = tuple(range(1, pred.ndim))
    with torch.no_grad():
        weight = (pred.detach().double() - target.double()).abs().mean(dim=dims).clamp(min=WEIGHT_FLOOR)
    return (pred - target).pow(2).mean(dim=dims) / weight.to(pred.dtype)


def nft_loss(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    reward_norm: float,
    x0_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """DiffusionNFT's loss on ``B`` rows (sample, noise level).

    Args:
        x0_theta: the trained model's data estimate ``x_t - t v_theta`` (B, ...), with gradients.
        x0_old: the old (sampling) policy's ``x_t - t v_old`` at the same ``x_t`` (constant).
        x0: the clean samples (B, ...).
        sigmas: the noise levels ``t`` (B,), all > 0.
        r: optimality probabilities (B,) in [0, 1] (:func:`optimality_probability`).
        beta: the implicit policies' strength; reward_norm: ``Z``, the loss's factor.
        x0_ref, kl_coef: with ``kl_coef > 0`` the reference's estimate: adds ``kl_coef mean((v_theta - v_ref)^2)``
            (the authors' KL term, ``train.beta`` 1e-4), ``v_theta - v_ref = (x0_ref - x0_theta) / t``.

    Returns:
        ``(loss, metrics, per_row)``: ``metrics`` as floats (``loss``, ``policy_loss``, ``positive_loss``,
        ``negative_loss``, ``kl``, ``r_abs_dev``: the mean ``|r - 1/2|``, how decisive the signal is: ``r`` itself
        averages 1/2 over a group); ``per_row`` detached tensors (B,): ``old_dev_sq`` (mean over the
        dims of ``(v_theta - v_old)^2``) and ``old_dev_max`` (max over the dims of ``|v_theta - v_old|``).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if x0_theta.shape != x0_old.shape or x0_theta.shape != x0.shape or x0.ndim < 2:
        raise ValueError(
            f"x0_theta {tuple(x0_theta.shape)}, x0_old {tuple(x0_old.shape)} and x0 {tuple(x0.shape)} must share one "
            "(B, ...) shape"
        )
    batch = x0.shape[0]
    if sigmas.shape != (batch,) or r.shape != (batch,):
        raise ValueError(f"sigmas {tuple(sigmas.shape)} and r {tuple(r.shape)} must have shape ({batch},)")
    x0_old, x0, r = x0_old.detach(), x0.detach().to(x0_theta.dtype), r.detach().to(x0_theta.dtype)
    positive = beta * x0_theta + (1.0 - beta) * x0_old  # x_t - t v+
    negative = (1.0 + beta) * x0_old - beta * x0_theta  # x_t - t v-
    pos, neg = _adaptive_mse(positive, x0), _adaptive_mse(negative, x0)
    per_row = (r * pos + (1.0 - r) * neg) / beta
    policy_loss = reward_norm * per_row.mean()
    loss = policy_loss
    kl = torch.zeros((), dtype=x0_theta.dtype, device=x0_theta.device)
    t = _per_row(sigmas.detach(), x0_theta)
    dims = tuple(range(1, x0.ndim))
    if x0_ref is not None and kl_coef > 0:
        kl = ((x0_ref.detach() - x0_theta) / t).pow(2).mean(dim=dims).mean()
        loss = loss + kl_coef * kl
    with torch.no_grad():
        dev = (x0_old - x0_theta.detach()) / t  # v_theta - v_old
        rows = {"old_dev_sq": dev.pow(2).mean(dim=dims), "old_dev_max": dev.abs().amax(dim=dims)}
        metrics = {
            "loss": loss.item(),
            "policy_loss": policy_loss.item(),
            "positive_loss": pos.mean().item(),
            "negative_loss": neg.mean().item(),
            "kl": kl.item(),
            "r_abs_dev": (r - 0.5).abs().mean().item(),
        }
    return loss, metrics, rows
