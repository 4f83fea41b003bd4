"""Schema of the ``server_routing`` config section: which rollout replica serves a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verl.base_config import BaseConfig

VALID_ROLLOUT_SERVER_ROUTING_POLICIES: tuple[str, ...] = (
    "prompt_uid_affinity",
    "least_inflight",
    "prompt_hash_sharding",
    "round_robin",
)

DEFAULT_ROUTING_KEY_FIELD = "uid"
DEFAULT_ROUTING_CACHE_SIZE = 10000


@dataclass
class RolloutServerRoutingConfig(BaseConfig):
    """Routing policy for the rollout load balancer.

    Attributes:
        policy: one of ``VALID_ROLLOUT_SERVER_ROUTING_POLICIES``. ``least_inflight`` is verl's behaviour.
        routing_key_field: per-sample field whose value is the routing key (a group id: ``uid``).
        max_imbalance: soft-affinity bound for ``prompt_uid_affinity``: a request whose pinned replica
            has more than this many in-flight requests above the least-loaded one is diverted.
            ``None`` keeps strict affinity.
        cache_size: size of the sticky LRU (routing key or request id -> replica).
        group_dispatch: under strict ``prompt_uid_affinity`` (``max_imbalance`` null), send the copies of a
            group that one agent-loop worker holds to their replica in one call (one acquire, one server
            call, one release) instead of one call each. Ignored by the other policies and by soft affinity,
            which decide per request. A switch only to measure what it saves (or rule it out when debugging).
    """

    _target_: str = "verl_omni.workers.config.rollout_routing.RolloutServerRoutingConfig"
    policy: str = "least_inflight"
    routing_key_field: str = DEFAULT_ROUTING_KEY_FIELD
    max_imbalance: int | None = None
    cache_size: int = DEFAULT_ROUTING_CACHE_SIZE
    group_dispatch: bool = True

    def __post_init__(self) -> None:
        validate_routing_options(
            policy=self.policy,
            routing_key_field="" if self.routing_key_field is None else self.routing_key_field,
            max_imbalance=self.max_imbalance,
            cache_size=self.cache_size,
            group_dispatch=self.group_dispatch,
        )

    @property
    def dispatches_groups(self) -> bool:
        """Whether a group's copies go out in one call: only strict affinity sends a whole group to one replica."""
        return self.group_dispatch and self.policy == "prompt_uid_affinity" and self.max_imbalance is None

    @classmethod
    def from_config(cls, section: Any | None, prefix: str = "server_routing") -> RolloutServerRoutingConfig:
        """Build from an OmegaConf/dict section; a missing section or key means the default.

        Unknown keys are rejected so a typo (``polcy=...``) does not silently keep the default.
        """
        if section is None:
            return cls()
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        data.pop("_target_", None)
        known = {"policy", "routing_key_field", "max_imbalance", "cache_size", "group_dispatch"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in {prefix}; valid keys: {sorted(known)}")
        defaults = cls()
        validate_routing_options(
            policy=data.get("policy", defaults.policy),
            routing_key_field=data.get("routing_key_field", defaults.routing_key_field) or "",
            max_imbalance=data.get("max_imbalance", defaults.max_imbalance),
            cache_size=data.get("cache_size", defaults.cache_size),
            group_dispatch=data.get("group_dispatch", defaults.group_dispatch),
            prefix=prefix,
        )
        return cls(**data)


def validate_routing_options(
    *,
    policy: str,
    max_imbalance: int | None,
    cache_size: int,
    routing_key_field: str | None = None,
    group_dispatch: bool = True,
    prefix: str = "server_routing",
) -> None:
    """Raise ``ValueError`` naming the key, the bad value and what is allowed.

    ``routing_key_field`` is checked only when given: the balancer receives keys, not the field name.
    """
    if policy not in VALID_ROLLOUT_SERVER_ROUTING_POLICIES:
        raise ValueError(
            f"{prefix}.policy={policy!r} is not a valid routing policy; "
            f"valid choices: {', '.join(VALID_ROLLOUT_SERVER_ROUTING_POLICIES)}"
        )
    if routing_key_field is not None and (not isinstance(routing_key_field, str) or not routing_key_field.strip()):
        raise ValueError(
            f"{prefix}.routing_key_field={routing_key_field!r} must be a non-empty string naming a per-sample "
            f"field (default: {DEFAULT_ROUTING_KEY_FIELD!r})"
        )
    if max_imbalance is not None and (
        isinstance(max_imbalance, bool) or not isinstance(max_imbalance, int) or max_imbalance <= 0
    ):
        raise ValueError(
            f"{prefix}.max_imbalance={max_imbalance!r} must be a positive integer, or null for strict affinity"
        )
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size <= 0:
        raise ValueError(
            f"{prefix}.cache_size={cache_size!r} must be a positive integer (default: {DEFAULT_ROUTING_CACHE_SIZE})"
        )
    if not isinstance(group_dispatch, bool):
        raise ValueError(f"{prefix}.group_dispatch={group_dispatch!r} must be true or false (default: true)")
