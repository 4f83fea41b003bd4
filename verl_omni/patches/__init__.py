"""The patch layer: upstream-bound diffs against the pinned verl, checked but never applied at import.

``patches/series`` (at the repository root, not in the installed package) lists unified diffs
against verl 0.9.1 that the overlay reaches today by subclassing. ``python -m verl_omni.patches
check`` applies them to a temporary copy of the installed verl to prove they still apply and
import; ``list`` shows what each one is for. See ``patches/README.md`` for the policy.
"""

from verl_omni.patches.check import (
    APPLIED,
    FAILED,
    UPSTREAM,
    CheckReport,
    PatchResult,
    apply_series,
    check_series,
    copy_verl,
    import_patched,
    installed_verl_dir,
)
from verl_omni.patches.series import Patch, PatchSeriesError, default_patches_dir, read_patch, read_series

__all__ = [
    "APPLIED",
    "FAILED",
    "UPSTREAM",
    "CheckReport",
    "Patch",
    "PatchResult",
    "PatchSeriesError",
    "apply_series",
    "check_series",
    "copy_verl",
    "default_patches_dir",
    "import_patched",
    "installed_verl_dir",
    "read_patch",
    "read_series",
]
