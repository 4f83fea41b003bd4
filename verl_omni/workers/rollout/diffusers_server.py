"""``DiffusersRolloutServer``: the async rollout server of the ``diffusers`` backend (one per replica).

A plain class, wrapped with ``ray.remote`` by :class:`~verl_omni.workers.rollout.diffusers_replica.
DiffusersRolloutReplica` (it can also run in-process, e.g. in benchmarks). Requests arrive as
concurrent ``generate`` calls; a single batching loop admits them into fused denoising runs:

- the oldest pending request opens a batch and waits at most ``admission_window_ms`` (from its
  arrival) for compatible requests, or until ``max_num_seqs`` of them are pending;
- only requests with equal size, step count, guidance, noise level and SDE window fuse;
- a batch runs in the server's one engine thread, so the event loop keeps admitting while it
  computes, and weight updates are ordered between batches.

Every request draws its noise from its own seeded generator, and with ``diffusion.batch_invariant`` (the
default) every network call runs at exactly ``chunk_size`` samples, so its image does not depend on the
batch it ran in: bit-identical on CPU (tested). On GPU the shapes are fixed the same way, but
bit-identity has not been measured (no GPU in the test environment); without batch-invariant mode
cuBLAS/cuDNN pick kernels by batch size and batched and lone results agree only to rounding.

The module itself loads no torch (see :mod:`~verl_omni.workers.rollout.server_base`): the engine, torch and the
sample types are imported by the methods that use them, which run in the replica's process only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from verl_omni.request import Request
from verl_omni.utils.gc_pause import collector_paused
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.rollout.server_base import RolloutServerBase

if TYPE_CHECKING:
    import torch

    from verl_omni.protocol import SampleGroup

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))


@dataclass
class _Pending:
    request: Request
    future: asyncio.Future
    arrival: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return self.request.params.batch_key


class DiffusersRolloutServer(RolloutServerBase):
    """Serves ``generate`` requests of one replica with request-level batching and a prompt cache.

    Args:
        model_path: local diffusers pipeline directory (``actor_rollout_ref.model.path``).
        config: the ``rollout.diffusion`` section (dataclass, dict or OmegaConf).
        server_id: the replica's address as the load balancer knows it; echoed in every output.
        device: ``cpu`` or ``cuda`` (inside a Ray actor with one GPU, ``cuda`` is that GPU).
        rollout_dtype: the rollout's ``dtype`` (used on GPU when ``diffusion.dtype`` is ``auto``).
    """

    BACKEND = "diffusers"

    def __init__(
        self,
        model_path: str,
        config: Any = None,
        server_id: str = "diffusers-replica-0",
        device: str = "cpu",
        rollout_dtype: str | None = None,
    ):
        with collector_paused():  # torch, diffusers and the model: objects that all survive
            import torch

            from verl_omni.workers.rollout.diffusers_engine import DiffusersEngine, resolve_torch_dtype

            self.config = DiffusionRolloutConfig.from_config(config)
            self.server_id = server_id
            if device == "cpu":
                torch.set_num_threads(self.config.cpu_threads)
            dtype = resolve_torch_dtype(self.config.dtype, device, rollout_dtype)
            self.engine = DiffusersEngine(model_path, self.config, device=device, dtype=dtype)
        self.spec = self.engine.spec
        threads = self.config.cpu_threads if device == "cpu" else None
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="diffusers-engine",
            initializer=None if threads is None else torch.set_num_threads,
            initargs=() if threads is None else (threads,),
        )
        self._pending: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._running: asyncio.Future | None = None
        self._paused = False
        self._reject = False
        self._batch_sizes: Counter[int] = Counter()
        self._init_counters()

    # ----- generation ----------------------------------------------------------------------------

    def _prompt_text(self, prompt_ids: Any) -> str:
        return self.engine.prompt_text(prompt_ids)

    async def _generate(self, requests: list[Request]) -> SampleGroup:
        """Queue ``requests`` for the batching loop (all in one step, so they arrive together) and await them.

        They fuse with each other and with other pending requests, within ``max_num_seqs``.
        """
        if self._reject:
            raise RuntimeError(
                f"request {requests[0].request_id!r} rejected: generation is aborted on {self.server_id}"
            )
        self._ensure_loop()
        loop = asyncio.get_running_loop()
        pending = [_Pending(request, loop.create_future()) for request in requests]
        self._pending.extend(pending)
        self._wakeup.set()
        from verl_omni.protocol import SampleGroup

        results = await asyncio.gather(*(p.future for p in pending), return_exceptions=True)
        for result in results:  # every future is awaited, so no failure goes unretrieved
            if isinstance(result, BaseException):
                raise result
        return SampleGroup.gather(results)

    def _ensure_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _wait_for_work(self) -> None:
        while not self._pending or self._paused:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _admit(self) -> list[_Pending]:
        """Wait for the admission window of the oldest request; take its compatible requests (FIFO, capped)."""
        head = self._pending[0]
        cap = self.config.max_num_seqs
        deadline = head.arrival + self.config.admission_window_ms / 1000.0
        while not self._paused:
            if sum(p.key == head.key for p in self._pending) >= cap:
                break
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11
                break
        if self._paused:
            return []
        batch, rest = [], []
        for p in self._pending:
            if p.future.done():  # the caller went away
                continue
            (batch if p.key == head.key and len(batch) < cap else rest).append(p)
        self._pending = rest
        return batch

    async def _batch_loop(self) -> None:
        from verl_omni.protocol import SampleGroup

        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_work()
            batch = await self._admit()
            if not batch:
                continue
            start = time.perf_counter()
            self._running = loop.run_in_executor(self._executor, self.engine.run_batch, [p.request for p in batch])
            try:
                group = await asyncio.shield(self._running)
            except Exception as err:  # a failed batch fails its requests, never the loop
                logger.exception("diffusers batch of %d failed on %s", len(batch), self.server_id)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            finally:
                self._running = None
            generate_s = time.perf_counter() - start
            self._batch_sizes[len(batch)] += 1
            for p, sample in zip(batch, group.samples, strict=True):
                sample.extra_fields.update(server_id=self.server_id, queue_s=start - p.arrival, generate_s=generate_s)
                if not p.future.done():
                    keys = (sample.conditioning, sample.negative_conditioning)
                    used = {k: group.conditioning[k] for k in keys if k is not None}
                    p.future.set_result(SampleGroup(samples=[sample], conditioning=used))

    async def _in_engine(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in the engine thread, ordered with batches (never concurrently with one)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # ----- weights, memory and control (verl's RolloutReplica calls these on every server) ----------

    async def update_weights(
        self,
        state_dict: dict[str, torch.Tensor] | None = None,
        lora_state_dict: dict[str, torch.Tensor] | None = None,
        lora_config: Any = None,
        version: int | None = None,
    ) -> int:
        """Load a full/partial transformer state dict and/or a peft LoRA adapter; returns the new version.

        Takes effect between batches: requests in a running batch keep the old version.
        """
        self.check_update(state_dict, lora_state_dict, lora_config, version)
        return await self._in_engine(
            self.engine.update_weights,
            state_dict=state_dict,
            lora_state_dict=lora_state_dict,
            lora_config=lora_config,
            version=version,
        )

    async def sleep(self) -> None:
        """Release GPU memory between rollouts (no-op on CPU)."""
        await self._in_engine(self.engine.sleep)

    async def wake_up(self) -> None:
        """Restore GPU memory released by :meth:`sleep` (no-op on CPU)."""
        await self._in_engine(self.engine.wake_up)

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        """Stop admitting: queued requests wait for :meth:`resume_generation` (or fail if ``reject_request``).

        Returns once the running batch (if any) has finished; a denoising run is not cut midway.
        """
        self._paused = True
        self._reject = bool(reject_request)
        if reject_request:
            pending, self._pending = self._pending, []
            for p in pending:
                if not p.future.done():
                    p.future.set_exception(
                        RuntimeError(
                            f"request {p.request.request_id!r} rejected: generation aborted on {self.server_id}"
                        )
                    )
        running = self._running
        if running is not None:
            await asyncio.wait([running])

    async def resume_generation(self) -> None:
        """Resume admitting after :meth:`abort_all_requests`."""
        self._paused = False
        self._reject = False
        if self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """Stop the batching loop and fail queued requests (in-process use; a Ray actor is just killed)."""
        await self.abort_all_requests(reject_request=True)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._wakeup = None
        self._executor.shutdown(wait=True)

    async def ready(self) -> dict[str, Any]:
        """Model loaded; what this server serves (the replacement of a dead replica awaits it)."""
        return {
            "server_id": self.server_id,
            "model_path": self.engine.spec.path,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype),
            "model_version": self.engine.version,
            "default_height": self.engine.spec.default_height,
            "default_width": self.engine.spec.default_width,
            "pid": os.getpid(),
        }

    async def get_stats(self) -> dict[str, Any]:
        """Batches formed, mean/max batch size, prompt-cache hits and misses, requests served, calls received."""
        batches = sum(self._batch_sizes.values())
        return {
            **self._counters(),
            "batches": batches,
            "mean_batch_size": sum(k * v for k, v in self._batch_sizes.items()) / batches if batches else 0.0,
            "max_batch_size": max(self._batch_sizes, default=0),
            "batch_size_histogram": dict(sorted(self._batch_sizes.items())),
            "prompt_cache": self.engine.cache.stats(),
            "texts_encoded": self.engine.texts_encoded,
            "pending": len(self._pending),
            "paused": self._paused,
            "model_version": self.engine.version,
            "device": str(self.engine.device),
            "chunk_size": self.engine.chunk_size,
            "max_num_seqs": self.config.max_num_seqs,
        }
