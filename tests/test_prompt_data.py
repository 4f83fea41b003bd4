"""Prompt files, the seeded resumable batch order, uids and per-row seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recipes.flowgrpo.data import (
    DEFAULT_PROMPTS_FILE,
    DEFAULT_VAL_PROMPTS_FILE,
    VAL_FILES_KEY,
    PromptBatch,
    PromptBatcher,
    ValidationBatches,
    load_prompts,
    prompt_uid,
    validation_seed,
)
from verl_omni.utils.seeding import row_seed


def row_seeds(batch: PromptBatch) -> list[int]:
    """The seeds the rollout draws each row's noise from (``meta_info`` seed, step and global row index)."""
    return [row_seed(batch.base_seed, batch.step, r) for r in batch.row_index]


def test_shipped_prompts():
    prompts = load_prompts(DEFAULT_PROMPTS_FILE)
    assert 48 <= len(prompts) <= 96
    assert len(set(prompts)) == len(prompts)
    assert all(p == p.strip() and 0 < len(p) <= 80 for p in prompts)


def test_txt_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red cube\n\n   \n  a blue ball  \n")
    assert load_prompts(path) == ["a red cube", "a blue ball"]


def test_jsonl_with_default_and_custom_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "x": 1}) + "\n\n" + json.dumps({"prompt": "a dog"}) + "\n")
    assert load_prompts(path) == ["a cat", "a dog"]
    other = tmp_path / "q.jsonl"
    other.write_text(json.dumps({"caption": "a fish"}) + "\n")
    assert load_prompts(other, prompt_field="caption") == ["a fish"]
    with pytest.raises(ValueError, match=r"data\.train_files=.*q\.jsonl.*line 1 has no field 'prompt'"):
        load_prompts(other)


def test_parquet_and_multiple_files(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a tree", "a car"], "id": [1, 2]}).to_parquet(path)
    txt = tmp_path / "p.txt"
    txt.write_text("a boat\n")
    assert load_prompts([path, txt]) == ["a tree", "a car", "a boat"]
    with pytest.raises(ValueError, match=r"data\.train_files=.*has no column 'text'; columns: \['prompt', 'id'\]"):
        load_prompts(path, prompt_field="text")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, "file not found"),
        ("p.csv", "a,b\n", r"unknown extension '\.csv'; expected one of \['\.txt', '\.jsonl', '\.parquet'\]"),
        ("empty.txt", "\n\n", "holds no prompts"),
        ("bad.jsonl", "{not json\n", "line 1 is not valid JSON"),
        ("null.jsonl", '{"prompt": null}\n', "must be a non-empty string"),
        ("latin1.txt", b"a cat\nbad \xff line\n", r"line 2 is not valid UTF-8 \(byte 0xff at column 5\)"),
        ("latin1.jsonl", b'{"prompt": "a"}\n{"prompt": "\xe9"}\n', r"line 2 is not valid UTF-8 \(byte 0xe9"),
    ],
)
def test_bad_prompt_files_name_key_and_value(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=r"data\.train_files") as info:
        load_prompts(path)
    assert name in str(info.value)
    assert info.match(match)


def test_batch_is_interleaved_with_uids_rows_and_seeds():
    prompts = [f"prompt {i}" for i in range(10)]
    batch = PromptBatcher(prompts, batch_size=3, n=4, seed=7).batch(5)
    assert len(batch) == 12
    assert batch.row_index == list(range(12))
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        assert len(set(batch.prompts[rows])) == 1 and len(set(batch.uids[rows])) == 1
    assert len(set(batch.uids)) == 3
    assert batch.prompts == [prompts[i] for i in batch.prompt_index]
    assert row_seeds(batch) == [row_seed(7, 5, r) for r in range(12)]
    assert len(set(row_seeds(batch))) == 12  # the copies of a prompt sample different noise


