"""Let vllm-omni 0.28 load its text-to-video Wan pipeline where torchvision cannot be imported (vLLM's CPU build).

vllm-omni's ``vllm_omni.diffusion.models.wan2_2`` package ``__init__`` imports every Wan pipeline; the image-to-video
and speech-to-video ones import torchvision at module level. Any import of the package's text-to-video module (the
engine's post-processing hook, the FlowGRPO subclass) runs that ``__init__`` first, so without torchvision no Wan
checkpoint loads. vLLM's CPU build environment has none: PyPI's torchvision builds do not import beside CPU torch
(see the Makefile). Text-to-video needs no torchvision.

Where torchvision is missing, :func:`register_wan2_2_package` registers the package without running its ``__init__``:
its modules (``pipeline_wan2_2``, ``wan2_2_transformer``, ...) then load as they are, and the names the ``__init__``
would export come from ``pipeline_wan2_2`` on first access. The one thing the ``__init__`` does besides importing,
``patch_wan_rms_norm()`` (vllm-omni's RMSNorm in diffusers' Wan VAE), is :func:`finish_wan2_2_package`'s, called by
the FlowGRPO pipeline before it builds the VAE. Upstream fix: ``patches/vllm-omni/0004`` (torchvision imported where
those pipelines use it). Where torchvision imports, or the package is already imported, nothing changes.

Imports nothing of vllm-omni: it runs from verl-omni's CPU platform hook, while vllm-omni itself is being imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

PACKAGE = "vllm_omni.diffusion.models.wan2_2"
_T2V_MODULE = f"{PACKAGE}.pipeline_wan2_2"
_STANDIN = "__verl_omni_standin__"  # marks a package registered here


def _torchvision_imports() -> bool:
    if "torchvision" in sys.modules:
        return True
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception:  # a build that does not import beside this torch: as good as missing
        return False
    return True


def register_wan2_2_package() -> bool:
    """Register vllm-omni's ``wan2_2`` package without its ``__init__`` where torchvision is missing; True if it did
    (now or before)."""
    current = sys.modules.get(PACKAGE)
    if current is not None:
        return bool(getattr(current, _STANDIN, False))
    root = getattr(sys.modules.get("vllm_omni"), "__path__", None)
    if root is None:
        spec = importlib.util.find_spec("vllm_omni")
        root = None if spec is None else spec.submodule_search_locations
    if not root or _torchvision_imports():
        return False
    path = os.path.join(list(root)[0], "diffusion", "models", "wan2_2")
    if not os.path.isdir(path):
        return False
    module = types.ModuleType(PACKAGE, "vllm-omni's Wan pipelines, registered by verl-omni without the __init__")
    module.__path__ = [path]
    module.__package__ = PACKAGE
    module.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    module.__spec__.submodule_search_locations = [path]
    module.__getattr__ = _export  # type: ignore[attr-defined]
    setattr(module, _STANDIN, True)
    sys.modules[PACKAGE] = module
    return True


def _export(name: str) -> Any:
    """What the package ``__init__`` exports from the text-to-video module, imported on first access."""
    if name.startswith("__"):
        raise AttributeError(name)
    t2v = importlib.import_module(_T2V_MODULE)
    if hasattr(t2v, name):
        return getattr(t2v, name)
    raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r} (torchvision is missing: text-to-video only)")


def finish_wan2_2_package() -> None:
    """What the skipped ``__init__`` does besides importing: vllm-omni's RMSNorm in diffusers' Wan VAE (run before a
    VAE is built; a no-op for a package imported normally, whose ``__init__`` did it)."""
    if getattr(sys.modules.get(PACKAGE), _STANDIN, False):
        from vllm_omni.diffusion.models.wan2_2.patch_diffusers import patch_wan_rms_norm

        patch_wan_rms_norm()
