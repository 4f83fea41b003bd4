"""The recipe scoring through a real reward service process (``reward.name=remote``) that breaks mid-run: the run
stops with an error naming the reward and the prompt, every checkpoint written before stays valid, and the same
command with a working service resumes from the last one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import warm_recipe
from recipe_runs import NO_VALIDATION, ONE_REPLICA, SMALL_RUN

from verl_omni.utils.checkpoint import find_latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# 2 prompts x 4 samples (8 images, two groups) per step, 4 denoising steps at 32 x 32, no validation
FAST = [*SMALL_RUN, *NO_VALIDATION, *ONE_REPLICA, "trainer.save_freq=1"]


def _serve(reward: str, tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    service_env = {**os.environ, "PYTHONPATH": str(TESTS), "REWARD_FAULTS_DIR": str(tmp_path), **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "verl_omni.rewards.serve", "--reward", reward, "--port", "0"],
        cwd=REPO,
        env=service_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    match = re.search(r"(http://127\.0\.0\.1:\d+)", proc.stdout.readline())
    assert match, proc.stderr.read()
    return proc, match.group(1)


def _train(run_dir: Path, cache: Path, ray: dict[str, str], url: str, steps: int) -> subprocess.CompletedProcess:
    args = [
        f"trainer.default_local_dir={run_dir}",
        *FAST,
        f"trainer.total_training_steps={steps}",
        "reward.name=remote",
        f"+reward.kwargs.url={url}",
        "+reward.kwargs.retries=1",
        "+reward.kwargs.backoff_s=0.1",
    ]
    env = {**os.environ, "VERL_OMNI_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **ray}
    return warm_recipe.run(args, env=env, timeout=600)


def test_a_service_breaking_mid_run_stops_it_and_keeps_every_checkpoint(verl_omni_cache, recipe_ray, tmp_path):
    run_dir = tmp_path / "run"
    (tmp_path / "broken").mkdir()
    broken, url = _serve("reward_faults:fails_after", tmp_path / "broken", FAIL_AFTER_IMAGES="16")
    try:
        # steps 1 and 2 score 16 images; step 3 cannot
        proc = _train(run_dir, verl_omni_cache, recipe_ray, url, steps=4)
    finally:
        broken.kill()
        broken.wait()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert re.search(r"reward 'remote' failed on prompt '[^']+': the reward service at .* failed 2 attempt", out)
    assert "the scorer broke" in out
    step, path = find_latest_checkpoint(run_dir / "checkpoints")
    assert step == 2 and load_checkpoint(path, weights_only=False)["trainer"]["step"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [0, 1]  # the failed step logged nothing, no reward was taken as 0

    healthy_dir = tmp_path / "healthy"
    healthy_dir.mkdir()
    healthy, url = _serve("reward_faults:brightness", healthy_dir)
    try:
        resumed = _train(run_dir, verl_omni_cache, recipe_ray, url, steps=3)
    finally:
        healthy.kill()
        healthy.wait()
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert find_latest_checkpoint(run_dir / "checkpoints")[0] == 3
