"""Reward registry, JPEG (in)compressibility and PickScore (with a tiny random CLIP built locally)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from verl_omni.rewards import get_reward_fn, register_reward, registered_rewards
from verl_omni.rewards.jpeg import jpeg_size_kb
from verl_omni.rewards.registry import _REGISTRY


def _smooth_and_noisy(size: int = 64) -> torch.Tensor:
    flat = torch.full((3, size, size), 128, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.stack([flat, noisy])


def test_builtin_rewards_are_registered():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "pickscore"} <= set(registered_rewards())


def test_unknown_reward_names_key_value_and_choices():
    with pytest.raises(ValueError, match=r"reward\.name='nope'.*jpeg_compressibility.*pickscore"):
        get_reward_fn("nope")


def test_unknown_reward_option_is_rejected():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['qualty'\].*valid options: \['quality'\]"):
        get_reward_fn("jpeg_compressibility", qualty=80)


def test_register_reward_and_duplicate_name():
    name = "test_constant_reward"
    try:

        @register_reward(name)
        def constant(value: float = 1.0):
            return lambda images, prompts: torch.full((images.shape[0],), value)

        fn = get_reward_fn(name, value=2.5)
        assert fn(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), ["a", "b", "c"]).tolist() == [2.5, 2.5, 2.5]
        with pytest.raises(ValueError, match="already registered"):
            register_reward(name)(lambda: None)
    finally:
        _REGISTRY.pop(name, None)


def test_jpeg_compressibility_is_minus_size_in_kb():
    images = _smooth_and_noisy()
    reward = get_reward_fn("jpeg_compressibility", quality=90)(images, ["flat", "noise"])
    assert reward.dtype == torch.float32 and reward.shape == (2,)
    for i in range(2):
        buffer = io.BytesIO()
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=90)
        assert reward[i].item() == pytest.approx(-buffer.tell() / 1000.0)
    # A flat image compresses far better than noise, so it earns the higher reward.
    assert reward[0] > reward[1]


def test_jpeg_incompressibility_is_the_negative():
    images = _smooth_and_noisy()
    compress = get_reward_fn("jpeg_compressibility")(images, ["a", "b"])
    incompress = get_reward_fn("jpeg_incompressibility")(images, ["a", "b"])
    torch.testing.assert_close(incompress, -compress)
    assert incompress[1] > incompress[0]
    assert jpeg_size_kb(images[1]) == pytest.approx(incompress[1].item())


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(2, 3, 8, 8), "uint8"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), r"\(B, 3, H, W\)"),
        (torch.zeros(3, 3, 8, 8, dtype=torch.uint8), "3 images but 2 prompts"),
    ],
)
def test_reward_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        get_reward_fn("jpeg_compressibility")(images, ["a", "b"])


def test_jpeg_quality_is_validated():
    with pytest.raises(ValueError, match="quality"):
        get_reward_fn("jpeg_compressibility", quality=0)


# ---------------------------------------------------------------- PickScore on a tiny random CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP model + processor saved with save_pretrained: an ASCII character vocab, 32x32 images."""
    transformers = pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    image_processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    chars = [chr(i) for i in range(33, 127)]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = image_processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_pickscore_matches_logit_scale_times_cosine(tiny_clip_dir):
    from transformers import AutoProcessor, CLIPModel

    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cube", "blue sky over green hills", "a cat"]
    reward = get_reward_fn("pickscore", model_path=str(tiny_clip_dir), batch_size=2)
    scores = reward(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (3,)

    # Independent reference: PickScore's own recipe (embed separately, normalise, scale the dot product).
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        pixel = processor(images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")
        text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img_emb = model.visual_projection(model.vision_model(**pixel).pooler_output)
        txt_emb = model.text_projection(model.text_model(**text).pooler_output)
        img_emb = img_emb / img_emb.norm(dim=-1, keepdim=True)
        txt_emb = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (img_emb * txt_emb).sum(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores.abs().max() <= model.logit_scale.exp().item() + 1e-4  # a scaled cosine
    # Different prompts for the same image give different scores: the text actually conditions the score.
    same_image = reward(images[:1].expand(2, -1, -1, -1).contiguous(), ["a red cube", "blue sky over green hills"])
    assert not torch.isclose(same_image[0], same_image[1])


def test_pickscore_bfloat16_close_to_float32(tiny_clip_dir):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    full = get_reward_fn("pickscore", model_path=str(tiny_clip_dir))(images, ["a", "b"])
    half = get_reward_fn("pickscore", model_path=str(tiny_clip_dir), dtype="bfloat16")(images, ["a", "b"])
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


def test_pickscore_needs_a_loadable_model_path(tmp_path):
    with pytest.raises(ValueError, match="model_path"):
        get_reward_fn("pickscore")
    with pytest.raises(ValueError, match=r"could not load a CLIP model from model_path="):
        get_reward_fn("pickscore", model_path=str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        get_reward_fn("pickscore", model_path=str(tmp_path), dtype="int8")


def test_builtin_reward_modules_register_the_names_listed_and_load_only_when_named():
    """``BUILTIN_REWARD_MODULES`` names each built-in reward's module; naming a reward imports only its module."""
    import importlib
    import subprocess
    import sys

    from verl_omni.rewards.registry import _REGISTRY, BUILTIN_REWARD_MODULES

    for name, module in BUILTIN_REWARD_MODULES.items():
        importlib.import_module(module)
        assert name in _REGISTRY, (name, module)
    code = (
        "import sys; from verl_omni.rewards.registry import reward_factory, registered_rewards\n"
        "assert 'pickscore' in registered_rewards() and 'torch' not in sys.modules\n"
        "try:\n    reward_factory('nope')\nexcept ValueError as err:\n    assert 'geneval_color' in str(err)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "reward_factory('jpeg_compressibility'); assert 'verl_omni.rewards.pickscore' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_checking_builtin_reward_options_and_colour_prompts_loads_no_torch():
    """The recipe checks ``reward.name``/``reward.kwargs`` (and the colour reward its prompt file) before Ray starts:
    in a fresh interpreter, checking every built-in reward's options and a colour prompt must not import torch
    (about 0.9 s of single-threaded start-up). On failure the message shows the import chain that loaded it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import json, sys, traceback\n"
        "class FirstTorchImport:  # records who imports torch first; finds nothing itself\n"
        "    stack = None\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and FirstTorchImport.stack is None:\n"
        "            FirstTorchImport.stack = ''.join(traceback.format_stack()[:-1])\n"
        "sys.meta_path.insert(0, FirstTorchImport())\n"
        "from verl_omni.rewards.registry import BUILTIN_REWARD_MODULES, check_reward_options\n"
        "for name in BUILTIN_REWARD_MODULES:\n"
        "    check_reward_options(name, {})\n"
        "from verl_omni.rewards.color import GenEvalColorReward\n"
        "GenEvalColorReward.validate_prompts(['a red cube'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "print(json.dumps({'torch_modules': loaded, 'first_import': FirstTorchImport.stack}))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert not report["torch_modules"], (
        f"torch loaded by the start-up reward check: {report['torch_modules'][:10]} ... "
        f"first imported from:\n{report['first_import']}"
    )
