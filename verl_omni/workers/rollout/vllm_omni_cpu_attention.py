"""vllm-omni's torch-SDPA attention backend, runnable on :mod:`.vllm_omni_cpu_platform`.

vllm-omni's ``AttentionImpl.forward`` dispatches on the platform (cuda, hip, npu, xpu, musa) and raises for any
other; the SDPA computation itself (``_forward_impl``) is platform-neutral, so the CPU implementation calls it
directly. Selected by the CPU platform's ``get_diffusion_attn_backend_cls``; imported only inside vllm-omni.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm_omni.diffusion.attention.backends.sdpa import SDPABackend, SDPAImpl


class CpuSDPAImpl(SDPAImpl):
    """``torch.nn.functional.scaled_dot_product_attention`` through vllm-omni's SDPA code, on CPU."""

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_metadata: Any = None
    ) -> torch.Tensor:
        return self._forward_impl(query, key, value, attn_metadata)


class CpuSDPABackend(SDPABackend):
    """The SDPA backend with :class:`CpuSDPAImpl` as its implementation."""

    @staticmethod
    def get_impl_cls() -> type[SDPAImpl]:
        return CpuSDPAImpl


def route_sdpa_fallbacks(model: torch.nn.Module) -> int:
    """Give every attention layer of ``model`` a float32 fallback that runs on CPU; returns how many were changed.

    vllm-omni's ``Attention`` layer sends float32 inputs to an ``sdpa_fallback`` that it always builds as the stock
    ``SDPAImpl``, whatever the platform selected, so on CPU (where float32 is the default) no hook reaches it. The
    layers belong to our own pipeline: each fallback is rebuilt as a :class:`CpuSDPAImpl` with the same state.
    Upstream fix: ``patches/vllm-omni/`` (the fallback from the platform's backend).
    """
    changed = 0
    for module in model.modules():
        fallback = getattr(module, "sdpa_fallback", None)
        if type(fallback) is SDPAImpl:
            cpu_fallback = CpuSDPAImpl.__new__(CpuSDPAImpl)
            cpu_fallback.__dict__.update(vars(fallback))
            module.sdpa_fallback = cpu_fallback
            changed += 1
    return changed
