"""The video reward (``video_color``): closed forms of its colour and temporal-consistency terms."""

from __future__ import annotations

import pytest
import torch

from verl_omni.models.palette import PALETTE
from verl_omni.rewards.color import GenEvalColorReward
from verl_omni.rewards.registry import get_reward_fn, reward_sample_kind
from verl_omni.rewards.video import temporal_consistency

SIZE = 8


def _solid(rgb: tuple[int, int, int], frames: int) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(frames, 3, SIZE, SIZE).clone()


def test_a_still_video_scores_its_frame_colour_and_full_consistency():
    reward = get_reward_fn("video_color", consistency_weight=0.25)
    red, blue = _solid(PALETTE["red"], 5), _solid(PALETTE["blue"], 5)
    frame = GenEvalColorReward()(red[:1], ["a red car"])
    other = GenEvalColorReward()(blue[:1], ["a red car"])
    got = reward(torch.stack([red, blue]), ["a red car", "a red car"])
    # (1 - w) * colour + w * 1, colour the frame's (every frame is the same)
    torch.testing.assert_close(got, torch.cat([0.75 * frame + 0.25, 0.75 * other + 0.25]), rtol=0, atol=1e-6)
    assert got[0] > 0.97 and 0.25 <= got[1] < 0.3 and got.dtype == torch.float32


def test_alternating_frames_have_zero_consistency_and_the_mean_frame_colour():
    black, white = _solid((0, 0, 0), 1), _solid((255, 255, 255), 1)
    video = torch.cat([black, white, black, white, black])  # 5 frames: 3 black, 2 white
    assert float(temporal_consistency(video[None])) == 0.0
    colour = GenEvalColorReward()(torch.cat([black, white]), ["a black cat", "a black cat"])
    expected = 0.6 * (3 * colour[0] + 2 * colour[1]) / 5
    got = get_reward_fn("video_color", consistency_weight=0.4)(video[None], ["a black cat"])
    torch.testing.assert_close(got, expected.view(1).float(), rtol=0, atol=1e-6)


def test_consistency_is_one_minus_the_mean_absolute_frame_change():
    base = torch.randint(0, 200, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    video = torch.cat([base, base + 17, base + 17, base])  # changes of 17, 0, 17 on every value
    assert float(temporal_consistency(video[None])) == pytest.approx(1 - (17 + 0 + 17) / 3 / 255, abs=1e-7)
    assert float(temporal_consistency(base[None])) == 1.0  # one frame: nothing changes
    # weight 0 is the frames' colour alone
    only = get_reward_fn("video_color", consistency_weight=0.0)(video[None], ["a green tree"])
    frames = GenEvalColorReward()(video, ["a green tree"] * 4).mean()
    torch.testing.assert_close(only, frames.view(1), rtol=0, atol=1e-6)


def test_video_reward_refuses_images_and_bad_options():
    reward = get_reward_fn("video_color")
    with pytest.raises(ValueError, match=r"uint8 videos of shape \(B, F, 3, H, W\).*got torch.uint8 \(2, 3, 8, 8\)"):
        reward(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), ["a red car"] * 2)
    with pytest.raises(ValueError, match="consistency_weight must be a number in"):
        get_reward_fn("video_color", consistency_weight=1.5)
    with pytest.raises(ValueError, match="names no known colour"):
        reward(torch.zeros(1, 2, 3, SIZE, SIZE, dtype=torch.uint8), ["a car"])


def test_the_registry_tells_video_rewards_from_image_rewards_and_the_recipe_matches_them_to_the_model():
    from omegaconf import OmegaConf

    from recipes.flowgrpo.validate import check_reward_sample_kind

    kinds = {n: reward_sample_kind(n) for n in ("video_color", "geneval_color", "ocr-titles", "remote", "my.mod:fn")}
    assert kinds == {"video_color": "video", "geneval_color": "image", "ocr-titles": "image", "remote": None,
                     "my.mod:fn": None}  # fmt: skip
    weighted = OmegaConf.create({"reward": {"name": None, "weights": {"geneval_color": 1.0, "video_color": 0.5}}})
    with pytest.raises(ValueError, match=r"^reward\.weights='video_color': a FluxPipeline checkpoint generates images"):
        check_reward_sample_kind(weighted, "FluxPipeline", "image")
    with pytest.raises(ValueError, match=r"^reward\.weights='geneval_color': .* valid choices: video_color "):
        check_reward_sample_kind(weighted, "WanPipeline", "video")
    check_reward_sample_kind(OmegaConf.create({"reward": {"name": "my.mod:fn"}}), "WanPipeline", "video")  # unknown
