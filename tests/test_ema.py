"""EMA of the trained weights: the reference's update schedule and warm-up decay, step by step."""

from __future__ import annotations

import pytest
import torch

from verl_omni.workers.ema import EMAWeights


def reference_trajectory(weights: list[float], decay: float, update_every: int) -> list[float]:
    """The reference's rule written out: after the optimizer step that makes ``k`` steps done, the average
    moves toward the weights by ``1 - min(decay, (1 + k) / (10 + k))`` when ``(k + 1) % update_every == 0``."""
    ema, out = weights[0], []
    for k, weight in enumerate(weights[1:], start=1):
        if (k + 1) % update_every == 0:
            ema += (1 - min(decay, (1 + k) / (10 + k))) * (weight - ema)
        out.append(ema)
    return out


@pytest.mark.parametrize(("decay", "update_every"), [(0.9, 8), (0.9, 1), (0.5, 3)])
def test_ema_follows_the_reference_schedule(decay: float, update_every: int) -> None:
    param = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMAWeights([("w", param)], decay=decay, update_every=update_every)
    weights = [0.0] + [float(i * i) for i in range(1, 25)]  # the value after each optimizer step
    got = []
    for weight in weights[1:]:
        with torch.no_grad():
            param.fill_(weight)
        ema.after_optimizer_step()
        got.append(ema.shadow[0].item())
    assert got == pytest.approx(reference_trajectory(weights, decay, update_every), rel=1e-6)


def test_first_update_comes_after_the_seventh_step_with_update_every_8() -> None:
    param = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMAWeights([("w", param)], decay=0.9, update_every=8)
    with torch.no_grad():
        param.fill_(1.0)
    for _ in range(6):
        ema.after_optimizer_step()
    assert ema.shadow[0].item() == 0.0  # 6 steps done: not yet
    ema.after_optimizer_step()  # k = 7: (7 + 1) % 8 == 0
    assert ema.shadow[0].item() == pytest.approx(1 - 8 / 17)  # warm-up decay min(0.9, 8 / 17)
    for _ in range(7):
        ema.after_optimizer_step()
    assert ema.shadow[0].item() == pytest.approx(1 - 8 / 17)  # k = 8..14: no update
    ema.after_optimizer_step()  # k = 15
    assert ema.shadow[0].item() == pytest.approx(1 - (8 / 17) * (16 / 25))  # decay min(0.9, 16 / 25)
