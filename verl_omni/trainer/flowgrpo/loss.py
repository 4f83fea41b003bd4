"""FlowGRPO policy loss: PPO-style clipped ratio of SDE transition log-probs plus a closed-form KL to the reference.

Both policies share the transition std and differ only in the Gaussian mean, so the KL term is
``mean_over_dims((mean_theta - mean_ref)^2) / (2 std^2)``. Which ``std`` divides is :func:`kl_std`'s choice:
the reference implementation's diffusion coefficient ``a sqrt(s / (1 - s))`` (the default, so ``beta`` values
ported from its configs mean the same) or the transition std ``a sqrt(s / (1 - s)) sqrt(-dt)``, which makes the
term the exact Gaussian KL per transition (``1 / |dt|`` times larger: 3.7x-112x on a 10-step SD3.5 schedule).
"""

from __future__ import annotations

import torch

from verl_omni.pipelines.flow_match_sde import cps_std, sde_std
from verl_omni.trainer.flowgrpo.kl_forms import KL_FORMS


def kl_std(
    form: str, sigmas: torch.Tensor, sigmas_next: torch.Tensor, noise_level: float, sde_type: str = "sde"
) -> torch.Tensor:
    """The per-row ``std`` (B,) the KL term divides by: ``reference`` (no ``dt``) or the ``transition`` std.

    For CPS (``sde_type='cps'``) both are its transition std ``s_next sin(a pi/2)`` (the authors' code divides by
    it too): its noise has no separate ``dt`` factor."""
    if form not in KL_FORMS:
        raise ValueError(f"kl_form={form!r} is not valid; valid choices: {', '.join(KL_FORMS)}")
    sigmas, sigmas_next = sigmas.float(), sigmas_next.float()
    if sde_type == "cps":
        return cps_std(sigmas_next, noise_level)
    std = sde_std(sigmas, sigmas_next, noise_level)
    return std if form == "reference" else std * torch.sqrt(sigmas - sigmas_next)


def _per_sample_std(std: torch.Tensor, batch: int) -> torch.Tensor:
    """A std as shape ``(B,)``: accepts a scalar, ``(B,)`` or ``(B, 1, ..., 1)``."""
    std = torch.as_tensor(std)
    if std.numel() == 1:
        return std.reshape(()).expand(batch)
    if std.numel() == batch and std.shape[0] == batch:
        return std.reshape(batch)
    raise ValueError(f"kl_std must be a scalar or hold one value per sample (B={batch}), got {tuple(std.shape)}")


