"""Facts about the Ray actor this code runs in, and about actors it calls, in one place."""

from __future__ import annotations

import sys
import warnings

import ray

# Errors that mean the called actor itself is gone (its process died), not that the call was bad.
ACTOR_GONE = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)


def restarted_actor() -> bool | None:
    """Whether this process is a Ray actor that Ray restarted after its previous process died; None when it is not
    a Ray actor (in-process use: tests, simulators)."""
    ray_module = sys.modules.get("ray")
    if ray_module is None or not ray_module.is_initialized():
        return None
    context = ray_module.get_runtime_context()
    if context.get_actor_id() is None:
        return None
    with warnings.catch_warnings():  # Ray's property reads its own deprecated `actor_id` (Ray 2.5x)
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)
