"""PickScore reward (Kirstain et al. 2023): a CLIP model fine-tuned on human preferences, loaded from a path.

For GPU runs with the real checkpoint (``yuvalkirstain/PickScore_v1`` with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). The score is PickScore's: ``logit_scale.exp() * cos(image, text)``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from verl_omni.rewards.registry import register_reward, validate_reward_inputs

if TYPE_CHECKING:
    import torch

CLIP_MAX_TEXT_LENGTH = 77


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"reward option dtype must be a floating torch dtype name (e.g. 'bfloat16'), got {dtype!r}")
    return resolved


@register_reward("pickscore")
class PickScoreReward:
    """Scores each (image, prompt) pair with a CLIP model and processor loaded by ``from_pretrained``.

    Args:
        model_path: directory (or hub id, where the machine can reach the hub) of a ``CLIPModel``.
        processor_path: where the ``CLIPProcessor`` lives; defaults to ``model_path``.
        device: where the scorer runs; rewards are returned on the CPU either way.
        dtype: the scorer's parameter dtype (``bfloat16`` halves memory on GPUs).
        batch_size: images scored per forward pass, to bound memory for large rollout batches.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        processor_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "float32",
        batch_size: int = 32,
    ) -> None:
        if not model_path:
            raise ValueError(
                "reward 'pickscore' needs option model_path: a CLIP model saved with save_pretrained "
                f"(e.g. yuvalkirstain/PickScore_v1), got {model_path!r}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"reward option batch_size must be a positive int, got {batch_size!r}")
        import torch  # here: checking the reward's options (the recipe's start-up check) needs no torch
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = batch_size
        processor_path = processor_path or model_path
        try:
            self.processor = AutoProcessor.from_pretrained(processor_path)
            self.model = CLIPModel.from_pretrained(model_path, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"reward 'pickscore' could not load a CLIP model from model_path={str(model_path)!r} and a "
                f"processor from processor_path={str(processor_path)!r}: {exc}"
            ) from exc
        self.model.to(self.device).eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch

        validate_reward_inputs(images, prompts)
        with torch.no_grad():
            scores = [
                self._score(images[start : start + self.batch_size], prompts[start : start + self.batch_size])
                for start in range(0, images.shape[0], self.batch_size)
            ]
        if not scores:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(scores).float().cpu()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch

        pixels = [image.permute(1, 2, 0).cpu().numpy() for image in images]
        inputs = self.processor(
            text=list(prompts),
            images=pixels,
            padding=True,
            truncation=True,
            max_length=CLIP_MAX_TEXT_LENGTH,
            return_tensors="pt",
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        output = self.model(**inputs)
        image_emb = torch.nn.functional.normalize(output.image_embeds.float(), dim=-1)
        text_emb = torch.nn.functional.normalize(output.text_embeds.float(), dim=-1)
        return self.model.logit_scale.float().exp() * (image_emb * text_emb).sum(dim=-1)
