"""The tests' warm driver (tests/warm_recipe.py): a forked run behaves as `python -m recipes.flowgrpo.main` does
(exit code, stderr), and the suite's runs stay warm after a ``ray.init`` in this process."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import warm_recipe

BAD = ["trainer.total_training_steps=abc"]
LINE = "config error: trainer.total_training_steps='abc' must be a positive integer"


def _refused(proc, out) -> str:
    assert proc.wait(timeout=120) == 2
    out.seek(0)
    return out.read().decode()


def test_a_run_after_ray_init_here_forks_warm_and_exits_as_the_cold_command(ray_local, tmp_path: Path) -> None:
    """ray_local's ``ray.init`` adds variables to this process's environment, which every later run inherits."""
    env = dict(os.environ)
    args = [*BAD, f"trainer.default_local_dir={tmp_path / 'warm'}"]
    with warnings.catch_warnings(), open(tmp_path / "err", "w+b") as err:
        warnings.simplefilter("error")  # a cold start would warn
        proc = warm_recipe.start(args, env=env, stdout=subprocess.DEVNULL, stderr=err.fileno())
        assert isinstance(proc, warm_recipe.WarmRecipe) and proc.pid != os.getpid()
        warm = _refused(proc, err)
    cmd = [sys.executable, "-m", warm_recipe.RECIPE_MODULE, *BAD, f"trainer.default_local_dir={tmp_path / 'cold'}"]
    cold = subprocess.run(cmd, cwd=warm_recipe.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert cold.returncode == 2
    assert [line for line in warm.splitlines() if line.strip()] == [LINE]
    assert [line for line in cold.stderr.splitlines() if line.strip()] == [LINE]


def test_a_variable_read_at_import_time_starts_the_run_cold_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "3"}  # torch's OpenMP reads it once, when loaded
    args = [*BAD, f"trainer.default_local_dir={tmp_path}"]
    with pytest.warns(UserWarning, match=r"started cold: \[.*'OMP_NUM_THREADS'"), open(tmp_path / "err", "w+b") as err:
        proc = warm_recipe.start(args, env=env, stdout=subprocess.DEVNULL, stderr=err.fileno())
        assert isinstance(proc, subprocess.Popen)
        assert LINE in _refused(proc, err)
