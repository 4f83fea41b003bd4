"""Schema of the ``server_routing`` config section: which rollout replica serves a request.

A checked section (:mod:`verl_omni.workers.config.schema`; no verl import), so the recipe can check it before
verl, torch or Ray load. The driver reads it once; ``OmniLLMServerManager`` hands the instance to the balancer
and to every client, and nothing downstream reads the raw section again.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from verl_omni.workers.config.schema import Section, option, section

RoutingPolicy = Literal["prompt_uid_affinity", "least_inflight", "prompt_hash_sharding", "round_robin"]
VALID_ROLLOUT_SERVER_ROUTING_POLICIES: tuple[str, ...] = RoutingPolicy.__args__

DEFAULT_ROUTING_KEY_FIELD = "uid"
DEFAULT_ROUTING_CACHE_SIZE = 10000
ROUTING_CONFIG_PREFIX = "actor_rollout_ref.rollout.server_routing"


@section(ROUTING_CONFIG_PREFIX)
class RolloutServerRoutingConfig(Section):
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
    policy: RoutingPolicy = option("least_inflight", why="is not a valid routing policy; valid choices: {choices}")
    routing_key_field: str = option(
        DEFAULT_ROUTING_KEY_FIELD,
        pattern=r"\S",
        why=f"must be a non-empty string naming a per-sample field (default: {DEFAULT_ROUTING_KEY_FIELD!r})",
    )
    max_imbalance: int | None = option(None, ge=0, note="requests in flight; null keeps strict affinity")
    max_imbalance_ratio: float = option(1.0, ge=1, note="default: 1.0")
    speed_aware: bool = False
    cache_size: int = option(DEFAULT_ROUTING_CACHE_SIZE, ge=1, note=f"default: {DEFAULT_ROUTING_CACHE_SIZE}")

    def as_dict(self) -> dict[str, Any]:
        """The options without ``_target_`` (for ``replace``-style overrides and logs)."""
        values = asdict(self)
        values.pop("_target_")
        return values
