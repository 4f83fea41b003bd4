"""Atomic checkpoints: round trip, verl's tracker file, keep-last-k, and crashes mid-write."""

from __future__ import annotations

import pytest
import torch

from verl_omni.utils import checkpoint as ckpt
from verl_omni.utils.checkpoint import (
    TRACKER_FILE,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2, 3), float(step))}, "trainer": {"global_step": step, "rng": [1, 2]}}


def test_round_trip_and_tracker(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    assert find_latest_checkpoint(tmp_path / "nope") is None
    path = save_checkpoint(tmp_path, 3, _state(3))
    assert path == tmp_path / "global_step_3"
    assert (tmp_path / TRACKER_FILE).read_text() == "3"
    assert find_latest_checkpoint(tmp_path) == (3, path)
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["model"]["w"], torch.full((2, 3), 3.0))
    assert loaded["trainer"] == {"global_step": 3, "rng": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_3", TRACKER_FILE]


def test_write_extra_files_are_part_of_the_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1), write_extra=lambda d: (d / "adapter").mkdir())
    assert (path / "adapter").is_dir()


def test_crash_inside_writer_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 2, _state(2))

    def crash(directory):
        (directory / "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, _state(4), write_extra=crash)
    assert not (tmp_path / "global_step_4").exists()
    assert (tmp_path / TRACKER_FILE).read_text() == "2"
    step, path = find_latest_checkpoint(tmp_path)
    assert step == 2
    torch.testing.assert_close(load_checkpoint(path)["model"]["w"], torch.full((2, 3), 2.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp_")] == []


def test_crash_in_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 5, _state(5))
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(obj)
        if len(calls) == 2:  # the first file is already written when the second one fails
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 6, _state(6))
    monkeypatch.undo()
    assert find_latest_checkpoint(tmp_path) == (5, tmp_path / "global_step_5")


def test_leftovers_of_a_hard_kill_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    # What a SIGKILL mid-write leaves: a temp dir with data, and a step dir without its manifest.
    (tmp_path / ".tmp_global_step_2.dead").mkdir()
    (tmp_path / ".tmp_global_step_2.dead" / "model.pt").write_bytes(b"x")
    (tmp_path / "global_step_9").mkdir()
    assert find_latest_checkpoint(tmp_path) == (1, tmp_path / "global_step_1")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "global_step_9")
    save_checkpoint(tmp_path, 2, _state(2))
    assert not (tmp_path / ".tmp_global_step_2.dead").exists()
    assert find_latest_checkpoint(tmp_path)[0] == 2


def test_keep_last_and_overwrite_same_step(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    save_checkpoint(tmp_path, 4, {"model": {"w": torch.zeros(1)}}, keep_last=2)
    assert load_checkpoint(tmp_path / "global_step_4")["model"]["w"].tolist() == [0.0]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_newest_complete_dir_wins_when_tracker_lags(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    save_checkpoint(tmp_path, 2, _state(2))
    (tmp_path / TRACKER_FILE).write_text("1")  # a crash between the commit rename and the tracker update
    assert find_latest_checkpoint(tmp_path)[0] == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, keep_last=0)
    with pytest.raises(ValueError, match="file-name safe"):
        save_checkpoint(tmp_path, 1, {"../evil": 1})
