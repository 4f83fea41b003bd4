"""Check a patch series against the installed package: ``python patches/check.py [--package vllm_omni]``.

``git apply`` applies each diff; this adds what it cannot do alone: the series order (each patch against the tree
with the ones above applied), the header every patch must carry (``Purpose``, ``Overlay``, ``Upstream``), diffs
confined to the package, "already upstream" (the reverse applies: drop the patch and its overlay code) and an
import of the patched copy. Everything happens in a throwaway copy, never in site-packages.

Exit status: 0 when every patch applied or is upstream and the copy imports; 1 when a patch or the import failed;
2 when the series is malformed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERIES_DIRS = {"verl": HERE, "vllm_omni": HERE / "vllm-omni"}  # import name -> folder holding its ``series``
REQUIRED = ("Purpose", "Overlay", "Upstream")
APPLIED, UPSTREAM, FAILED = "applied", "already upstream", "failed"


class SeriesError(ValueError):
    """The series or a patch file is malformed: a setup error, not a patch that fails to apply."""


@dataclass(frozen=True)
class Patch:
    name: str  # as listed in ``series``
    path: Path
    header: dict[str, str]  # ``Key: value`` lines before the diff (indented lines continue a value)
    targets: tuple[str, ...]  # the files it patches, relative to the copy's root (``-p1``)

    @property
    def modules(self) -> list[str]:
        """Dotted names of the Python modules it touches (what the check imports)."""
        return [re.sub(r"(/__init__)?\.py$", "", t).replace("/", ".") for t in self.targets if t.endswith(".py")]


def read_series(folder: Path, package: str = "verl") -> list[Patch]:
    """The patches ``folder/series`` lists (``#`` starts a comment), each with its header and targets."""
    listing = Path(folder) / "series"
    if not listing.is_file():
        raise SeriesError(f"no series file at {listing}")
    names = [line.split("#", 1)[0].strip() for line in listing.read_text().splitlines()]
    return [_read_patch(Path(folder), name, package) for name in names if name]


def _read_patch(folder: Path, name: str, package: str) -> Patch:
    path = folder / name
    if not path.is_file():
        raise SeriesError(f"{folder / 'series'}: patch {name!r} does not exist (looked for {path})")
    head, _, diff = path.read_text().partition("\n--- ")
    header: dict[str, str] = {}
    for line in head.splitlines():
        field = re.match(r"([A-Za-z][\w-]*):\s*(.*)", line)
        if field:
            key, header[field[1]] = field[1], field[2].strip()
        elif line[:1].isspace() and header:
            header[key] = f"{header[key]} {line.strip()}"
    missing = [f for f in REQUIRED if not header.get(f)]
    if missing:
        raise SeriesError(f"{name}: header lacks {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    targets = tuple(dict.fromkeys(t.split("/", 1)[-1] for t in re.findall(r"^\+\+\+ (\S+)", diff, re.M)))
    if not targets or any(not t.startswith(f"{package}/") for t in targets):
        raise SeriesError(f"{name}: the diff must patch files under {package}/ only, got {list(targets)}")
    return Patch(name, path, header, targets)


def _git_apply(root: Path, patch: Path, *flags: str) -> tuple[bool, str]:
    # GIT_CEILING_DIRECTORIES: never let git find an enclosing repository; paths resolve under root
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)}
    cmd = ["git", "apply", "-p1", *flags, str(patch)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def apply_series(series: Sequence[Patch], root: Path) -> list[tuple[Patch, str, str]]:
    """Apply each patch under ``root`` in order: (patch, status, git's message when it failed)."""
    results = []
    for patch in series:
        ok, out = _git_apply(root, patch.path)
        if ok:
            results.append((patch, APPLIED, ""))
        else:
            upstream = _git_apply(root, patch.path, "--reverse", "--check")[0]
            results.append((patch, UPSTREAM, "") if upstream else (patch, FAILED, out))
    return results


_PROBE = """
import importlib, os, sys
root, package = os.path.realpath(sys.argv[1]), sys.argv[2]
where = os.path.realpath(importlib.import_module(package).__file__)
if not where.startswith(root + os.sep):
    sys.exit(f"imported {package} from {where}, not from the patched copy under {root}")
for name in sys.argv[3:]:
    importlib.import_module(name)
print(f"imported {', '.join(sys.argv[3:])} from {os.path.dirname(where)}")
"""


def import_patched(root: Path, modules: Sequence[str], package: str = "verl") -> tuple[bool, str]:
    """Import ``modules`` from the copy under ``root`` in a fresh interpreter (the copy first on ``sys.path``)."""
    root = Path(root).resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-c", _PROBE, str(root), package, *(dict.fromkeys(modules) or [package])]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    out = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, out if proc.returncode == 0 else "\n".join(out.splitlines()[-15:])


def check(folder: Path, source: Path, package: str = "verl", run_import: bool = True) -> int:
    """Copy ``source`` (the package folder), apply the series, import the copy; prints a report, returns 0 or 1."""
    series = read_series(folder, package)
    print(f"checking {len(series)} patch(es) from {folder / 'series'} against {source}")
    with tempfile.TemporaryDirectory(prefix="verl-omni-patches-") as tmp:
        root = Path(tmp)
        shutil.copytree(source, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        results = apply_series(series, root)
        for patch, status, detail in results:
            print(f"  {status:<16}  {patch.name}  [{patch.header.get('Subject', patch.path.stem)}]")
            if detail:
                print(textwrap.indent(detail, "      "))
        failed = any(status == FAILED for _, status, _ in results)
        if failed:
            ok, shown, detail = False, "skipped: a patch failed", ""
        elif not run_import:
            ok, shown, detail = None, "skipped (--no-import)", ""
        else:
            ok, detail = import_patched(root, [m for p in series for m in p.modules], package)
            shown = "ok" if ok else "FAILED"
    print(f"  import of the patched copy: {shown}")
    if detail:
        print(textwrap.indent(detail, "      "))
    counts = ", ".join(f"{sum(s == status for _, s, _ in results)} {status}" for status in (APPLIED, UPSTREAM, FAILED))
    print(f"{counts} -- {'FAILED' if ok is False else 'OK'}")
    return 1 if ok is False else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python patches/check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--package", choices=sorted(SERIES_DIRS), default="verl", help="the package patched")
    parser.add_argument("--patches-dir", type=Path, help="the folder holding 'series' (default: the package's)")
    parser.add_argument("--source", type=Path, help="a package folder to check against (default: the installed one)")
    parser.add_argument("--no-import", action="store_true", help="skip importing the patched copy")
    args = parser.parse_args(argv)
    spec = importlib.util.find_spec(args.package) if args.source is None else None
    source = args.source or (Path(next(iter(spec.submodule_search_locations))) if spec else None)
    if source is None:
        print(f"error: {args.package} is not installed in this environment", file=sys.stderr)
        return 2
    try:
        return check(args.patches_dir or SERIES_DIRS[args.package], source, args.package, not args.no_import)
    except SeriesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
