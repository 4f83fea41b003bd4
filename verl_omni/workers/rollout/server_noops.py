"""The LLM-server calls verl's ``RolloutReplica`` makes that a diffusion server answers with nothing to do."""

from __future__ import annotations

from typing import Any


class DiffusionServerNoOps:
    """KV-cache and profiling hooks of verl's server interface; shared by every diffusion rollout server."""

    async def clear_kv_cache(self) -> None:
        """No-op: the only cache is the prompt-embedding cache, which weight updates never invalidate."""

    async def release_kv_cache(self) -> None:
        """No-op: a diffusion server holds no KV cache."""

    async def resume_kv_cache(self) -> None:
        """No-op: a diffusion server holds no KV cache."""

    async def start_profile(self, **kwargs: Any) -> None:
        """No-op: profiling is not wired for diffusion backends."""

    async def stop_profile(self) -> None:
        """No-op: profiling is not wired for diffusion backends."""
