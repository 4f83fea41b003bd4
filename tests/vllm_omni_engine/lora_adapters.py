"""The LoRA adapter the real-engine tests push to a replica: seeded, so the trainer's peft model and the engine's
in-memory adapter hold the same weights."""

from __future__ import annotations

import torch
from peft import LoraConfig


def random_lora(transformer: torch.nn.Module, seed: int, targets: list[str]) -> dict:
    """Add a peft adapter on ``targets`` with lora_alpha = 2 r (the SD3.5 recipe's ratio) and nonzero lora_B (peft
    initialises it to zero, which would not change the policy); returns its config."""
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian", "target_modules": targets}
    transformer.add_adapter(LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    return config
