"""``RolloutServerBase``: the request front every diffusion rollout server shares (one per replica).

A backend (diffusers, vllm-omni) implements how a list of admitted requests becomes a :class:`SampleGroup`
(``_generate``), how token-id prompts become text, and its weight, memory and control calls; the validation of
requests and of weight updates, the call counters and the LLM-server hooks that mean nothing for diffusion are
here, once.

Importing this module (and a backend's server module) loads no torch: Ray imports a server actor's module in every
process that receives the actor's handle, the balancer among them, which only routes. Tensor code imports what it
uses where it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from verl_omni.request import Request
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.rollout.model_spec import ModelSpec
from verl_omni.workers.rollout.sampling_params import resolve_sampling_params

if TYPE_CHECKING:
    import torch

    from verl_omni.protocol import SampleGroup


class RolloutServerBase:
    """``generate`` / ``generate_group`` with their checks, and verl's server hooks a diffusion server answers
    with nothing to do.

    Subclasses set ``BACKEND``, ``config`` (:class:`DiffusionRolloutConfig`), ``server_id`` and ``spec`` and
    implement :meth:`_generate` and :meth:`_prompt_text`.
    """

    BACKEND = ""
    config: DiffusionRolloutConfig
    server_id: str
    spec: ModelSpec

    def _init_counters(self) -> None:
        self._served = 0
        self._failed = 0
        self._calls = 0

    # ----- generation ----------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_ids: Any,
        sampling_params: dict[str, Any] | None = None,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> SampleGroup:
        """Generate one image for ``prompt_ids`` (prompt text or token ids); see ``request.SAMPLING_FIELDS``.

        Raises ``ValueError`` (before anything is queued) for unknown kwargs or sampling fields and invalid values.
        """
        request = dict(request_id=request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        return await self.generate_group([{**request, "image_data": image_data, "video_data": video_data, **kwargs}])

    async def generate_group(self, requests: list[dict[str, Any]]) -> SampleGroup:
        """Generate several images in one call (each entry holds :meth:`generate`'s arguments), in order.

        For a GRPO group routed to this replica as a whole: one call instead of one per copy, and the group's
        conditioning comes back once. Every request is validated before any is queued: one bad request fails the
        call and nothing runs.
        """
        prepared = [self._prepare(**request) for request in requests]
        self._calls += 1  # a call that fails validation queues nothing and is not counted
        if not prepared:
            from verl_omni.protocol import SampleGroup

            return SampleGroup(samples=[])
        try:
            group = await self._generate(prepared)
        except Exception:
            self._failed += len(prepared)
            raise
        self._served += len(prepared)
        return group

    def _prepare(
        self,
        request_id: str,
        prompt_ids: Any,
        sampling_params: dict[str, Any] | None = None,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> Request:
        if kwargs:
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
            raise ValueError(f"generate() got unexpected argument(s) {shown} (request_id={request_id!r})")
        for name, value in (("image_data", image_data), ("video_data", video_data)):
            if value is not None and not (isinstance(value, list | tuple) and len(value) == 0):
                raise ValueError(
                    f"{name}={type(value).__name__} is not supported: the {self.BACKEND} backend is text-to-image"
                )
        params = resolve_sampling_params(sampling_params, self.config, self.spec)
        return Request(str(request_id), self._prompt_text(prompt_ids), params)

    async def _generate(self, requests: list[Request]) -> SampleGroup:
        raise NotImplementedError

    def _prompt_text(self, prompt_ids: Any) -> str:
        raise NotImplementedError

    # ----- weights ---------------------------------------------------------------------------------

    @staticmethod
    def check_update(
        state_dict: dict[str, torch.Tensor] | None,
        lora_state_dict: dict[str, torch.Tensor] | None,
        lora_config: Any,
        version: int | None,
    ) -> None:
        """``ValueError`` for an ``update_weights`` call that carries nothing or a version that is not an int."""
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ValueError(f"version={version!r} must be an integer or None")
        if state_dict is None and lora_state_dict is None and lora_config is None and version is None:
            raise ValueError("update_weights needs state_dict, lora_state_dict (+ lora_config) or version")

    def _counters(self) -> dict[str, Any]:
        """The part of ``get_stats`` every backend reports."""
        return {
            "server_id": self.server_id,
            "backend": self.BACKEND,
            "requests_served": self._served,
            "generate_calls": self._calls,
            "requests_failed": self._failed,
            "batch_invariant": self.config.batch_invariant,
            "admission_window_ms": self.config.admission_window_ms,
        }

    # ----- verl's LLM-server hooks with nothing to do for diffusion ------------------------------------

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
