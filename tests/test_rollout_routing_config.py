"""Validation of the server_routing schema and the shipped YAML defaults."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl_omni.workers.config.rollout_routing import (
    VALID_ROLLOUT_SERVER_ROUTING_POLICIES,
    RolloutServerRoutingConfig,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults():
    cfg = RolloutServerRoutingConfig()
    assert cfg.policy == "least_inflight"
    assert cfg.routing_key_field == "uid"
    assert cfg.max_imbalance is None
    assert cfg.cache_size == 10000
    assert cfg.max_imbalance_ratio == 1.0


def test_valid_policies_listed():
    assert VALID_ROLLOUT_SERVER_ROUTING_POLICIES == (
        "prompt_uid_affinity",
        "least_inflight",
        "prompt_hash_sharding",
        "round_robin",
    )
    for policy in VALID_ROLLOUT_SERVER_ROUTING_POLICIES:
        assert RolloutServerRoutingConfig(policy=policy).policy == policy


def test_unknown_policy_names_key_value_and_choices():
    with pytest.raises(ValueError) as err:
        RolloutServerRoutingConfig(policy="random")
    msg = str(err.value)
    assert "server_routing.policy" in msg and "'random'" in msg
    for policy in VALID_ROLLOUT_SERVER_ROUTING_POLICIES:
        assert policy in msg


@pytest.mark.parametrize("bad", [-1, -3, 1.5, True, "2"])
def test_bad_max_imbalance(bad):
    with pytest.raises(ValueError, match=r"server_routing\.max_imbalance=.*non-negative integer"):
        RolloutServerRoutingConfig(policy="prompt_uid_affinity", max_imbalance=bad)


@pytest.mark.parametrize("bad", [0.5, 0, -1, float("inf"), float("nan"), True, "2"])
def test_bad_max_imbalance_ratio(bad):
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rollout\.server_routing\.max_imbalance_ratio=.*>= 1"):
        RolloutServerRoutingConfig.from_config({"policy": "prompt_uid_affinity", "max_imbalance_ratio": bad})


def test_zero_max_imbalance_is_allowed():
    """0 = divert as soon as the pinned replica is above the least loaded (and above the ratio)."""
    cfg = RolloutServerRoutingConfig(policy="prompt_uid_affinity", max_imbalance=0, max_imbalance_ratio=1.5)
    assert cfg.max_imbalance == 0


@pytest.mark.parametrize("bad", ["", "  ", None])
def test_empty_routing_key_field(bad):
    with pytest.raises(ValueError, match=r"server_routing\.routing_key_field"):
        RolloutServerRoutingConfig(routing_key_field=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_cache_size(bad):
    with pytest.raises(ValueError, match=r"server_routing\.cache_size=" + str(bad)):
        RolloutServerRoutingConfig(cache_size=bad)


def test_frozen():
    cfg = RolloutServerRoutingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.policy = "round_robin"


def test_shipped_yaml_matches_schema_defaults():
    section = OmegaConf.load(REPO / "configs" / "server_routing.yaml")
    assert RolloutServerRoutingConfig.from_config(section) == RolloutServerRoutingConfig()


def test_from_config_partial_section_and_missing_section():
    assert RolloutServerRoutingConfig.from_config(None) == RolloutServerRoutingConfig()
    cfg = RolloutServerRoutingConfig.from_config(OmegaConf.create({"policy": "round_robin"}))
    assert cfg.policy == "round_robin" and cfg.cache_size == 10000


def test_from_config_rejects_unknown_key():
    with pytest.raises(ValueError, match=r"\['polcy'\].*valid keys"):
        RolloutServerRoutingConfig.from_config({"polcy": "round_robin"})


def test_yaml_is_included_by_other_configs(tmp_path):
    """A user config pulls the shared file in through its defaults list and overrides only `policy`."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "user.yaml").write_text(
        "hydra:\n"
        f"  searchpath: [file://{REPO / 'configs'}]\n"
        "defaults:\n"
        "  - server_routing@actor_rollout_ref.rollout.server_routing\n"
        "  - _self_\n"
        "actor_rollout_ref:\n"
        "  rollout:\n"
        "    server_routing:\n"
        "      policy: prompt_uid_affinity\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose("user", overrides=["actor_rollout_ref.rollout.server_routing.policy=round_robin"])
        default_cfg = compose("user")
    assert RolloutServerRoutingConfig.from_config(default_cfg.actor_rollout_ref.rollout.server_routing).policy == (
        "prompt_uid_affinity"
    )
    routing = RolloutServerRoutingConfig.from_config(cfg.actor_rollout_ref.rollout.server_routing)
    assert routing.policy == "round_robin"
    assert routing.routing_key_field == "uid" and routing.cache_size == 10000


def test_from_config_returns_an_instance_unchanged_and_prefixes_errors():
    cfg = RolloutServerRoutingConfig(policy="round_robin")
    assert RolloutServerRoutingConfig.from_config(cfg) is cfg
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.rollout\.server_routing\.policy='x'"):
        RolloutServerRoutingConfig.from_config({"policy": "x"})


def test_removed_group_dispatch_key_is_refused_with_the_valid_keys():
    with pytest.raises(ValueError, match=r"\['group_dispatch'\].*max_imbalance_ratio"):
        RolloutServerRoutingConfig.from_config({"group_dispatch": True})


def test_schema_imports_without_verl():
    """The recipe checks this section before verl (several seconds of imports) loads."""
    import subprocess
    import sys

    code = (
        "import sys; import verl_omni.workers.config.rollout_routing as m; "
        "m.RolloutServerRoutingConfig(); assert 'verl' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_recipe_composes_the_one_server_routing_yaml():
    """configs/server_routing.yaml is the only copy: the package's config group links to it, and a value changed
    in that file reaches the composed recipe."""
    from recipes.flowgrpo.config_compose import compose_recipe

    shipped = REPO / "configs" / "server_routing.yaml"
    packaged = REPO / "verl_omni" / "trainer" / "config" / "server_routing.yaml"
    assert packaged.resolve() == shipped.resolve()
    original = shipped.read_text()
    try:
        shipped.write_text(original.replace("cache_size: 10000", "cache_size: 4321"))
        assert compose_recipe().actor_rollout_ref.rollout.server_routing.cache_size == 4321
    finally:
        shipped.write_text(original)
    assert compose_recipe().actor_rollout_ref.rollout.server_routing.cache_size == 10000


@pytest.mark.parametrize("bad", ["yes", 1, 0, None])
def test_bad_speed_aware(bad):
    with pytest.raises(
        ValueError, match=r"actor_rollout_ref\.rollout\.server_routing\.speed_aware=.* valid choices: true, false"
    ):
        RolloutServerRoutingConfig.from_config({"speed_aware": bad})


def test_speed_aware_from_the_command_line_form():
    cfg = RolloutServerRoutingConfig.from_config(
        OmegaConf.from_dotlist(["policy=prompt_uid_affinity", "speed_aware=true"])
    )
    assert cfg.speed_aware is True and cfg.policy == "prompt_uid_affinity"
