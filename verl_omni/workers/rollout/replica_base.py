"""``DiffusionRolloutReplica``: the verl rollout replica every diffusion backend uses, one server actor each.

A backend's replica (``DiffusersRolloutReplica``, ``VllmOmniRolloutReplica``) names its server class; registered
in verl's ``RolloutReplicaRegistry`` under the backend's name when ``verl_omni`` is imported, so
``actor_rollout_ref.rollout.name=<backend>`` makes ``LLMServerManager`` (and ``OmniLLMServerManager``) launch
``n_gpus_per_node * nnodes // (tp * dp * pp)`` of them.

verl's ``init_standalone`` builds a GPU resource pool and a worker group for an LLM engine; a diffusion replica
needs neither: it launches one server actor directly, with one GPU (configurable) when the Ray cluster has GPUs
and with fractional CPU resources otherwise. The model directory and the ``rollout.diffusion`` section are
validated in the constructor, before any actor starts.
"""

from __future__ import annotations

from typing import Any

import ray
from verl.workers.rollout.replica import RolloutMode, RolloutReplica

from verl_omni.utils.batch_invariant import cpu_process_env
from verl_omni.workers.config.diffusion import DIFFUSION_CONFIG_PREFIX, DiffusionRolloutConfig
from verl_omni.workers.config.rollout import ensure_omni_rollout_target
from verl_omni.workers.rollout.model_spec import ModelSpec


class DiffusionRolloutReplica(RolloutReplica):
    """One rollout server (a Ray actor) per replica; see the module docstring.

    A backend subclasses it and sets ``backend``, ``server_class`` and ``address_prefix``.
    """

    backend: str
    server_class: type
    address_prefix: str

    def __init__(
        self,
        replica_rank: int,
        config: Any,
        model_config: Any,
        gpus_per_node: int = 8,
        is_reward_model: bool = False,
        is_teacher_model: bool = False,
        name_suffix: str = "",
    ) -> None:
        ensure_omni_rollout_target(config)  # a stock RolloutConfig target would reject the diffusion section
        super().__init__(
            replica_rank=replica_rank,
            config=config,
            model_config=model_config,
            gpus_per_node=gpus_per_node,
            is_reward_model=is_reward_model,
            is_teacher_model=is_teacher_model,
            name_suffix=name_suffix,
        )
        self.diffusion_config: DiffusionRolloutConfig = self.config.diffusion  # parsed once, by OmniRolloutConfig
        model_path = _model_path(model_config, self.backend)
        self.model_spec = ModelSpec.from_path(model_path, backend=self.backend)
        for key in ("height", "width"):
            value = getattr(self.diffusion_config, key)
            if value is not None:
                self.model_spec.check_image_size(f"{DIFFUSION_CONFIG_PREFIX}.{key}", value)
        if self.diffusion_config.num_frames is not None:  # null: the family's default (none for images)
            self.model_spec.check_num_frames(f"{DIFFUSION_CONFIG_PREFIX}.num_frames", self.diffusion_config.num_frames)
        self._server_address = f"{self.address_prefix}-{self.replica_rank}{self.name_suffix}"

    def placement(self) -> tuple[str, float]:
        """``(device, num_gpus)`` of this replica's server actor, from ``diffusion.device`` and the Ray cluster."""
        cfg = self.diffusion_config
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
        if cfg.device == "cpu":
            return "cpu", 0.0
        if cluster_gpus <= 0:
            if cfg.device == "cuda":
                raise ValueError(f"{DIFFUSION_CONFIG_PREFIX}.device='cuda' but the Ray cluster has no GPUs")
            return "cpu", 0.0
        return "cuda", float(cfg.num_gpus_per_replica)

    def rollout_worker_use_gpu(self) -> bool:
        return self.placement()[0] == "cuda"

    async def init_standalone(self) -> None:
        """Launch the server actor directly (verl's version would reserve a GPU pool even on CPU)."""
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def init_colocated(self, resource_pool: Any) -> None:
        """Same server actor as standalone; share GPUs through a fractional ``num_gpus_per_replica``."""
        self.rollout_mode = RolloutMode.COLOCATED
        self.resource_pool = resource_pool
        await self.launch_servers()

    def server_env(self, device: str) -> dict[str, str]:
        """Environment of the server actor's process: thread counts and, on CPU, MKL's batch-invariant mode."""
        if device != "cpu":
            return {}
        return cpu_process_env(self.diffusion_config.cpu_threads, self.diffusion_config.batch_invariant)

    def server_resources(self) -> dict[str, float]:
        """The Ray resources one server actor of this replica asks for (``CPU``, ``GPU``)."""
        return {"CPU": float(self.diffusion_config.ray_num_cpus), "GPU": self.placement()[1]}

    def start_server(self) -> Any:
        """Create this replica's server actor and return its handle without waiting for the model to load; also
        how a replacement for a dead server starts (``RolloutReplicaPool``)."""
        device, num_gpus = self.placement()
        cfg = self.diffusion_config
        return (
            ray.remote(self.server_class)
            .options(
                num_cpus=cfg.ray_num_cpus,
                num_gpus=num_gpus,
                max_concurrency=self.max_concurrency,
                runtime_env={"env_vars": self.server_env(device)},
            )
            .remote(
                model_path=self.model_spec.path,
                config=cfg,  # the parsed section itself: the server does not parse it again
                server_id=self._server_address,
                device=device,
                rollout_dtype=getattr(self.config, "dtype", None),
            )
        )

    def serve_with(self, handle: Any) -> None:
        """Make ``handle`` (a started server actor) the one this replica exposes."""
        self._server_handle = handle
        self.servers = [handle]

    async def launch_servers(self) -> None:
        """Start the server actor and expose it to ``LLMServerManager`` at once: its model loads in the background
        (a call to it waits for the load), so other actors can start meanwhile;
        ``OmniLLMServerManager.wait_loaded`` waits for it."""
        self.serve_with(self.start_server())


def _model_path(model_config: Any, backend: str) -> str:
    path = model_config.get("path") if hasattr(model_config, "get") else getattr(model_config, "path", None)
    if not path:
        raise ValueError(f"actor_rollout_ref.model.path is not set: the {backend} backend needs a pipeline directory")
    return str(path)
