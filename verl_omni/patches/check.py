"""Apply the patch series to a throwaway copy of the installed verl (or vllm-omni) and prove the result imports.

Nothing here touches site-packages: the installed package (``verl`` by default) is copied into a temporary
folder, the series is applied there in order, and the patched copy is imported in a separate
Python process whose ``sys.path`` starts with that folder. A patch whose reverse applies cleanly is
reported as already upstream (the installed verl has the change), so the series can shrink.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from verl_omni.patches.series import Patch

APPLIED = "applied"
UPSTREAM = "already upstream"
FAILED = "failed"
TOOLS = ("patch", "git")


@dataclass
class PatchResult:
    """Outcome of one patch: ``applied``, ``already upstream`` or ``failed`` (with the tool's message)."""

    patch: Patch
    status: str
    detail: str = ""


@dataclass
class CheckReport:
    """Per-patch results plus the import of the patched copy (``None`` when it was not attempted)."""

    results: list[PatchResult] = field(default_factory=list)
    import_ok: bool | None = None
    import_detail: str = ""

    @property
    def ok(self) -> bool:
        return all(r.status != FAILED for r in self.results) and self.import_ok is not False


# The packages a series may patch: import name -> distribution name and how to install it.
PACKAGES = {"verl": ("verl", "pip install verl==0.9.1"), "vllm_omni": ("vllm-omni", "make install-vllm-omni")}


def installed_verl_dir(package: str = "verl") -> Path:
    """The source folder of the installed ``package`` (verl by default), found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed in this environment ({PACKAGES[package][1]})")
    return Path(next(iter(spec.submodule_search_locations)))


def installed_verl_version(package: str = "verl") -> str:
    """The installed package's version from its metadata (``unknown`` without one), for the report."""
    try:
        return importlib.metadata.version(PACKAGES[package][0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def copy_verl(source: Path, root: Path, package: str = "verl") -> Path:
    """Copy a package folder to ``root/<package>`` (no bytecode), so ``-p1`` paths resolve under root."""
    source = Path(source)
    if not (source / "__init__.py").is_file():
        raise FileNotFoundError(f"{source} is not a Python package folder (no __init__.py)")
    dest = Path(root) / package
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def default_tool() -> str:
    """``patch`` when installed (GNU patch), else ``git apply``."""
    for tool in TOOLS:
        if shutil.which(tool):
            return tool
    raise FileNotFoundError("neither 'patch' nor 'git' is on PATH; install one to check the series")


def _run_tool(tool: str, patch_file: Path, root: Path, *, reverse: bool, dry_run: bool) -> tuple[bool, str]:
    """Apply (or test) one patch under ``root``; no fuzz, so a stale context counts as a failure."""
    if tool == "patch":
        cmd = ["patch", "-p1", "--fuzz=0", "--force", "--no-backup-if-mismatch", "--reject-file=-"]
        cmd += ["-d", str(root), "-i", str(patch_file)]
        cmd += ["--reverse"] if reverse else []
        cmd += ["--dry-run"] if dry_run else []
        env = None
    elif tool == "git":
        cmd = ["git", "apply", "-p1"]
        cmd += ["--reverse"] if reverse else []
        cmd += ["--check"] if dry_run else []
        cmd += [str(patch_file)]
        # Never let git discover an enclosing repository: paths must resolve under root.
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(root).resolve().parent)}
    else:
        raise ValueError(f"unknown patch tool {tool!r}; valid: {', '.join(TOOLS)}")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def apply_series(series: Sequence[Patch], root: Path, tool: str | None = None) -> list[PatchResult]:
    """Apply each patch under ``root`` in order and classify it.

    Forward applies cleanly -> applied. Otherwise, reverse applies cleanly -> already upstream
    (left as is). Otherwise failed; later patches are still tried so one run reports them all.
    """
    tool = tool or default_tool()
    results = []
    for patch in series:
        ok, out = _run_tool(tool, patch.path, root, reverse=False, dry_run=True)
        if ok:
            ok, out = _run_tool(tool, patch.path, root, reverse=False, dry_run=False)
            results.append(PatchResult(patch, APPLIED if ok else FAILED, "" if ok else out))
            continue
        if _run_tool(tool, patch.path, root, reverse=True, dry_run=True)[0]:
            results.append(PatchResult(patch, UPSTREAM))
        else:
            results.append(PatchResult(patch, FAILED, out))
    return results


_IMPORT_PROBE = """
import importlib, os, sys
root, package = os.path.realpath(sys.argv[1]), sys.argv[2]
where = os.path.realpath(importlib.import_module(package).__file__)
if not where.startswith(root + os.sep):
    sys.exit(f"imported {package} from {where}, not from the patched copy under {root}")
for name in sys.argv[3:]:
    importlib.import_module(name)
print(f"imported {', '.join(sys.argv[3:])} from {os.path.dirname(where)}")
"""


def import_patched(root: Path, modules: Sequence[str], timeout: float = 600, package: str = "verl") -> tuple[bool, str]:
    """Import ``modules`` from the patched copy under ``root`` in a fresh interpreter.

    The copy goes first on ``sys.path`` (PYTHONPATH and cwd); the probe fails if ``verl`` still
    resolves elsewhere (e.g. an editable install's import hook), so a pass means the copy imported.
    """
    root = Path(root).resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    modules = list(dict.fromkeys(modules)) or [package]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, str(root), package, *modules],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, f"import of {', '.join(modules)} timed out after {timeout:.0f}s"
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return False, "\n".join(out.splitlines()[-15:])  # the traceback's tail names the error
    return True, out


def check_series(
    series: Sequence[Patch],
    verl_source: Path | None = None,
    *,
    tool: str | None = None,
    run_import: bool = True,
    package: str = "verl",
) -> CheckReport:
    """Copy verl to a temporary folder, apply the series, and import the result; the folder is then removed.

    The import is skipped when a patch failed: the copy is then known broken and the failure is
    already reported against the patch that caused it.
    """
    source = Path(verl_source) if verl_source else installed_verl_dir(package)
    with tempfile.TemporaryDirectory(prefix="verl-omni-patches-") as tmp:
        root = Path(tmp)
        copy_verl(source, root, package)
        report = CheckReport(results=apply_series(series, root, tool))
        if not run_import:
            report.import_detail = "skipped (--no-import)"
        elif any(r.status == FAILED for r in report.results):
            report.import_detail = "skipped: a patch failed"
        else:
            modules = [m for r in report.results for m in r.patch.modules]
            report.import_ok, report.import_detail = import_patched(root, modules, package=package)
    return report
