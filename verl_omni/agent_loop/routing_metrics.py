"""Routing metrics of one rollout call: did each group run on one replica, and how even was the load."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np


def colocation_rate(group_ids: Sequence[str], servers: Sequence[str]) -> float:
    """Fraction of groups (by ``group_ids``) whose samples all ran on a single replica."""
    placements: dict[str, set[str]] = defaultdict(set)
    for gid, server in zip(group_ids, servers, strict=True):
        placements[str(gid)].add(str(server))
    if not placements:
        return 0.0
    return sum(len(s) == 1 for s in placements.values()) / len(placements)


def routing_metrics(
    group_ids: Sequence[str],
    servers: Sequence[str],
    all_servers: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    cache_hits: Sequence[bool] | None = None,
    diversions: int | None = None,
    resent: int | None = None,
    seconds_per_request: dict[str, float | None] | None = None,
    prefix: str = "rollout_routing",
) -> dict[str, float]:
    """Scalar metrics for the tracker.

    ``all_servers`` lists replicas that could have served (so an idle replica counts in the
    max/min load ratio); per-replica request counts are reported under ``{prefix}/requests/<id>``.
    ``seconds_per_request`` (speed-aware balancer) gives the slowest and fastest replica's measured cost
    and their ratio, so a replica that lags is visible in the tracker.
    """
    counts = Counter(str(s) for s in servers)
    for sid in all_servers or ():
        counts.setdefault(str(sid), 0)
    loads = np.array(list(counts.values()), dtype=np.float64) if counts else np.zeros(1)
    metrics: dict[str, float] = {
        f"{prefix}/colocation": colocation_rate(group_ids, servers),
        f"{prefix}/num_groups": float(len(set(map(str, group_ids)))),
        f"{prefix}/replicas_used": float(sum(1 for c in counts.values() if c > 0)),
        f"{prefix}/load_max": float(loads.max()),
        f"{prefix}/load_min": float(loads.min()),
        # inf would break trackers: an idle replica reports the max load itself as the ratio
        f"{prefix}/load_max_min_ratio": float(loads.max() / max(loads.min(), 1.0)),
    }
    for sid, count in sorted(counts.items()):
        metrics[f"{prefix}/requests/{sid}"] = float(count)
    if batch_sizes is not None and len(batch_sizes):
        sizes = np.asarray(batch_sizes, dtype=np.float64)
        metrics[f"{prefix}/replica_batch_size_mean"] = float(sizes.mean())
        metrics[f"{prefix}/replica_batch_size_max"] = float(sizes.max())
    if cache_hits is not None and len(cache_hits):
        metrics[f"{prefix}/prompt_cache_hit_rate"] = float(np.mean(np.asarray(cache_hits, dtype=np.float64)))
    if diversions is not None:
        metrics[f"{prefix}/diversions"] = float(diversions)
    if resent is not None:  # copies sent again because their replica died mid-request
        metrics[f"{prefix}/requests_resent"] = float(resent)
    measured = [c for c in (seconds_per_request or {}).values() if c is not None]
    if measured:
        metrics[f"{prefix}/seconds_per_request_max"] = max(measured)
        metrics[f"{prefix}/seconds_per_request_min"] = min(measured)
        metrics[f"{prefix}/replica_slowdown_max"] = max(measured) / min(measured)
    return metrics
