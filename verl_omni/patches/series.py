"""Read ``patches/series`` and the header of each patch it lists.

A patch file is a free-text header of ``Key: value`` fields (indented lines continue a value)
followed by a unified diff against the pinned verl (``patches/series``) or, in its own series, against another
package the overlay builds on (``patches/vllm-omni/series``: vllm-omni). The header says why the patch exists, which
overlay class gives the same behaviour today, and where it stands upstream, so a reviewer can tell
what the overlay could drop once verl takes the change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FIELDS = ("Purpose", "Overlay", "Upstream")
# Lines that start the diff body; everything before the first one is the header.
_DIFF_START = ("--- ", "diff ", "Index: ")
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):\s*(.*)$")


class PatchSeriesError(ValueError):
    """The series or a patch file is malformed: a setup error, not a patch that fails to apply."""


@dataclass(frozen=True)
class Patch:
    """One entry of the series: its file, parsed header and the files it touches."""

    name: str  # as written in ``series``, relative to the patches folder
    path: Path
    header: dict[str, str]
    targets: tuple[str, ...] = field(default=())  # repo-relative paths after -p1, e.g. verl/x.py

    @property
    def purpose(self) -> str:
        return self.header["Purpose"]

    @property
    def subject(self) -> str:
        return self.header.get("Subject", self.path.stem)

    @property
    def modules(self) -> tuple[str, ...]:
        """Dotted names of the Python modules this patch touches (what the check imports)."""
        mods = []
        for target in self.targets:
            if target.endswith(".py"):
                parts = target[: -len(".py")].split("/")
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                mods.append(".".join(parts))
        return tuple(mods)


def default_patches_dir() -> Path:
    """``patches/`` at the root of the checkout this package runs from, else under the cwd.

    ``patches/`` is not part of the installed package (it is upstream-bound material, never
    applied at import time), so an installed wheel has to be pointed at it with ``--patches-dir``.
    """
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (repo_root / "patches", Path.cwd() / "patches"):
        if (candidate / "series").is_file():
            return candidate
    raise PatchSeriesError(
        f"no patches/series found at {repo_root / 'patches'} or {Path.cwd() / 'patches'}; "
        "run from a verl-omni checkout or pass --patches-dir"
    )


def parse_header(text: str, source: str) -> tuple[dict[str, str], str]:
    """Split a patch file into its header fields and its diff body.

    Raises ``PatchSeriesError`` naming ``source`` when the diff or a required field is missing.
    """
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(_DIFF_START)), None)
    if start is None:
        raise PatchSeriesError(f"{source}: no unified diff found (expected a line starting with '--- ')")
    header: dict[str, str] = {}
    key = None
    for line in lines[:start]:
        if line.strip() == "":
            key = None
            continue
        match = _FIELD.match(line)
        if match and not line[0].isspace():
            key = match.group(1)
            header[key] = match.group(2).strip()
        elif key is not None and line[0].isspace():
            header[key] = f"{header[key]} {line.strip()}".strip()
    missing = [name for name in REQUIRED_FIELDS if not header.get(name)]
    if missing:
        raise PatchSeriesError(f"{source}: header lacks {', '.join(missing)} (required: {', '.join(REQUIRED_FIELDS)})")
    return header, "".join(lines[start:])


def diff_targets(body: str, source: str, package: str = "verl") -> tuple[str, ...]:
    """Paths a diff touches, with the ``a/``/``b/`` prefix stripped (``-p1``); all must be under ``package``/."""
    targets: list[str] = []
    old = None
    for line in body.splitlines():
        if line.startswith("--- "):
            old = line[4:].split("\t")[0].strip()
        elif line.startswith("+++ "):
            new = line[4:].split("\t")[0].strip()
            path = old if new == "/dev/null" else new  # a deleted file is named by its old path
            if path is None or path == "/dev/null":
                raise PatchSeriesError(f"{source}: a '+++' line without a file to patch")
            stripped = path.split("/", 1)[1] if "/" in path else path
            if not stripped.startswith(f"{package}/"):
                raise PatchSeriesError(f"{source}: touches {path!r}; patches here apply to the {package} package only")
            if stripped not in targets:
                targets.append(stripped)
    if not targets:
        raise PatchSeriesError(f"{source}: the diff names no file ('--- a/...' / '+++ b/...' lines)")
    return tuple(targets)


def read_patch(path: Path, name: str | None = None, package: str = "verl") -> Patch:
    """Parse one patch file (header + diff) against ``package``."""
    name = name or path.name
    if not path.is_file():
        raise PatchSeriesError(f"patch {name!r} does not exist (looked for {path})")
    header, body = parse_header(path.read_text(encoding="utf-8"), name)
    return Patch(name=name, path=path, header=header, targets=diff_targets(body, name, package))


def read_series(patches_dir: Path, package: str = "verl") -> list[Patch]:
    """The patches listed in ``patches_dir/series`` (against ``package``), in order; ``#`` starts a comment.

    A missing series file, a missing or duplicated patch, or a malformed header raises
    ``PatchSeriesError`` naming the file and, for entries, the series line.
    """
    patches_dir = Path(patches_dir)
    series_file = patches_dir / "series"
    if not series_file.is_file():
        raise PatchSeriesError(f"no series file at {series_file}")
    patches: list[Patch] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(series_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        where = f"{series_file}:{lineno}"
        if entry in seen:
            raise PatchSeriesError(f"{where}: {entry!r} is listed twice")
        seen.add(entry)
        path = patches_dir / entry
        if not path.is_file():
            raise PatchSeriesError(f"{where}: patch {entry!r} listed in series does not exist (looked for {path})")
        patches.append(read_patch(path, entry, package))
    return patches


def unlisted_patches(patches_dir: Path, series: list[Patch]) -> list[str]:
    """``*.patch`` files under ``patches_dir`` that the series does not list (likely forgotten); a subfolder with a
    ``series`` of its own is another package's series and is not looked into."""
    listed = {p.path.resolve() for p in series}
    own = [d for d in Path(patches_dir).iterdir() if d.is_dir() and (d / "series").is_file()]
    return sorted(
        str(p.relative_to(patches_dir))
        for p in Path(patches_dir).rglob("*.patch")
        if p.resolve() not in listed and not any(d in p.parents for d in own)
    )
