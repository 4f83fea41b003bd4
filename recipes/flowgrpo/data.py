"""Prompt data for the FlowGRPO recipe: loading prompt files, a seeded, resumable per-step batch order, and the
fixed validation rows.

Everything here is a pure function of (prompts, seed, step), so resuming at step ``k`` reproduces the prompts,
``uid``s and per-row seeds of an uninterrupted run, in any process.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_omni.utils.seeding import stable_int

TRAIN_FILES_KEY = "data.train_files"
VAL_FILES_KEY = "data.val_files"
DEFAULT_PROMPT_FIELD = "prompt"
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "prompts.txt"
DEFAULT_VAL_PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "val_prompts.txt"

_UID_NAMESPACE = uuid.UUID("6f1c2a47-5d0e-4c1b-9a57-3f0b1e2d4c58")  # fixed: uids must not change between runs


def prompt_uid(base_seed: int, global_step: int, prompt_index: int) -> str:
    """Group id of the ``prompt_index``-th prompt of a step: a UUID string like verl's, but reproducible."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{int(base_seed)}:{int(global_step)}:{int(prompt_index)}"))


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _bad_input(path: str, expected: str, key: str) -> ValueError:
    return ValueError(f"{key}={path!r}: {expected}")


def _utf8_lines(path: Path, key: str) -> list[str]:
    """The file's lines decoded as UTF-8; a bad byte names the key, the file and the line (Python's own error
    gives only a byte offset)."""
    lines = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            detail = f"line {line_no} is not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
            raise _bad_input(str(path), f"{detail}; expected a UTF-8 text file", key) from None
    return lines


def _read_txt(path: Path, key: str) -> list[str]:
    return [line.strip() for line in _utf8_lines(path, key) if line.strip()]


