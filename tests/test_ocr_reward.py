"""The OCR reward: the reference's formula, and PP-OCRv4 (the ONNX models inside the rapidocr-onnxruntime wheel)
reading words this test draws with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import warm_recipe
from PIL import Image, ImageDraw, ImageFont

from verl_omni.rewards import get_reward_fn, registered_rewards
from verl_omni.rewards.ocr import ocr_score, target_text
from verl_omni.rewards.weighted import RewardError, WeightedReward

pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra (a dev dependency) is not installed")

REPO = Path(__file__).resolve().parents[1]


def render(text: str, size: int = 256) -> torch.Tensor:
    """Black text, 40 px high, centred on white: a uint8 (3, H, W) image as the rollout returns it."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    width = draw.textlength(text, font=font)
    draw.text(((size - width) / 2, size / 2 - 20), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def reference_levenshtein(a: str, b: str) -> int:
    """Edit distance by the textbook recurrence, to check the library's against."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def expected_reward(read: str, target: str) -> float:
    """The reference's formula written out: spaces out, lower case, substring = 0, cap at len(target)."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    distance = 0 if target in read else reference_levenshtein(read, target)
    return 1 - min(distance, len(target)) / len(target)


def test_ocr_is_a_built_in_reward() -> None:
    assert "ocr" in registered_rewards()


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ('A shop sign that says "OPEN 24 hours"', "OPEN 24 hours"),
        ('a cake with "Happy Birthday" written in icing, and "ignored" later', "Happy Birthday"),
        ('"Hello" on a wall', "Hello"),
    ],
)
def test_target_is_the_first_quoted_text(prompt: str, text: str) -> None:
    assert target_text(prompt) == text


@pytest.mark.parametrize("prompt", ["a sign with no text marked", 'an unclosed "quote', 'empty quotes ""', '"  " x'])
def test_prompt_without_marked_text_is_refused(prompt: str) -> None:
    with pytest.raises(ValueError, match=r"reward 'ocr': prompt .* marks no text to render"):
        target_text(prompt)


@pytest.mark.parametrize(
    ("read", "target"),
    [
        ("Hello", "Hello"),
        ("hello world", "Hello World"),  # case and spaces ignored
        ("Welcome: HELLO WORLD!", "Hello World"),  # the target inside what was read counts as exact
        ("Helo", "Hello"),
        ("Hxllo Wrld", "Hello World"),
        ("", "Hello"),
        ("completely unrelated and much longer text", "Hi"),  # capped: never below 0
        ("OPEN24", "OPEN 24"),
    ],
)
def test_formula_matches_the_reference(read: str, target: str) -> None:
    assert ocr_score(read, target) == pytest.approx(expected_reward(read, target), abs=1e-12)


def test_formula_values_by_hand() -> None:
    assert ocr_score("Hello", "hello") == 1.0
    assert ocr_score("Helo", "Hello") == pytest.approx(0.8)  # one deletion of five letters
    assert ocr_score("", "Hello") == 0.0
    assert ocr_score("zzzzzzzzzzzz", "ab") == 0.0


@pytest.fixture(scope="module")
def ocr_reward():
    return get_reward_fn("ocr", num_threads=2)


def test_reads_rendered_words_and_scores_them_by_the_formula(ocr_reward) -> None:
    prompt = 'a poster that says "Hello World"'
    drawn = ["Hello World", "Helo World", "Hello Wrld xyz", ""]
    rewards = ocr_reward(torch.stack([render(t) for t in drawn]), [prompt] * len(drawn))
    assert rewards.dtype == torch.float32 and rewards.shape == (len(drawn),)
    expected = [expected_reward(t, "Hello World") for t in drawn]
    assert rewards.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([1.0, 0.9, 0.6, 0.0])  # exact, one letter missing, one missing + 3 extra, blank


def test_the_image_is_read_as_drawn(ocr_reward) -> None:
    assert ocr_reward.read_text(render("OPEN 24")).replace(" ", "") == "OPEN24"
    assert ocr_reward.read_text(render("")) == ""


def test_an_unmarked_prompt_fails_the_step_naming_the_reward_and_prompt(ocr_reward) -> None:
    weighted = WeightedReward.from_config({"name": "ocr", "kwargs": {"num_threads": 1}})
    with pytest.raises(RewardError, match=r"reward 'ocr' failed on prompt 'a blank wall'.*marks no text"):
        weighted(render("Hello").unsqueeze(0), ["a blank wall"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, r"option device='tpu' is not valid; valid choices: cpu, cuda"),
        ({"text_score": 2}, r"option text_score=2 must be a number in \[0, 1\]"),
        ({"num_threads": 0}, r"option num_threads=0 must be a positive int or null"),
    ],
)
def test_bad_options_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_reward_fn("ocr", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA may be available to onnxruntime here")
def test_cuda_without_onnxruntime_gpu_is_refused() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(ValueError, match=r"device='cuda' needs onnxruntime-gpu"):
        get_reward_fn("ocr", device="cuda")


def test_recipe_refuses_a_prompt_file_without_marked_text(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "OPEN"\na sign with nothing marked\n')
    args = ["reward.name=ocr", f"data.train_files={prompts}", f"trainer.default_local_dir={tmp_path / 'run'}"]
    proc = warm_recipe.run(args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "data.train_files: reward 'ocr' cannot score a prompt" in lines[0]
    assert "'a sign with nothing marked'" in lines[0]
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stdout + proc.stderr
