"""``python -m verl_omni.patches [--package vllm_omni] {list,check}``: show a patch series, or check it against
the installed package (verl: ``patches/series``; vllm-omni: ``patches/vllm-omni/series``).

Exit status: 0 when every patch applied (or is already upstream) and the patched copy imports,
1 when a patch failed or the import failed, 2 for a malformed series (missing file, bad header).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from verl_omni.patches.check import (
    FAILED,
    PACKAGES,
    check_series,
    installed_verl_dir,
    installed_verl_version,
)
from verl_omni.patches.series import PatchSeriesError, default_patches_dir, read_series, unlisted_patches

_WRAP = 96


def _indent(text: str, prefix: str = "      ") -> str:
    return textwrap.fill(text, width=_WRAP, initial_indent=prefix, subsequent_indent=prefix)


def cmd_list(patches_dir: Path, package: str = "verl") -> int:
    """Print each patch in series order with its purpose, overlay class and upstream status."""
    series = read_series(patches_dir, package)
    print(f"{patches_dir / 'series'}: {len(series)} patch(es)")
    for i, patch in enumerate(series, start=1):
        print(f"{i:>3}. {patch.name}  [{patch.subject}]")
        print(_indent(f"purpose: {patch.purpose}"))
        print(_indent(f"overlay: {patch.header['Overlay']}"))
        print(_indent(f"upstream: {patch.header['Upstream']}"))
    for name in unlisted_patches(patches_dir, series):
        print(f"warning: {name} is not listed in series", file=sys.stderr)
    return 0


def cmd_check(
    patches_dir: Path, verl_dir: Path | None, tool: str | None, run_import: bool, package: str = "verl"
) -> int:
    """Apply the series to a temporary copy of the package and report each patch; 1 on any failure."""
    series = read_series(patches_dir, package)
    source = verl_dir or installed_verl_dir(package)
    version = installed_verl_version(package) if verl_dir is None else "from --verl-dir"
    print(f"checking {len(series)} patch(es) from {patches_dir / 'series'} against {package} {version} at {source}")
    report = check_series(series, source, tool=tool, run_import=run_import, package=package)
    width = max((len(r.status) for r in report.results), default=0)
    for r in report.results:
        print(f"  {r.status:<{width}}  {r.patch.name}")
        if r.status == FAILED and r.detail:
            print(textwrap.indent(r.detail, "      "))
    import_status = {True: "ok", False: "FAILED", None: "not run"}[report.import_ok]
    print(f"  import of the patched copy: {import_status}")
    if report.import_detail:
        print(textwrap.indent(report.import_detail, "      "))
    for name in unlisted_patches(patches_dir, series):
        print(f"warning: {name} is not listed in series", file=sys.stderr)
    counts = {s: sum(r.status == s for r in report.results) for s in ("applied", "already upstream", "failed")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + (" -- OK" if report.ok else " -- FAILED"))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl_omni.patches", description=__doc__.splitlines()[0])
    parser.add_argument("--patches-dir", type=Path, default=None, help="folder holding 'series' (default: ./patches)")
    parser.add_argument(
        "--package", choices=sorted(PACKAGES), default="verl", help="the package the series patches (default: verl)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the series with each patch's purpose")
    check = sub.add_parser("check", help="apply the series to a temporary copy of the installed verl")
    check.add_argument("--verl-dir", type=Path, default=None, help="a verl package folder to copy instead")
    check.add_argument("--tool", choices=("patch", "git"), default=None, help="default: patch if installed, else git")
    check.add_argument("--no-import", action="store_true", help="skip importing the patched copy")
    args = parser.parse_args(argv)
    try:
        patches_dir = args.patches_dir or default_patches_dir()
        if args.package != "verl" and args.patches_dir is None:
            patches_dir = patches_dir / args.package.replace("_", "-")
        if args.command == "list":
            return cmd_list(patches_dir, args.package)
        return cmd_check(patches_dir, args.verl_dir, args.tool, not args.no_import, args.package)
    except (PatchSeriesError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
