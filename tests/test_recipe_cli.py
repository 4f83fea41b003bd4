"""Bad input on the recipe's command line: one clear line, exit code 2, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from verl_omni.workers.rollout.backends import missing_vllm_omni_modules

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("server_routing.policy=fastest", "server_routing.policy='fastest' is not a valid routing policy"),
        ("data.train_files=/nonexistent/prompts.txt", "data.train_files="),
        ("data.val_files=/nonexistent/val.txt", "data.val_files='/nonexistent/val.txt': file not found"),
        ("trainer.test_freq=-2", "trainer.test_freq=-2 is not valid; valid choices:"),
        ("trainer.cpu_ranks_per_node=0", "trainer.cpu_ranks_per_node=0 is not valid; valid values: a positive integer"),
        ("+trainer.totl_training_steps=3", "did you mean trainer.total_training_steps?"),
        ("actor_rollout_ref.actor.timestep_fraction=0", "timestep_fraction=0 is outside the valid range (0, 1]"),
        (
            "actor_rollout_ref.rollout.diffusion.chunk_size=0",
            "actor_rollout_ref.rollout.diffusion.chunk_size=0 must be an integer in [1, max_num_seqs=16]",
        ),
        (
            "actor_rollout_ref.rollout.diffusion.chunk_size=17",
            "actor_rollout_ref.rollout.diffusion.chunk_size=17 must be an integer in [1, max_num_seqs=16]",
        ),
        pytest.param(
            "actor_rollout_ref.rollout.name=vllm_omni",
            "actor_rollout_ref.rollout.name='vllm_omni' needs the vllm-omni extra",
            marks=pytest.mark.skipif(not missing_vllm_omni_modules(), reason="the vllm-omni extra is installed here"),
        ),
    ],
)
def test_bad_config_exits_2_with_one_line_before_ray(override: str, message: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.flowgrpo.main", override, f"trainer.default_local_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing was written either
