"""Schema of the ``server_routing`` config section: which rollout replica serves a request.

A plain frozen dataclass (no verl import), so the recipe can check it before verl, torch or Ray load.
``OmniLLMServerManager`` reads it once from the config and hands the instance to the balancer and to
every client; nothing downstream reads the raw section again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

VALID_ROLLOUT_SERVER_ROUTING_POLICIES: tuple[str, ...] = (
    "prompt_uid_affinity",
    "least_inflight",
    "prompt_hash_sharding",
    "round_robin",
)

DEFAULT_ROUTING_KEY_FIELD = "uid"
DEFAULT_ROUTING_CACHE_SIZE = 10000
ROUTING_CONFIG_PREFIX = "actor_rollout_ref.rollout.server_routing"


@dataclass(frozen=True)
class RolloutServerRoutingConfig:
    """Routing policy for the rollout load balancer.

    Attributes:
        policy: one of ``VALID_ROLLOUT_SERVER_ROUTING_POLICIES``. ``least_inflight`` is verl's behaviour.
        routing_key_field: per-sample field whose value is the routing key (the GRPO group id ``uid``; ``prompt``
            or ``prompt_index`` keep a prompt on one replica across steps). A batch without it is an error.
        max_imbalance: soft affinity for ``prompt_uid_affinity``, absolute threshold: a group whose pinned replica
            has more than this many requests in flight above the least-loaded replica may be diverted.
            ``None`` keeps strict affinity.
        max_imbalance_ratio: soft affinity, relative threshold (>= 1): divert only when the pinned replica's
            load is also above this ratio times the least-loaded replica's (both thresholds must be exceeded,
            as in SGLang's cache-aware router). 1.0 leaves the absolute threshold alone in charge.
        speed_aware: weigh replicas by their measured seconds per request (timed by the balancer between
            acquire and release): a new key, a new request id or a diverted group goes where it would finish
            first instead of where the fewest requests are in flight, so a slower replica gets proportionally
            less. Off by default (verl's count-based behaviour); no effect on ``prompt_hash_sharding`` and
            ``round_robin``, which ignore load.
        cache_size: size of the sticky LRU (routing key or request id -> replica).
    """

    _target_: str = "verl_omni.workers.config.rollout_routing.RolloutServerRoutingConfig"
    policy: str = "least_inflight"
    routing_key_field: str = DEFAULT_ROUTING_KEY_FIELD
    max_imbalance: int | None = None
    max_imbalance_ratio: float = 1.0
    speed_aware: bool = False
    cache_size: int = DEFAULT_ROUTING_CACHE_SIZE

    def __post_init__(self) -> None:
        _validate(self.as_dict(), prefix="server_routing")

    @property
    def soft_affinity(self) -> bool:
        """Whether ``prompt_uid_affinity`` may divert a group from its pinned replica."""
        return self.policy == "prompt_uid_affinity" and self.max_imbalance is not None

    def as_dict(self) -> dict[str, Any]:
        """The options without ``_target_`` (for ``replace``-style overrides and logs)."""
        values = asdict(self)
        values.pop("_target_")
        return values

    @classmethod
    def from_config(cls, section: Any | None, prefix: str = ROUTING_CONFIG_PREFIX) -> RolloutServerRoutingConfig:
        """Build from an OmegaConf/dict section (or an instance); a missing section or key means the default.

        Errors name ``prefix.<key>``, the value and what is valid; an unknown key is refused with the
        valid ones, so a typo (``polcy=...``) never silently keeps the default.
        """
        if isinstance(section, cls):
            return section
        if section is None:
            return cls()
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        data.pop("_target_", None)
        known = [f.name for f in fields(cls) if f.name != "_target_"]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in {prefix}; valid keys: {known}")
        _validate({**cls().as_dict(), **data}, prefix=prefix)
        return cls(**data)


def _validate(values: dict[str, Any], prefix: str) -> None:
    """Raise ``ValueError`` naming ``prefix.<key>``, the bad value and what is allowed."""
    policy = values["policy"]
    if policy not in VALID_ROLLOUT_SERVER_ROUTING_POLICIES:
        raise ValueError(
            f"{prefix}.policy={policy!r} is not a valid routing policy; "
            f"valid choices: {', '.join(VALID_ROLLOUT_SERVER_ROUTING_POLICIES)}"
        )
    field = values["routing_key_field"]
    if not isinstance(field, str) or not field.strip():
        raise ValueError(
            f"{prefix}.routing_key_field={field!r} must be a non-empty string naming a per-sample "
            f"field (default: {DEFAULT_ROUTING_KEY_FIELD!r})"
        )
    bound = values["max_imbalance"]
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
        raise ValueError(
            f"{prefix}.max_imbalance={bound!r} must be a non-negative integer (requests in flight), "
            "or null for strict affinity"
        )
    ratio = values["max_imbalance_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"{prefix}.max_imbalance_ratio={ratio!r} must be a finite number >= 1 (default: 1.0)")
    speed = values["speed_aware"]
    if not isinstance(speed, bool):
        raise ValueError(
            f"{prefix}.speed_aware={speed!r} must be true or false (shared default false, diffusion default true)"
        )
    size = values["cache_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"{prefix}.cache_size={size!r} must be a positive integer (default: {DEFAULT_ROUTING_CACHE_SIZE})"
        )
