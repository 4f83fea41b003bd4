"""Reward functions for the reward-service tests, served by a real ``verl_omni.rewards.serve`` process as
``tests.reward_faults:<name>``. Each records the batch it was called with in ``$REWARD_FAULTS_DIR/calls.jsonl``,
so a test can count attempts and see how requests were merged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def _record(name: str, prompts: list[str]) -> int:
    """Append this call to the log; returns how many calls of ``name`` came before it."""
    log = Path(os.environ["REWARD_FAULTS_DIR"]) / "calls.jsonl"
    before = sum(1 for line in log.read_text().splitlines() if json.loads(line)["fn"] == name) if log.exists() else 0
    with log.open("a") as f:
        f.write(json.dumps({"fn": name, "batch": len(prompts)}) + "\n")
    return before


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value in [0, 1]: a reward whose value the test can compute itself."""
    _record("brightness", prompts)
    return images.float().mean(dim=(1, 2, 3)) / 255.0


def always_fails(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A scorer that crashes (the service answers 500)."""
    _record("always_fails", prompts)
    raise RuntimeError("the detector ran out of memory")


def flaky(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Crashes on its first ``$FLAKY_FAILURES`` calls, then scores like :func:`brightness`."""
    if _record("flaky", prompts) < int(os.environ.get("FLAKY_FAILURES", "2")):
        raise RuntimeError("transient scorer failure")
    return images.float().mean(dim=(1, 2, 3)) / 255.0


def blocks(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Says it started (``$REWARD_FAULTS_DIR/started``), then never answers: a hanging scorer, or one to kill
    mid-request."""
    _record("blocks", prompts)
    (Path(os.environ["REWARD_FAULTS_DIR"]) / "started").touch()
    while True:
        time.sleep(1.0)


def fails_after(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Scores like :func:`brightness` until ``$FAIL_AFTER_IMAGES`` images are scored, then crashes on every call:
    a scorer that breaks in the middle of a run."""
    log = Path(os.environ["REWARD_FAULTS_DIR"]) / "calls.jsonl"
    done = sum(json.loads(line)["batch"] for line in log.read_text().splitlines()) if log.exists() else 0
    _record("fails_after", prompts)
    if done + len(prompts) > int(os.environ["FAIL_AFTER_IMAGES"]):
        raise RuntimeError("the scorer broke")
    return images.float().mean(dim=(1, 2, 3)) / 255.0