def test_every_epoch_visits_every_prompt_once_and_epochs_differ():
    prompts = [f"p{i}" for i in range(12)]
    batcher = PromptBatcher(prompts, batch_size=4, n=2, seed=3)
    epoch0 = [i for step in range(3) for i in batcher.prompt_indices(step)]
    epoch1 = [i for step in range(3, 6) for i in batcher.prompt_indices(step)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and epoch0 != list(range(12))
    # A batch larger than the prompt set spans epochs and still works.
    assert len(PromptBatcher(prompts[:3], batch_size=5, n=2).prompt_indices(0)) == 5


def test_resume_reproduces_an_uninterrupted_run():
    prompts = [f"p{i}" for i in range(9)]
    straight = PromptBatcher(prompts, batch_size=4, n=2, seed=11)
    run = [straight.batch(step) for step in range(8)]
    state = straight.state_dict()
    resumed = PromptBatcher(prompts, batch_size=4, n=2, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.batch(step) for step in range(5, 8)] == run[5:]
    assert PromptBatcher(prompts, batch_size=4, n=2, seed=12).batch(5) != run[5]


def test_resume_with_changed_prompts_is_refused():
    state = PromptBatcher(["a", "b"], batch_size=1, n=2).state_dict()
    with pytest.raises(ValueError, match="cannot resume"):
        PromptBatcher(["a", "c"], batch_size=1, n=2).load_state_dict(state)


def test_seeds_and_uids_are_stable_across_processes():
    code = (
        "from recipes.flowgrpo.data import prompt_uid; from verl_omni.utils.seeding import row_seed;"
        "print(row_seed(1, 2, 3), prompt_uid(1, 2, 3), row_seed(0, 0, 0))"
    )
    repo_root = Path(__file__).resolve().parents[1]
    outputs = {
        tuple(
            subprocess.run(
                [sys.executable, "-c", code],
                cwd=repo_root,
                env={"PYTHONHASHSEED": str(h)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
        )
        for h in (1, 2)
    }
    assert outputs == {(str(row_seed(1, 2, 3)), prompt_uid(1, 2, 3), str(row_seed(0, 0, 0)))}
    assert 0 <= row_seed(1, 2, 3) < 2**63 and row_seed(1, 2, 3) != row_seed(1, 3, 2)


def test_batcher_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        PromptBatcher(["a"], batch_size=0, n=2)
    with pytest.raises(ValueError, match="n "):
        PromptBatcher(["a"], batch_size=1, n=0)


# ------------------------------------------------------------------ validation rows
def test_shipped_validation_prompts_are_few_and_not_training_prompts():
    val = load_prompts(DEFAULT_VAL_PROMPTS_FILE, key=VAL_FILES_KEY)
    assert 8 <= len(val) <= 32 and len(set(val)) == len(val)
    assert not set(val) & set(load_prompts(DEFAULT_PROMPTS_FILE))


def test_shipped_prompts_fit_the_default_colour_reward():
    """Each prompt names one palette colour (geneval_color would refuse it otherwise); validation holds out
    colour/object pairs, never a colour; every word fits the tiny model's T5 (16 tokens)."""
    from verl_omni.models.palette import PALETTE
    from verl_omni.models.tiny_sd3 import T5_MAX_LENGTH, _tiny_t5_tokenizer
    from verl_omni.rewards.color import parse_color

    train = load_prompts(DEFAULT_PROMPTS_FILE)
    val = load_prompts(DEFAULT_VAL_PROMPTS_FILE, key=VAL_FILES_KEY)
    assert {parse_color(p) for p in val} == {parse_color(p) for p in train} == set(PALETTE)
    tokenizer = _tiny_t5_tokenizer()
    assert max(len(tokenizer(p).input_ids) for p in train + val) <= T5_MAX_LENGTH


def test_validation_files_errors_name_their_key(tmp_path):
    empty = tmp_path / "val.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"data\.val_files=.*val\.txt.*holds no prompts"):
        load_prompts(empty, key=VAL_FILES_KEY)


def test_validation_rows_are_interleaved_groups_with_fixed_seeds():
    prompts = ["a", "b", "c"]
    (batch,) = ValidationBatches(prompts, n=2, seed=7).batches()
    assert batch.prompts == ["a", "a", "b", "b", "c", "c"] and batch.prompt_index == [0, 0, 1, 1, 2, 2]
    assert batch.uids[0] == batch.uids[1] != batch.uids[2] == batch.uids[3] != batch.uids[4]
    assert batch.row_index == list(range(6)) and len(set(row_seeds(batch))) == 6
    assert batch.base_seed == validation_seed(7) and batch.step == ValidationBatches.SEED_STEP
    assert row_seeds(batch) == [row_seed(batch.base_seed, batch.step, r) for r in range(6)]
    # the same rows at every validation, in any process; another trainer.seed draws other noise
    assert ValidationBatches(prompts, n=2, seed=7).batches() == [batch]
    assert row_seeds(ValidationBatches(prompts, n=2, seed=8).batches()[0]) != row_seeds(batch)


def test_validation_chunks_keep_each_rows_seed_and_uid():
    prompts = [f"p{i}" for i in range(5)]
    whole = ValidationBatches(prompts, n=2, seed=3).batches()[0]
    chunks = ValidationBatches(prompts, n=2, batch_size=2, seed=3).batches()
    assert [len(c) for c in chunks] == [4, 4, 2]
    for field in ("prompts", "uids", "row_index", "prompt_index"):
        assert [v for c in chunks for v in getattr(c, field)] == getattr(whole, field), field


def test_validation_never_shares_seeds_or_uids_with_training():
    prompts = [f"p{i}" for i in range(8)]
    val = ValidationBatches(prompts, n=2, seed=42).batches()[0]
    batcher = PromptBatcher(prompts, batch_size=8, n=2, seed=42)
    train = [batcher.batch(step) for step in range(20)]
    assert not set(row_seeds(val)) & {s for b in train for s in row_seeds(b)}
    assert not set(val.uids) & {u for b in train for u in b.uids}


def test_validation_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least one prompt"):
        ValidationBatches([], n=1)
    with pytest.raises(ValueError, match="samples per validation prompt"):
        ValidationBatches(["a"], n=0)
    with pytest.raises(ValueError, match="batch_size"):
        ValidationBatches(["a"], n=1, batch_size=0)
