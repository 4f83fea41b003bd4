"""The trainer's half of "one function in mixed precision": make the actor's bf16 forward the rollout's bf16 forward.

A rollout replica loads its pipeline with ``from_pretrained(torch_dtype=bf16)``: parameters *and* floating buffers
become bf16 (SD3's positional embedding is a buffer), and it feeds the transformer a float32 timestep. The actor
keeps float32 master weights and lets FSDP2's ``MixedPrecisionPolicy`` cast them, which casts parameters only and,
by default, every floating forward input (the timestep too). Measured on the tiny model (CPU, bf16 both sides):
those two differences alone put 85% of the first inner step outside a 1e-4 clip range. The actor therefore
casts its floating buffers as ``from_pretrained`` does (here), casts the forward inputs itself exactly as the
rollout does (``predict_velocity(dtype=...)``) and turns FSDP2's input cast off (``ActorFSDPConfig.mp_policy``).
"""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the config's dtype names)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}") from None


def cast_floating_buffers(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating-point buffer of ``module`` to ``dtype`` in place, as ``from_pretrained(torch_dtype=...)``
    leaves them in the rollout's copy (modules listed in ``_keep_in_fp32_modules`` stay float32 there and here).

    Returns how many buffers changed dtype. FSDP2 mixed precision never touches buffers, so without this the
    trainer would add a float32 positional embedding where the rollout adds its bf16 rounding.
    """
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    changed = 0
    for owner_name, owner in module.named_modules():
        if keep and any(part in keep for part in owner_name.split(".")):
            continue
        for name, buf in list(owner.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                owner.register_buffer(name, buf.to(dtype), persistent=name not in owner._non_persistent_buffers_set)
                changed += 1
    return changed
