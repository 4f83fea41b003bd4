"""The start-up resource check counts the agent-loop workers' Ray CPUs.

The "15-minute silence" of issue 23: the SD3.5 config on a 2-core machine with ``ray_kwargs.ray_init.num_cpus``
left null (Ray takes the 2 cores). Two 0.5-CPU replicas and the 1-CPU training rank fill them exactly, the four
agent-loop workers (0.01 CPU each) are placed before the training rank, and its placement group then waits forever
(measured: ``RayResourcePool.get_placement_groups`` blocked, one pending placement group, no line printed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import warm_recipe
from hydra.core.global_hydra import GlobalHydra
from pipeline_dirs import write_json_pipeline
from recipe_runs import SD35_ON_CPU

from recipes.flowgrpo import config_compose
from recipes.flowgrpo.cluster_resources import AGENT_LOOP_WORKER_CPUS, ClusterNode, ClusterShape
from recipes.flowgrpo.validate import validate_recipe_config

REPO = Path(__file__).resolve().parents[1]
ON_CPU = [
    *SD35_ON_CPU,
    "data.train_batch_size=4",
]


@pytest.fixture()
def model_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    model = write_json_pipeline(tmp_path / "sd35")  # the model checks, which run first, pass on its configs
    monkeypatch.setenv("MODEL_PATH", str(model))
    monkeypatch.delenv("VERL_OMNI_PROMPTS", raising=False)
    return model


def test_the_constant_is_what_the_workers_ask_ray_for():
    from verl_omni.agent_loop.manager import OmniAgentLoopManager

    assert OmniAgentLoopManager.agent_loop_workers_class._default_options["num_cpus"] == AGENT_LOOP_WORKER_CPUS


def _validate(cpus: float, tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    overrides = [o for o in ON_CPU if not o.startswith("--config-name") and o != "flowgrpo_sd35_medium_lora"]
    cfg = config_compose.compose_recipe(
        *overrides, f"trainer.default_local_dir={tmp_path / 'run'}", config_name="flowgrpo_sd35_medium_lora"
    )
    validate_recipe_config(cfg, cluster=ClusterShape((ClusterNode(cpus, 0),), local=True))


def test_a_node_the_replicas_and_training_fill_exactly_is_refused(model_env, tmp_path):
    with pytest.raises(ValueError) as err:
        _validate(2, tmp_path)
    message = str(err.value)
    assert message.startswith("actor_rollout_ref.rollout.agent.num_workers=4 agent-loop workers need 0.04 Ray CPUs")
    assert "only 0 of the 1 node (2 CPUs) are left" in message and "Raise ray_kwargs.ray_init.num_cpus" in message
    _validate(3, tmp_path)  # one more Ray CPU: everything is placed


def test_cli_refuses_it_with_one_config_error_line(model_env, tmp_path):
    proc = warm_recipe.run(
        [
            *ON_CPU,
            "ray_kwargs.ray_init.num_cpus=2",  # what null gives on a 2-core machine
            f"trainer.default_local_dir={tmp_path / 'run'}",
        ],
        env={**os.environ, "MODEL_PATH": str(model_env)},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "agent.num_workers=4" in errors[0], proc.stderr[-3000:]