def _checked_prompt(value: Any, where: str, field: str, path: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad_input(path, f"{where}: field {field!r} must be a non-empty string, got {value!r}", key)
    return value.strip()


def _read_jsonl(path: Path, field: str, key: str) -> list[str]:
    prompts = []
    for line_no, line in enumerate(_utf8_lines(path, key), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad_input(str(path), f"line {line_no} is not valid JSON ({exc.msg})", key) from exc
        if not isinstance(record, dict) or field not in record:
            raise _bad_input(
                str(path), f"line {line_no} has no field {field!r}; expected a JSON object with {field!r}", key
            )
        prompts.append(_checked_prompt(record[field], f"line {line_no}", field, str(path), key))
    return prompts


def _read_parquet(path: Path, field: str, key: str) -> list[str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if field not in schema.names:
        raise _bad_input(str(path), f"has no column {field!r}; columns: {schema.names}", key)
    values = pq.read_table(path, columns=[field]).column(field).to_pylist()
    return [_checked_prompt(v, f"row {i}", field, str(path), key) for i, v in enumerate(values)]


def load_prompts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    prompt_field: str = DEFAULT_PROMPT_FIELD,
    key: str = TRAIN_FILES_KEY,
) -> list[str]:
    """Read prompts from one or more ``.txt`` (one per line, blank lines skipped), ``.jsonl`` or ``.parquet`` files.

    ``prompt_field`` is the JSONL field / parquet column. Any problem (missing file, unknown extension, missing
    field, no prompts at all) is a ``ValueError`` naming ``key``, the value and what is expected, so a bad
    config fails before Ray or a model starts.
    """
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not path_list:
        raise ValueError(f"{key} is empty; expected one or more prompt files ({', '.join(SUPPORTED_EXTENSIONS)})")
    prompts: list[str] = []
    for raw in path_list:
        path = Path(os.path.expanduser(str(raw)))
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_EXTENSIONS:
            raise _bad_input(
                str(raw), f"unknown extension {suffix!r}; expected one of {list(SUPPORTED_EXTENSIONS)}", key
            )
        if not path.is_file():
            raise _bad_input(str(raw), "file not found; expected an existing prompt file", key)
        if suffix == ".txt":
            prompts.extend(_read_txt(path, key))
        elif suffix == ".jsonl":
            prompts.extend(_read_jsonl(path, prompt_field, key))
        else:
            prompts.extend(_read_parquet(path, prompt_field, key))
    if not prompts:
        shown = str(paths) if isinstance(paths, (str, os.PathLike)) else [str(p) for p in path_list]
        raise ValueError(f"{key}={shown!r} holds no prompts; expected at least one non-empty prompt")
    return prompts


@dataclass(frozen=True)
class PromptBatch:
    """The rows of one training step (or one validation chunk): prompts, each repeated ``n`` times interleaved.

    Row ``r`` belongs to group ``r // n``; ``row_index`` is its position in the whole step's batch (across all
    workers and validation chunks); the rollout seeds it with ``row_seed(base_seed, step, row_index[r])``.
    """

    step: int
    base_seed: int  # with ``step``, what the rollout derives each row's seed from (``meta_info`` seed)
    prompts: list[str]
    uids: list[str]
    row_index: list[int]
    prompt_index: list[int]  # index of the row's prompt in the loaded prompt list

    def __len__(self) -> int:
        return len(self.prompts)


class PromptBatcher:
    """Yields each step's prompts from an endless stream of seeded epoch shuffles.

    Position ``i`` of the stream is prompt ``perm_e[i % P]`` with ``e = i // P`` and ``perm_e`` a permutation
    seeded by ``(seed, e)``; step ``k`` takes positions ``[k B, (k + 1) B)``. The batch is a pure function of
    ``(prompts, seed, step)``: no state to save beyond a fingerprint that catches a changed prompt file.
    """

    def __init__(self, prompts: Sequence[str], batch_size: int, n: int, seed: int = 0, shuffle: bool = True) -> None:
        if not prompts:
            raise ValueError("PromptBatcher needs at least one prompt")
        if not _is_positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not _is_positive_int(n):
            raise ValueError(f"n (samples per prompt) must be a positive int, got {n!r}")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.n = n
        self.seed = int(seed)
        self.shuffle = shuffle
        self._permutations: dict[int, list[int]] = {}  # epoch -> order; a batch spans at most a few epochs

    def _permutation(self, epoch: int) -> list[int]:
        order = self._permutations.get(epoch)
        if order is None:
            if self.shuffle:
                import torch  # here, not at import: the recipe's config checks run before torch loads

                generator = torch.Generator().manual_seed(stable_int("epoch", self.seed, epoch))
                order = torch.randperm(len(self.prompts), generator=generator).tolist()
            else:
                order = list(range(len(self.prompts)))
            if len(self._permutations) >= 4:
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[epoch] = order
        return order

    def prompt_indices(self, step: int) -> list[int]:
        """Indices into ``prompts`` of the ``batch_size`` distinct groups of ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        num = len(self.prompts)
        start = step * self.batch_size
        return [self._permutation(i // num)[i % num] for i in range(start, start + self.batch_size)]

    def batch(self, step: int) -> PromptBatch:
        """The interleaved rows ``p0 x n, p1 x n, ...`` of ``step``, with uids and global row indices."""
        groups = self.prompt_indices(step)
        prompt_index = [p for p in groups for _ in range(self.n)]
        uids = [prompt_uid(self.seed, step, g) for g in range(len(groups)) for _ in range(self.n)]
        rows = list(range(len(prompt_index)))
        return PromptBatch(
            step=step,
            base_seed=self.seed,
            prompts=[self.prompts[p] for p in prompt_index],
            uids=uids,
            row_index=rows,
            prompt_index=prompt_index,
        )

    def fingerprint(self) -> str:
        """Hash of the prompts and order options: a resume with a different prompt set would change the order."""
        h = hashlib.sha256()
        for prompt in self.prompts:
            h.update(prompt.encode())
            h.update(b"\0")
        h.update(f"{self.batch_size}:{self.seed}:{self.shuffle}".encode())
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to check that resuming continues the same order (the order is stateless)."""
        return {"fingerprint": self.fingerprint(), "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume with prompts, seed or batch size that differ from the checkpoint's."""
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "cannot resume: the prompt set, seed or batch size differs from the checkpoint's "
                f"(checkpoint seed={state.get('seed')!r}, batch_size={state.get('batch_size')!r}; "
                f"now seed={self.seed!r}, batch_size={self.batch_size!r}, {len(self.prompts)} prompts from "
                f"{TRAIN_FILES_KEY}); resuming would not reproduce the data order"
            )


def validation_seed(base_seed: int) -> int:
    """Base seed of the validation rows: derived from ``trainer.seed``, apart from every training step's seeds
    and uids, so validating never reuses (or shifts) training noise."""
    return stable_int("validation", int(base_seed))


class ValidationBatches:
    """The validation rows: every prompt ``n`` times (interleaved), in chunks of ``batch_size`` prompts.

    The rows, uids and seeds are the same at every validation (drawn as "step 0" under
    :func:`validation_seed`), so successive validations differ only by the policy: same prompts, same noise.
    A row's seed depends on its index among all validation rows, never on the chunking.
    """

    SEED_STEP = 0

    def __init__(self, prompts: Sequence[str], n: int, batch_size: int | None = None, seed: int = 0) -> None:
        if not prompts:
            raise ValueError("ValidationBatches needs at least one prompt")
        if not _is_positive_int(n):
            raise ValueError(f"n (samples per validation prompt) must be a positive int, got {n!r}")
        if batch_size is not None and not _is_positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.prompts = list(prompts)
        self.n = n
        self.batch_size = batch_size or len(self.prompts)
        self.seed = validation_seed(seed)

    def batches(self) -> list[PromptBatch]:
        """The chunks, in order; together they hold every prompt ``n`` times."""
        chunks = []
        for first in range(0, len(self.prompts), self.batch_size):
            groups = range(first, min(first + self.batch_size, len(self.prompts)))
            prompt_index = [p for p in groups for _ in range(self.n)]
            rows = list(range(first * self.n, first * self.n + len(prompt_index)))
            chunks.append(
                PromptBatch(
                    step=self.SEED_STEP,
                    base_seed=self.seed,
                    prompts=[self.prompts[p] for p in prompt_index],
                    uids=[prompt_uid(self.seed, self.SEED_STEP, p) for p in prompt_index],
                    row_index=rows,
                    prompt_index=prompt_index,
                )
            )
        return chunks