def transition_kl(
    prev_sample_mean: torch.Tensor, ref_prev_sample_mean: torch.Tensor, kl_std: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``mean_over_dims((mean_theta - mean_ref)^2) / (2 kl_std^2)``, shape ``(B,)``; grads flow to theta."""
    if prev_sample_mean.shape != ref_prev_sample_mean.shape or prev_sample_mean.ndim < 1:
        raise ValueError(
            f"prev_sample_mean {tuple(prev_sample_mean.shape)} and ref_prev_sample_mean "
            f"{tuple(ref_prev_sample_mean.shape)} must have the same (B, ...) shape"
        )
    batch = prev_sample_mean.shape[0]
    sigma = _per_sample_std(kl_std, batch).detach().to(prev_sample_mean)
    diff = prev_sample_mean - ref_prev_sample_mean.detach()
    return diff.pow(2).reshape(batch, -1).mean(dim=1) / (2 * sigma**2)


def flowgrpo_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    prev_sample_mean: torch.Tensor | None = None,
    ref_prev_sample_mean: torch.Tensor | None = None,
    kl_std: torch.Tensor | None = None,
    beta: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the ``B`` (sample, trained step) rows of ``max(-A r, -A clip(r, 1-eps, 1+eps)) + beta * kl``.

    ``log_prob`` is recomputed under the current policy (carries grad); ``old_log_prob`` comes from the rollout
    and ``advantages`` from the group normalisation (both treated as constants). With ``beta > 0`` the
    current and reference transition means and ``kl_std`` (:func:`kl_std`) are required; with ``beta == 0``
    they are optional and, when given, only reported. Metrics are Python floats: ``pg_loss``, ``kl``,
    ``clip_frac`` (share of rows with ``|r - 1| > eps``), ``approx_kl`` (``0.5 mean((logp - old)^2)``),
    ``ratio_mean``, ``ratio_max``, ``loss``.

    ``is_weights`` (B,), optional: per-row importance weights multiplying the policy-gradient term (constants),
    the rollout correction of a trainer that recomputed ``old_log_prob`` itself: truncated
    ``min(p_old / p_rollout, C)`` (:func:`truncated_is_weights`); they also add ``is_weight_mean``.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}")
    if not beta >= 0:
        raise ValueError(f"beta (KL coefficient) must be >= 0, got {beta!r}")
    if log_prob.ndim != 1 or old_log_prob.shape != log_prob.shape or advantages.shape != log_prob.shape:
        raise ValueError(
            "log_prob, old_log_prob and advantages must share one 1-D shape (B,), got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if log_prob.numel() == 0:
        raise ValueError("flowgrpo_policy_loss got an empty batch (B=0)")
    kl_inputs = {"prev_sample_mean": prev_sample_mean, "ref_prev_sample_mean": ref_prev_sample_mean, "kl_std": kl_std}
    missing = [name for name, value in kl_inputs.items() if value is None]
    if beta > 0 and missing:
        raise ValueError(f"beta={beta} > 0 needs prev_sample_mean, ref_prev_sample_mean and kl_std; missing {missing}")

    old_log_prob = old_log_prob.detach()
    advantages = advantages.detach().to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        if is_weights.shape != log_prob.shape:
            raise ValueError(f"is_weights must have shape {tuple(log_prob.shape)}, got {tuple(is_weights.shape)}")
        per_row = per_row * is_weights.detach().to(per_row.dtype)
    pg_loss = per_row.mean()

    if not missing:
        if prev_sample_mean.shape[0] != log_prob.shape[0]:
            raise ValueError(
                f"prev_sample_mean has {prev_sample_mean.shape[0]} rows but log_prob has {log_prob.shape[0]}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and beta > 0):
            kl = transition_kl(prev_sample_mean, ref_prev_sample_mean, kl_std).mean()
    else:
        kl = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    loss = pg_loss + beta * kl if beta > 0 else pg_loss

    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "pg_loss": pg_loss.item(),
            "kl": kl.item(),
            "clip_frac": (torch.abs(ratio - 1.0) > clip_range).float().mean().item(),
            "approx_kl": (0.5 * log_ratio.pow(2).mean()).item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_max": ratio.max().item(),
        }
        if is_weights is not None:
            metrics["is_weight_mean"] = is_weights.float().mean().item()
    return loss, metrics


def truncated_is_weights(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Truncated importance weights ``min(exp(old - rollout), threshold)`` (TIS, verl's ``rollout_is_threshold``).

    ``old_log_prob`` is the trainer's recompute at its own precision, ``rollout_log_prob`` what the sampler
    stored: the weight corrects for the two computing slightly different policies, capped so that one row
    whose log-probs disagree a lot cannot dominate the batch.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    return torch.exp(old_log_prob.detach() - rollout_log_prob.detach()).clamp(max=threshold)


def guard_log_prob(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    prev_sample_mean: torch.Tensor,
    old_prev_sample_mean: torch.Tensor,
    std_dev: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's ratio normalisation (Wang et al. 2025), as a log-prob to put in place of ``log_prob``.

    Both policies' transitions are Gaussians of std ``sigma`` (the transition std, ``std_dev``); with ``x_next =
    mu_old + sigma z`` the log-ratio is ``-mean(z d) / sigma - mean(d^2) / (2 sigma^2)``, ``d = mu_old - mu_theta``:
    biased below 0 and scaled by ``1 / sigma``, so its mean and spread drift with the noise level and the clip range
    bites unevenly across steps. The normalised log-ratio ``sigma (log_prob - old) + mean(d^2) / (2 sigma)`` is
    ``-mean(z d)``: zero-mean, with a spread set by ``|d|`` alone, and its gradient is the per-step reweighting the
    paper derives. Returns ``old_log_prob + `` that log-ratio, shape ``(B,)``; gradients flow through ``log_prob`` and
    ``prev_sample_mean``. At equal weights (``mu_theta == mu_old``) it equals ``log_prob``: the ratio is 1.
    """
    batch = log_prob.shape[0]
    sigma = std_dev.detach().reshape(batch, -1)[:, 0].to(log_prob.dtype)
    noisy = sigma > 0  # a deterministic step (CPS to s_next = 0) has log-prob 0 on both sides: left as it is
    safe = torch.where(noisy, sigma, torch.ones_like(sigma))
    mse = (prev_sample_mean - old_prev_sample_mean.detach()).pow(2).reshape(batch, -1).mean(dim=1)
    guarded = old_log_prob.detach() + safe * (log_prob - old_log_prob.detach()) + mse / (2.0 * safe)
    return torch.where(noisy, guarded, log_prob)


def per_step_ratio_metrics(log_ratios: dict[str, list[list[torch.Tensor]]]) -> dict[str, float]:
    """Mean and std of each ratio over an update, per trained step ``t`` (the window's ``t``-th step):
    ``actor/<name>_mean_step<t>``, ``actor/<name>_std_step<t>``. What GRPO-Guard argues from: the plain ratio's mean
    sits below 1 and its spread changes with the step's noise level; the normalised one should not."""
    metrics = {}
    for name, per_step in log_ratios.items():
        for t, parts in enumerate(per_step):
            if parts:
                ratio = torch.exp(torch.cat(parts).double())
                metrics[f"actor/{name}_mean_step{t}"] = float(ratio.mean())
                metrics[f"actor/{name}_std_step{t}"] = float(ratio.std(correction=0))
    return metrics
