"""``VllmOmniRolloutServer``: the async rollout server of the ``vllm_omni`` backend (one per replica, GPU only).

The same interface as :class:`~verl_omni.workers.rollout.diffusers_server.DiffusersRolloutServer` (``generate``,
``generate_group``, ``update_weights``, ``sleep``/``wake_up``, ``abort_all_requests``/``resume_generation``,
``ready``/``get_stats``), in front of vllm-omni's ``AsyncOmni`` running verl-omni's custom pipeline for the
checkpoint's model family (:mod:`verl_omni.pipelines.registry`). vllm-omni schedules and batches the requests;
this server validates them with the diffusers backend's rules, builds vllm-omni requests, orders weight updates
between requests and translates every ``OmniRequestOutput`` to a :class:`~verl_omni.protocol.Sample`
(:mod:`~verl_omni.pipelines.vllm_omni_protocol`).

vllm and vllm-omni are imported only when the server starts its engine (:mod:`.vllm_omni_engine`). It runs on CUDA
GPUs and, through vLLM's CPU build and verl-omni's CPU platform for vllm-omni (:mod:`.vllm_omni_cpu_platform`), on
CPU, where two things are refused or off: full-weight updates (vLLM's CPU layers repack their weights at load
time, so a reload cannot reach them: use LoRA) and sleep mode (the weights already live in host memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import torch

from verl_omni.pipelines.registry import MODEL_PIPELINES, adapter_path, load_schedule
from verl_omni.pipelines.vllm_omni_protocol import (
    LOAD_WEIGHTS_METHOD,
    WORKER_EXTENSION,
    check_rpc_results,
    engine_prompt,
    sampling_kwargs,
    to_sample,
)
from verl_omni.protocol import SampleGroup
from verl_omni.request import Request, SamplingParams
from verl_omni.utils.containers import plain
from verl_omni.utils.peft_names import with_peft_prefix
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.rollout.diffusers_engine import resolve_torch_dtype
from verl_omni.workers.rollout.model_spec import ModelSpec, load_scheduler
from verl_omni.workers.rollout.prompt_text import prompt_text
from verl_omni.workers.rollout.server_base import RolloutServerBase

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

BACKEND = "vllm_omni"
SLEEP_LEVEL = 1  # offload weights to host memory and keep them (level 2 would discard them)
EngineFactory = Callable[[str, dict[str, Any]], Any]
DEVICES = ("cuda", "cpu")
CPU_FULL_WEIGHTS = (
    "full-weight updates are not possible on the vllm_omni backend on CPU (vLLM's CPU layers repack their weights "
    "when loading, so new weights cannot be loaded into them): train with LoRA (actor_rollout_ref.model.lora_rank > 0)"
    " or use actor_rollout_ref.rollout.name=diffusers"
)


def engine_kwargs(pipeline_class: str, dtype: str, config: DiffusionRolloutConfig, device: str) -> dict[str, Any]:
    """``AsyncOmni`` keyword arguments: our custom pipeline, our worker extension, sleep mode (GPU only: vLLM's
    CPU build has no cumem allocator to sleep with), the batching window and batch cap."""
    return {
        "custom_pipeline_args": {"pipeline_class": pipeline_class},
        "worker_extension_cls": WORKER_EXTENSION,
        "dtype": dtype,
        "enable_sleep_mode": device == "cuda",
        "request_batch_max_wait_ms": float(config.admission_window_ms),
        "max_num_seqs": int(config.max_num_seqs),  # vllm-omni's default, 1, runs every request alone
    }


def unit_scaled_lora(
    lora_state_dict: Mapping[str, torch.Tensor], lora_config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter with peft's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) folded into ``lora_B``
    and a config whose scaling is 1.

    vllm-omni 0.28 applies the scaling to a LoRA on an unfused layer but not on a slice of a fused one (SD3's
    ``to_qkv`` holds ``to_q``, ``to_k``, ``to_v``): measured on CPU, an adapter with ``lora_alpha = 2 r`` on
    ``to_q`` sampled another policy than peft's (log-prob gap 1.6e-3), the same adapter folded agrees. With a
    power-of-two scaling (the recipes' 64 / 32) the fold is exact in floating point.
    """
    config = dict(lora_config)
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ValueError("LoRA adapters with alpha_pattern or rank_pattern are not supported by the vllm_omni backend")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    config.update(lora_alpha=rank, use_rslora=False)
    if scaling == 1.0:
        return dict(lora_state_dict), config
    return {k: v * scaling if ".lora_B." in k else v for k, v in lora_state_dict.items()}, config


