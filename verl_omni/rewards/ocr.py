"""OCR reward (FlowGRPO's visual text rendering task): how closely the text read in the image matches the text the
prompt asks for (``reward.name=ocr``).

The formula is the reference's (``flow_grpo/ocr.py``): the target is the text between the first pair of double
quotes of the prompt; spaces are removed and both texts lower-cased; the distance is 0 when the target occurs in
what was read and the Levenshtein distance otherwise, capped at the target's length; ``reward = 1 - d / len(target)``
(1: exact, 0: nothing right, never negative however much unrelated text was read).

Text is read with PaddleOCR's PP-OCRv4 detection and recognition models as the ``rapidocr-onnxruntime`` wheel
ships them (ONNX files inside the wheel: no download), on onnxruntime: CPU, or CUDA with ``onnxruntime-gpu``.
Like the reference, no angle classifier runs and lines scoring under ``text_score`` (PaddleOCR's drop score, 0.5)
are dropped. One difference: the reference loads PaddleOCR's English recogniser, the wheel has the Chinese and
English one (it reads Latin letters and digits too).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from verl_omni.rewards.registry import register_reward, validate_reward_inputs

if TYPE_CHECKING:
    import torch

OCR_REWARD_NAME = "ocr"
OCR_DEVICES = ("cpu", "cuda")


def target_text(prompt: str) -> str:
    """The text ``prompt`` asks to render: what stands between its first two double quotes.

    Raises ``ValueError`` naming the prompt when it marks no text (no closing quote, or only spaces between the
    quotes): the reward could only score such a prompt 0, whatever the image shows.
    """
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(
            f"reward {OCR_REWARD_NAME!r}: prompt {prompt!r} marks no text to render; put the text in double quotes, "
            "e.g. 'a shop sign that says \"OPEN\"'"
        )
    return parts[1]


def ocr_score(read: str, target: str) -> float:
    """The reference's OCR reward of ``read`` (the recognised text) against ``target`` (the prompt's text)."""
    from rapidfuzz.distance import Levenshtein

    read = read.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        raise ValueError("the target text is empty; target_text() refuses such prompts")
    distance = 0 if target in read else Levenshtein.distance(read, target)
    return 1.0 - min(distance, len(target)) / len(target)


def _validate_options(device: str, text_score: float, num_threads: int | None) -> None:
    if device not in OCR_DEVICES:
        raise ValueError(f"reward {OCR_REWARD_NAME!r} option device={device!r} is not valid; valid choices: cpu, cuda")
    if isinstance(text_score, bool) or not isinstance(text_score, int | float) or not 0 <= text_score <= 1:
        raise ValueError(f"reward {OCR_REWARD_NAME!r} option text_score={text_score!r} must be a number in [0, 1]")
    bad_threads = isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    if num_threads is not None and bad_threads:
        raise ValueError(
            f"reward {OCR_REWARD_NAME!r} option num_threads={num_threads!r} must be a positive int or null "
            "(onnxruntime's default: every core)"
        )


@register_reward(OCR_REWARD_NAME)
class OcrReward:
    """Reads the text in each image with PP-OCRv4 and scores it against the prompt's quoted text.

    Args:
        device: ``cpu``, or ``cuda`` (needs ``onnxruntime-gpu``: refused at start-up when CUDA is not available
            to onnxruntime, never a silent fall-back to the CPU).
        text_score: recognised lines with a lower confidence are dropped (PaddleOCR's ``drop_score``).
        num_threads: onnxruntime threads per model; null uses every core.
    """

    def __init__(self, device: str = "cpu", text_score: float = 0.5, num_threads: int | None = None) -> None:
        _validate_options(device, text_score, num_threads)
        import onnxruntime
        from rapidocr_onnxruntime import RapidOCR

        if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ValueError(
                f"reward {OCR_REWARD_NAME!r} option device='cuda' needs onnxruntime-gpu with CUDA; onnxruntime "
                f"offers only {onnxruntime.get_available_providers()}"
            )
        options: dict[str, object] = {"text_score": float(text_score), "print_verbose": False}
        for model in ("det", "cls", "rec"):
            options[f"{model}_use_cuda"] = device == "cuda"
        if num_threads is not None:  # RapidOCR copies its global thread count to each model
            options["intra_op_num_threads"] = num_threads
        self.device = device
        self.engine = RapidOCR(**options)
        # One image at a time: onnxruntime already spreads one over the cores, and samples of a batch are
        # scored from several threads.
        self._lock = threading.Lock()

    @staticmethod
    def validate_prompts(prompts: list[str]) -> None:
        """Raise the ``ValueError`` of :func:`target_text` for the first prompt that marks no text, so the recipe
        refuses such a prompt file before Ray starts."""
        for prompt in prompts:
            target_text(prompt)

    def read_text(self, image_chw: torch.Tensor) -> str:
        """The text PP-OCR reads in one uint8 ``(3, H, W)`` RGB image, lines joined top to bottom ('' for none)."""
        import numpy as np

        bgr = np.ascontiguousarray(image_chw.detach().cpu().permute(1, 2, 0).numpy()[..., ::-1])
        with self._lock:
            lines, _ = self.engine(bgr, use_cls=False)
        return "".join(str(line[1]) for line in lines or [])

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch

        validate_reward_inputs(images, prompts)
        targets = [target_text(p) for p in prompts]  # a prompt it cannot score fails before any OCR runs
        scores = [ocr_score(self.read_text(image), target) for image, target in zip(images, targets, strict=True)]
        return torch.tensor(scores, dtype=torch.float32)