ENGINE_START_ATTEMPTS = 3


def _start_engine(factory: EngineFactory, model_path: str, kwargs: dict[str, Any], server_id: str) -> Any:
    """``factory(model_path, kwargs)``, tried again when the engine lost a port race.

    vllm-omni picks its torch.distributed port as a free one and binds it later; replicas (or anything else) starting
    at the same time can take it in between, and start-up fails with EADDRINUSE (seen with two replicas starting
    beside a busy test run). Each attempt picks a new port.
    """
    for attempt in range(1, ENGINE_START_ATTEMPTS + 1):
        try:
            return factory(model_path, kwargs)
        except Exception as exc:
            if "EADDRINUSE" not in str(exc) or attempt == ENGINE_START_ATTEMPTS:
                raise
            logger.warning("%s: vllm-omni lost a port race at start-up (attempt %d); again", server_id, attempt)
    raise AssertionError("unreachable")


def _exit_with_parent(engine: Any, server_id: str, poll_s: float = 1.0) -> None:
    """End this process (engine first) once its parent is gone.

    A Ray actor holding ``AsyncOmni`` outlived its Ray session here: after the recipe exited, the actor process
    (re-parented to init) kept running and spawning vllm-omni stage processes. A daemon thread watches the parent
    (the raylet for an actor) and shuts the engine down and exits when it changes, so no engine is left behind.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logger.warning("%s: parent process %d is gone; shutting the vllm-omni engine down", server_id, parent)
        with contextlib.suppress(Exception):
            engine.shutdown()
        os._exit(0)

    threading.Thread(target=watch, name=f"{server_id}-parent-watch", daemon=True).start()


class VllmOmniRolloutServer(RolloutServerBase):
    """Serves ``generate`` requests of one replica through vllm-omni.

    Args:
        model_path: local diffusers-format checkpoint (``actor_rollout_ref.model.path``).
        config: the ``rollout.diffusion`` section (sampling defaults; ``dtype``, ``admission_window_ms``,
            ``batch_invariant``/``chunk_size`` and ``max_sequence_length`` apply; the prompt cache does not:
            vllm-omni encodes each request's prompt).
        server_id: the replica's address as the load balancer knows it; echoed in every output.
        device: ``cuda``, or ``cpu`` (needs the ``vllm-omni-cpu`` extra).
        rollout_dtype: the rollout's ``dtype`` (used on GPU when ``diffusion.dtype`` is ``auto``).
        engine_factory: ``(model_path, engine_kwargs) -> VllmOmniApi``; default starts ``AsyncOmni``.
    """

    BACKEND = BACKEND

    def __init__(
        self,
        model_path: str,
        config: Any = None,
        server_id: str = "vllm-omni-replica-0",
        device: str = "cuda",
        rollout_dtype: str | None = None,
        engine_factory: EngineFactory | None = None,
    ):
        if device not in DEVICES:
            raise ValueError(f"device={device!r} is not a device of the vllm_omni rollout backend; valid: cuda, cpu")
        self.device = device
        self.config = DiffusionRolloutConfig.from_config(config)
        self.server_id = server_id
        self.spec = ModelSpec.from_path(model_path, backend=BACKEND)
        self.max_sequence_length = self.config.max_sequence_length or self.spec.default_max_sequence_length()
        self.chunk_size = self.config.chunk_size if self.config.batch_invariant else None
        # One rule for both backends: ``auto`` is float32 on CPU (as the trainer computes there), the rollout's
        # dtype on GPU. (vLLM's own default on CPU is bfloat16: 3.6e-3 log-prob gap to the float32 trainer.)
        self.dtype = str(resolve_torch_dtype(self.config.dtype, device, rollout_dtype)).removeprefix("torch.")
        kwargs = engine_kwargs(adapter_path(self.spec.pipeline_class, BACKEND), self.dtype, self.config, device)
        if engine_factory is None:
            from verl_omni.workers.rollout.vllm_omni_engine import start_async_omni

            engine_factory = start_async_omni
        start = time.perf_counter()
        self._api = _start_engine(engine_factory, self.spec.path, kwargs, self.server_id)
        self.engine = self._api.engine
        self.engine_start_s = time.perf_counter() - start
        _exit_with_parent(self.engine, self.server_id)

        self._scheduler = load_scheduler(self.spec.path)  # the class the checkpoint names, as the pipelines load it
        self._sigmas: dict[tuple[int, int, int], torch.Tensor] = {}
        self._scheduler_sigmas = load_schedule(self.spec.pipeline_class)
        self._true_cfg = MODEL_PIPELINES[self.spec.pipeline_class].true_cfg
        self._tokenizer: Any = None
        self.version = 0
        self._lora_request: Any = None
        self._lora_config: dict[str, Any] | None = None
        self._lora_ids = 0
        self._lora_dir: str | None = None
        self.sleeping = False
        self._sleep_logged = False
        # Admission: requests wait while paused (abort_all_requests) or while a weight update runs.
        self._cond = asyncio.Condition()
        self._paused = False
        self._reject = False
        self._updating = False
        self._inflight: dict[str, str] = {}  # engine request id -> caller's request id
        self._init_counters()

    # ----- generation ----------------------------------------------------------------------------

    async def _generate(self, requests: list[Request]) -> SampleGroup:
        """Send the requests to vllm-omni together (so its scheduler can batch them); one group back, in order."""
        results = await asyncio.gather(*(self._run(r) for r in requests), return_exceptions=True)
        for result in results:  # every task is awaited, so no failure goes unretrieved
            if isinstance(result, BaseException):
                raise result
        return SampleGroup.gather(results)

    def _prompt_text(self, prompt_ids: Any) -> str:
        if isinstance(prompt_ids, str):
            return prompt_ids
        if self._tokenizer is None:  # only token-id prompts need it: loaded on first use, on the host
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.spec.path, subfolder="tokenizer")
        return prompt_text(prompt_ids, self._tokenizer)

    def schedule(self, params: SamplingParams) -> torch.Tensor:
        """The request's full schedule (N + 1 sigmas), computed as the custom pipeline computes it."""
        key = (params.num_inference_steps, params.height, params.width)
        if key not in self._sigmas:
            self._sigmas[key] = self._scheduler_sigmas(
                self._scheduler, *key, self.spec.vae_scale_factor, self.spec.patch_size
            )
        return self._sigmas[key]

    def build_request(self, text: str, params: SamplingParams) -> tuple[dict[str, str], Any]:
        """The vllm-omni prompt and ``OmniSamplingParams`` of one request, with the current LoRA adapter."""
        kwargs = sampling_kwargs(params, self.max_sequence_length, self.chunk_size)
        if self._lora_request is not None:
            kwargs["lora_request"] = self._lora_request
        return engine_prompt(text, params), self._api.sampling_params_cls(**kwargs)

    @contextlib.asynccontextmanager
    async def _admitted(self, request_id: str) -> AsyncIterator[str]:
        """Wait while paused or updating weights; hold an in-flight slot (an engine request id) meanwhile."""
        async with self._cond:
            while (self._paused or self._updating) and not self._reject:
                await self._cond.wait()
            if self._reject:
                raise RuntimeError(f"request {request_id!r} rejected: generation is aborted on {self.server_id}")
            engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"  # a resent request may reuse its caller id
            self._inflight[engine_id] = request_id
        try:
            yield engine_id
        finally:
            async with self._cond:
                self._inflight.pop(engine_id, None)
                self._cond.notify_all()

    async def _run(self, request: Request) -> SampleGroup:
        request_id, text, params = request.request_id, request.prompt, request.params
        arrival = time.perf_counter()
        async with self._admitted(request_id) as engine_id:
            self._ensure_awake()
            version = self.version
            prompt, sampling_params = self.build_request(text, params)
            start = time.perf_counter()
            final = None
            async for output in self.engine.generate(prompt, sampling_params, request_id=engine_id):
                final = output
            generate_s = time.perf_counter() - start
        if final is None:
            raise RuntimeError(f"vllm-omni request {request_id!r} returned no output")
        extra = {
            "server_id": self.server_id,
            "global_steps": version,
            "queue_s": start - arrival,
            "generate_s": generate_s,
        }
        sample, conditioning = to_sample(
            final, request_id, text, params, self.schedule(params), version, extra, true_cfg=self._true_cfg
        )
        return SampleGroup(samples=[sample], conditioning=conditioning)

    # ----- weights, memory and control (verl's RolloutReplica calls these on every server) ----------

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Block new requests and wait for in-flight ones: weights change between requests, never during one."""
        async with self._cond:
            while self._updating:
                await self._cond.wait()
            self._updating = True
            await self._cond.wait_for(lambda: not self._inflight)
        try:
            yield
        finally:
            async with self._cond:
                self._updating = False
                self._cond.notify_all()

    async def update_weights(
        self,
        state_dict: dict[str, torch.Tensor] | None = None,
        lora_state_dict: dict[str, torch.Tensor] | None = None,
        lora_config: Any = None,
        version: int | None = None,
    ) -> int:
        """Load a full/partial transformer state dict and/or a peft LoRA adapter (in memory); returns the version.

        Requests admitted before the call keep the old weights; later ones wait and get the new. A LoRA update
        adds the new adapter, points later requests at it, then removes the old one. ``version=None`` increments.
        """
        self.check_update(state_dict, lora_state_dict, lora_config, version)
        if lora_state_dict is None and lora_config is not None:
            raise ValueError(
                "lora_config without lora_state_dict: the vllm_omni backend loads a LoRA adapter with its weights"
            )
        if state_dict is not None and self.device == "cpu":
            raise ValueError(f"{self.server_id}: {CPU_FULL_WEIGHTS}")
        async with self._exclusive():
            await self._wake()  # as the diffusers backend: an update wakes a sleeping replica
            if state_dict is not None:
                await self._rpc(LOAD_WEIGHTS_METHOD, dict(state_dict))
            if lora_state_dict is not None:
                await self._load_lora(lora_state_dict, lora_config)
            self.version = self.version + 1 if version is None else version
        return self.version

    async def _load_lora(self, lora_state_dict: Mapping[str, torch.Tensor], lora_config: Any) -> None:
        if lora_config is not None:
            self._lora_config = plain(lora_config.to_dict() if hasattr(lora_config, "to_dict") else dict(lora_config))
        if self._lora_config is None:
            raise ValueError("lora_state_dict given but no LoRA adapter is loaded: pass lora_config with it")
        if self._lora_dir is None:  # vLLM resolves lora_path before our in-memory loader: give it a local dir
            self._lora_dir = tempfile.mkdtemp(prefix="verl_omni_lora_")
        self._lora_ids += 1
        tensors, peft_config = unit_scaled_lora(lora_state_dict, self._lora_config)
        request = self._api.lora_request_cls(
            lora_name=f"verl_omni_lora_{self._lora_ids}",
            lora_int_id=self._lora_ids,
            lora_path=self._lora_dir,
            peft_config=peft_config,
            lora_tensors=with_peft_prefix(tensors),
        )
        await self._rpc("add_lora", request)
        loaded = await self.engine.list_loras()
        if request.lora_int_id not in loaded:
            raise RuntimeError(f"{self.server_id}: LoRA adapter {request.lora_int_id} is not loaded after add_lora")
        previous, self._lora_request = self._lora_request, request
        if previous is not None and previous.lora_int_id in loaded:  # vllm-omni may have evicted it already
            await self._rpc("remove_lora", previous.lora_int_id)

    async def _rpc(self, method: str, *args: Any) -> list[Any]:
        """``collective_rpc`` on every stage; ``RuntimeError`` naming the replica and the call if any worker failed
        or answered False (vllm-omni reports a failed worker call as a result, not an exception)."""
        results = check_rpc_results(await self.engine.collective_rpc(method, args=args), method, self.server_id)
        if any(r is False or (isinstance(r, list) and False in r) for r in results):
            raise RuntimeError(f"{self.server_id}: collective_rpc({method!r}) answered False: {results}")
        return results

    async def sleep(self) -> None:
        """Offload the engine's weights to host memory between rollouts (vllm-omni sleep mode, level 1).

        On CPU sleep mode is off (the weights already live in host memory): logged once, and the replica stays
        awake (``get_stats()["sleeping"]`` says so).
        """
        if self.device == "cpu":
            if not self._sleep_logged:
                self._sleep_logged = True
                logger.warning("%s: sleep mode is off on CPU (the weights live in host memory)", self.server_id)
            return
        async with self._exclusive():
            if not self.sleeping:
                check_rpc_results(await self.engine.sleep(level=SLEEP_LEVEL), "sleep", self.server_id)
                self.sleeping = True

    async def wake_up(self) -> None:
        """Restore what :meth:`sleep` offloaded."""
        async with self._exclusive():
            await self._wake()

    async def _wake(self) -> None:
        if self.sleeping:
            check_rpc_results(await self.engine.wake_up(), "wake_up", self.server_id)
            self.sleeping = False

    def _ensure_awake(self) -> None:
        if self.sleeping:
            raise RuntimeError(f"{self.server_id} is asleep: call wake_up() before generate() or update_weights()")

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        """Stop admitting: new requests wait for :meth:`resume_generation` (or fail if ``reject_request``).

        Without ``reject_request`` the requests already in vllm-omni finish; with it they are aborted in the
        engine and their callers get an error. Returns once none is in flight.
        """
        async with self._cond:
            self._paused = True
            self._reject = bool(reject_request)
            inflight = list(self._inflight)
            self._cond.notify_all()
        if reject_request and inflight:
            await self.engine.abort(inflight)
        async with self._cond:
            await self._cond.wait_for(lambda: not self._inflight)

    async def resume_generation(self) -> None:
        """Resume admitting after :meth:`abort_all_requests`."""
        async with self._cond:
            self._paused = False
            self._reject = False
            self._cond.notify_all()

    async def close(self) -> None:
        """Fail waiting requests, abort in-flight ones and shut the engine down (in-process use)."""
        await self.abort_all_requests(reject_request=True)
        self.engine.shutdown()

    async def ready(self) -> dict[str, Any]:
        """Engine started; what this server serves (the replacement of a dead replica awaits it)."""
        return {
            "server_id": self.server_id,
            "backend": BACKEND,
            "model_path": self.spec.path,
            "pipeline_class": adapter_path(self.spec.pipeline_class, BACKEND),
            "device": self.device,
            "dtype": self.dtype,
            "engine_start_s": self.engine_start_s,
            "model_version": self.version,
            "default_height": self.spec.default_height,
            "default_width": self.spec.default_width,
            "pid": os.getpid(),
        }

    async def get_stats(self) -> dict[str, Any]:
        """Requests served and failed, calls received, in flight, pause state, version and LoRA adapter."""
        return {
            **self._counters(),
            "in_flight": len(self._inflight),
            "paused": self._paused,
            "sleeping": self.sleeping,
            "model_version": self.version,
            "lora_adapter_id": None if self._lora_request is None else self._lora_request.lora_int_id,
            "device": self.device,
            "chunk_size": self.chunk_size,
        }
