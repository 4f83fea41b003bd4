"""FlowGRPO policy worker: recomputes log-probs of stored SDE transitions and updates the transformer.

A verl single-controller ``Worker`` so it runs in a ``RayWorkerGroup`` like verl's actors: one
CPU process here, one process per GPU otherwise. With several ranks the transformer is sharded
with FSDP2 (``fully_shard``, through verl's ``apply_fsdp2``), each rank receives only its block of the
batch (and the conditioning entries it uses), and gradients are averaged by FSDP's reduce-scatter (data parallel).
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from typing import Any

from verl_omni.utils.gc_pause import collector_paused

with collector_paused():  # verl, torch: objects that all survive (verl_omni.utils.gc_pause)
    import numpy as np
    import ray
    import torch
    import torch.distributed as dist
    from omegaconf import DictConfig
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.tensor import DTensor
    from verl.protocol import DataProto
    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import Dispatch, register

    from verl_omni.pipelines.registry import load_trainer_binding
    from verl_omni.protocol import CONDITIONING, CONDITIONING_INDEX, NEGATIVE_CONDITIONING_INDEX, NOISE, expand, shard
    from verl_omni.trainer.flowgrpo.loss import (
        flowgrpo_policy_loss,
        guard_log_prob,
        kl_std,
        per_step_ratio_metrics,
        truncated_is_weights,
    )
    from verl_omni.trainer.flowgrpo.nft import draw_timesteps, nft_loss, old_policy_decay, optimality_probability
    from verl_omni.trainer.flowgrpo.old_log_prob import LogProbFn, recompute_old_log_probs, rollout_gap_metrics
    from verl_omni.utils.batch_invariant import cpu_process_env, map_chunks, onednn, torch_threads
    from verl_omni.workers.config.actor_fsdp import ActorFSDPConfig, check_training_split
    from verl_omni.workers.config.training import TrainingSections
    from verl_omni.workers.ema import EMAWeights, OldPolicyWeights
    from verl_omni.workers.precision import cast_floating_buffers, torch_dtype
    from verl_omni.workers.rollout.backends import pipeline_class
    from verl_omni.workers.rollout.model_spec import read_model_index

_DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def load_transformer(model_path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a diffusers pipeline's ``transformer`` with ``from_pretrained``, whatever its class."""
    index = read_model_index(model_path)
    if "transformer" not in index:
        raise ValueError(f"actor_rollout_ref.model.path={model_path!r} has no 'transformer' component to train")
    import diffusers

    library, class_name = index["transformer"]
    cls = getattr(diffusers, class_name)
    return cls.from_pretrained(model_path, subfolder="transformer", torch_dtype=dtype)


def dispatch_rank_shards(worker_group: Any, data: DataProto, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """verl dispatch: rank ``r`` receives its block of the training batch's rows and only the conditioning entries
    those rows use (:func:`~verl_omni.protocol.shard`), not the whole batch."""
    shards = shard(data, worker_group.world_size)
    return (shards, *([a] * worker_group.world_size for a in args)), {
        k: [v] * worker_group.world_size for k, v in kwargs.items()
    }


def collect_all(worker_group: Any, output: list[Any]) -> list[Any]:
    """Every rank's result, in rank order."""
    return output


def actor_worker_group(
    config: DictConfig, sections: TrainingSections, pool: Any, name_prefix: str, use_gpu: bool = False
) -> Any:
    """The training ranks: verl's ``RayWorkerGroup`` of :class:`DiffusionActorWorker` on ``pool`` (waits for its
    placement group). Each rank gets the config and the driver's parsed ``sections``; on CPU its
    environment carries the replicas' numerics (thread count from ``trainer.cpu_threads``, MKL strict under
    ``diffusion.batch_invariant``), set before MKL loads."""
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

    env = (
        {}
        if use_gpu
        else cpu_process_env(int(config.trainer.get("cpu_threads", 0) or 0), sections.diffusion.batch_invariant)
    )
    return RayWorkerGroup(
        resource_pool=pool,
        ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(DiffusionActorWorker), config=config, sections=sections),
        name_prefix=name_prefix,
        device_name="cuda" if use_gpu else "cpu",
        worker_env=env,
    )


class DiffusionActorWorker(Worker):
    """Holds the trainable transformer, its optimizer and (when ``beta > 0``) the reference."""

    def __init__(self, config: DictConfig, sections: TrainingSections):
        """``sections``: the typed sections as the driver parsed them (:class:`TrainingSections`)."""
        super().__init__()
        self.config = config
        self.sections = sections
        self.model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None

    # ------------------------------------------------------------------ setup
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> dict[str, Any]:
        """Load the transformer (plus LoRA / reference), shard it over the ranks, build the optimizer.

        Returns this rank's layout (strategy, trainable parameters in total and held locally), so the
        driver can report how the model was split.
        """
        cfg = self.config
        actor = cfg.actor_rollout_ref.actor
        model_cfg = cfg.actor_rollout_ref.model
        self.fsdp = ActorFSDPConfig.from_actor_config(actor)
        threads = int(cfg.trainer.get("cpu_threads", 0) or 0)
        if threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        # Ray gives each GPU worker its own device, so the current device is the right one.
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        # FSDP2 shards over several ranks; on one rank it is still what applies mixed precision (param_dtype).
        self.use_fsdp = self.world_size > 1 or self.fsdp.param_dtype != "float32"
        if self.use_fsdp and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        # Same seed on every rank: LoRA initialisation is identical, so sharding needs no broadcast.
        torch.manual_seed(int(cfg.trainer.seed))

        with collector_paused():  # diffusers and the model load: objects that all survive
            self.model = load_transformer(model_cfg.path)
            # the family's log-prob of stored transitions: the same velocity and SDE step its rollout samples with
            self.compute_log_prob = load_trainer_binding(pipeline_class(model_cfg.path))
        # The rollout's bf16 copy (from_pretrained) has bf16 buffers too; FSDP2 casts only parameters.
        self.compute_dtype = torch_dtype(self.fsdp.param_dtype)
        cast_floating_buffers(self.model, self.compute_dtype)
        self.lora_rank = int(model_cfg.get("lora_rank", 0) or 0)
        self.beta = float(actor.get("kl_loss_coef", 0.0) if actor.get("use_kl_loss", False) else 0.0)
        if self.lora_rank > 0:
            from peft import LoraConfig

            targets = model_cfg.get("target_modules", _DEFAULT_LORA_TARGETS)
            if isinstance(targets, str) and targets == "all-linear":
                targets = _DEFAULT_LORA_TARGETS
            self.lora_config = {
                "r": self.lora_rank,
                "lora_alpha": int(model_cfg.get("lora_alpha", 16)),
                "init_lora_weights": "gaussian",
                "target_modules": list(targets),
            }
            self.model.requires_grad_(False)
            self.model.add_adapter(LoraConfig(**self.lora_config))
        else:
            self.lora_config = None
            if self.beta > 0:
                self.ref_model = self._shard(copy.deepcopy(self.model).requires_grad_(False).eval())
        if model_cfg.get("enable_gradient_checkpointing", False) and hasattr(
            self.model, "enable_gradient_checkpointing"
        ):
            self.model.enable_gradient_checkpointing()
        self.model = self._shard(self.model)
        self.model.train()
        self.buffer_names = {n for n, _ in self.model.named_buffers()}
        named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable_names = {n for n, _ in named_trainable}
        self.trainable = [p for _, p in named_trainable]
        ema = actor.get("ema") or {}
        self.ema = (
            EMAWeights(named_trainable, float(ema.get("decay", 0.9)), int(ema.get("update_every", 8)))
            if ema.get("enable", False)
            else None
        )
        # DiffusionNFT: the old policy samples the rollouts and gives v_old; soft-updated after each training step
        self.nft = self.sections.algorithm.name == "diffusion_nft"
        self.nft_options = self.sections.algorithm.nft
        self.nft_old = OldPolicyWeights(named_trainable) if self.nft else None
        self.timestep_fraction = float(actor.get("timestep_fraction", 1.0))
        self._optimizer_steps = 0
        optim = actor.optim
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=float(optim.lr),
            betas=tuple(optim.get("betas", (0.9, 0.999))),
            weight_decay=float(optim.get("weight_decay", 0.0)),
            eps=float(optim.get("eps", 1e-8)),
        )
        self.grad_clip = float(actor.get("grad_clip", 1.0))
        self.clip_range = float(actor.clip_ratio)
        self.ppo_epochs = int(actor.ppo_epochs)
        self.micro_batch_size = int(actor.get("ppo_micro_batch_size_per_gpu") or 1)
        self.mini_batch_size = int(actor.ppo_mini_batch_size)
        # The recomputation must use the sampler's guidance and noise level, or step 0 is off-policy.
        diffusion = self.sections.diffusion
        self.guidance_scale = float(diffusion.guidance_scale)
        self.noise_level = float(diffusion.noise_level)
        self.sde_type = diffusion.sde_type
        # GRPO-Guard: the clipped ratio is normalised per step (needs each transition's old mean)
        self.guard = self.sections.algorithm.name == "grpo_guard"
        # Batch-invariant: recompute at the replicas' fixed chunk shape (on CPU also without oneDNN, and with
        # MKL strict from the worker's environment), so step 0 reproduces the stored log-probs bit for bit.
        self.chunk_size = diffusion.chunk_size if diffusion.batch_invariant else None
        self.use_onednn = not (diffusion.batch_invariant and self.device.type == "cpu")
        # Some CPU kernels round differently with the thread count (measured: 1 and 2 threads agree, 3 and 4
        # do not): the recompute's forward runs with the replicas' cpu_threads; backward keeps trainer.cpu_threads.
        invariant_cpu = diffusion.batch_invariant and self.device.type == "cpu"
        self.recompute_threads = diffusion.cpu_threads if invariant_cpu else None
        self.kl_form = str(actor.get("kl_form", "reference"))
        self.cfg_detach_uncond = bool(actor.get("cfg_detach_uncond", True))
        # Old log-probs: the rollout's, or recomputed here at the trainer's precision before each update.
        self.recompute_old_log_prob = bool(actor.get("recompute_old_log_prob", False))
        threshold = actor.get("rollout_is_threshold")
        self.rollout_is_threshold = None if threshold is None else float(threshold)
        self._update_calls = 0
        return {
            "strategy": self.fsdp.strategy if self.use_fsdp else "single",
            "param_dtype": self.fsdp.param_dtype,
            "world_size": self.world_size,
            "device": str(self.device),
            "trainable_params": sum(p.numel() for p in self.trainable),
            "local_trainable_params": sum(_local(p).numel() for p in self.trainable),
        }

    def _shard(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move to the device; with several ranks or mixed precision, shard every wrapped block and the root with
        FSDP2 (on one rank that only casts parameters to ``param_dtype`` for compute)."""
        module = module.to(self.device)
        if not self.use_fsdp:
            return module
        from torch.distributed.device_mesh import init_device_mesh
        from verl.utils.fsdp_utils import apply_fsdp2

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        fsdp_kwargs = {
            "mesh": mesh,
            "mp_policy": self.fsdp.mp_policy(),
            "reshard_after_forward": self.fsdp.reshard_after_forward,
        }
        wrap = self.fsdp.wrap_modules or list(getattr(module, "_no_split_modules", None) or [])
        if not wrap:
            raise ValueError(
                f"{type(module).__name__} declares no _no_split_modules: set "
                "actor_rollout_ref.actor.fsdp_config.wrap_policy.transformer_layer_cls_to_wrap"
            )
        apply_fsdp2(module, fsdp_kwargs, {"wrap_policy": {"transformer_layer_cls_to_wrap": wrap}})
        return module

    # ---------------------------------------------------------------- update
    @register(dispatch_mode={"dispatch_fn": dispatch_rank_shards, "collect_fn": collect_all})
    def update_policy(self, data: DataProto) -> dict[str, float]:
        """Clipped-ratio FlowGRPO update over ``ppo_epochs`` passes of this rank's shard; returns mean metrics.

        ``data`` is this rank's rows (:func:`dispatch_rank_shards`) with their conditioning table; a step's
        conditioning is expanded from it only when the step runs.
        """
        batch = {k: v for k, v in data.batch.items()}
        self._table = data.meta_info.get(CONDITIONING, [])
        local = batch["latents"].shape[0]
        check_training_split(
            local * self.world_size, self.mini_batch_size, self.world_size, on_gpu=self.device.type != "cpu"
        )
        rows = np.arange(local)
        if self.nft:  # no log-probs: K noise levels per sample out of the N of its sampling schedule
            steps = int(batch["sigmas"].shape[1] * self.timestep_fraction)
            nft_generator = torch.Generator().manual_seed(
                int(self.config.trainer.seed) + 7919 * self._update_calls + 104729 * self.rank
            )
        else:
            batch["old_log_probs"] = batch.pop("log_probs")
            steps = batch["old_log_probs"].shape[1]
        rng = np.random.default_rng(int(self.config.trainer.seed) + 7919 * self._update_calls)
        self._update_calls += 1
        mini = min(self.mini_batch_size // self.world_size, len(rows))
        micro = min(self.micro_batch_size, mini)
        out: dict[str, float] = {}
        if self.recompute_old_log_prob:
            start = time.perf_counter()
            rollout_log_probs = batch["old_log_probs"]
            old = recompute_old_log_probs(self._policy_log_prob(batch), rollout_log_probs, rows, micro)
            batch["old_log_probs"], batch["rollout_log_probs"] = old, rollout_log_probs
            out.update(rollout_gap_metrics(old[rows], rollout_log_probs[rows]))
            out["timing_s/old_log_prob"] = time.perf_counter() - start
        if self.guard:
            batch["old_means"] = self._old_means(batch, rows, micro)
        totals: dict[str, list[float]] = {}
        step_ratios: dict[str, list[list[torch.Tensor]]] = {}  # "ratio" / "guard_ratio" -> per trained step
        first_clip: list[float] = []  # clip fraction of the first inner step (before any update), then the rest
        later_clip: list[float] = []
        first_log_ratios: list[torch.Tensor] = []  # every (sample, trained step) row before the first update
        nft_rows: dict[str, list[dict[str, torch.Tensor]]] = {"first": [], "later": []}  # DiffusionNFT's v - v_old
        shifts: list[torch.Tensor] = []  # re-centred rows: (max |shift|, mean shift^2) per row and step
        for epoch in range(self.ppo_epochs):
            if self.nft:  # fresh forward-process draws per pass, as the authors per inner epoch
                self._nft_prepare(batch, rows, micro, steps, nft_generator)
            order = rows[rng.permutation(len(rows))]
            for m_start in range(0, len(order), mini):
                on_policy = epoch == 0 and m_start == 0
                mini_rows = order[m_start : m_start + mini]
                self.optimizer.zero_grad(set_to_none=True)
                for u_start in range(0, len(mini_rows), micro):
                    idx = torch.as_tensor(mini_rows[u_start : u_start + micro])
                    weight = len(idx) / len(mini_rows) / steps
                    for t in range(steps):
                        if self.nft:
                            loss, metrics, per_row = self._nft_loss_at_step(batch, idx, t)
                            (loss * weight).backward()
                            nft_rows["first" if on_policy else "later"].append(per_row)
                        else:
                            loss, metrics, log_ratio, log_ratios, shift = self._loss_at_step(batch, idx, t)
                            (loss * weight).backward()
                            if shift is not None:
                                shifts.append(shift)
                            for name, value in log_ratios.items():
                                step_ratios.setdefault(name, [[] for _ in range(steps)])[t].append(value)
                            if on_policy:
                                first_log_ratios.append(log_ratio)
                            (first_clip if on_policy else later_clip).append(metrics["clip_frac"])
                        for key, value in metrics.items():
                            totals.setdefault(key, []).append(value)
                grad_norm = self._step()
                totals.setdefault("grad_norm", []).append(grad_norm)
        out.update({f"actor/{k}": float(np.mean(v)) for k, v in totals.items()})
        if self.nft:
            out.update(self._nft_finish(batch, nft_rows))
            return self._common_metrics(out)
        out["actor/clip_frac_first"] = float(np.mean(first_clip))
        if later_clip:
            out["actor/clip_frac_later"] = float(np.mean(later_clip))
        # On-policy check: with unchanged weights ratio = 1 exactly under batch-invariant CPU execution; a mean
        # would hide single deviations, so report the largest one (the driver merges ranks by max).
        log_ratio = torch.cat(first_log_ratios).double() if first_log_ratios else torch.zeros(1, dtype=torch.float64)
        out["actor/ratio_max_abs_dev"] = float(torch.expm1(log_ratio).abs().max())
        out["actor/log_ratio_abs_mean"] = float(log_ratio.abs().mean())
        out.update(per_step_ratio_metrics(step_ratios))
        if shifts:  # how stale the re-centred samples were, in noise stds (a mean would hide one far-moved row)
            shift = torch.cat(shifts).double()
            out["actor/recentre_shift_max"] = float(shift[:, 0].max())
            out["actor/recentre_shift_rms"] = float(shift[:, 1].mean().sqrt())
        return self._common_metrics(out)

    def _common_metrics(self, out: dict[str, float]) -> dict[str, float]:
        out["actor/lr"] = float(self.optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            out["actor/param_norm"] = float(_full(torch.nn.utils.get_total_norm(self.trainable)))
        return out

    # ------------------------------------------------------------ DiffusionNFT
    @torch.no_grad()
    def _nft_prepare(
        self, batch: dict[str, torch.Tensor], rows: np.ndarray, micro: int, steps: int, generator: torch.Generator
    ) -> None:
        """One pass's forward-process draws and the old policy's estimates: per sample ``steps`` distinct noise
        levels of its sampling schedule (``batch['sigmas']``, (N, S)) and noise, ``x_t = (1 - t) x0 + t eps``
        (``nft_x_t``, (N, steps, *latent), host), and the old (sampling) weights' data estimate ``x_t - t v_old``
        at each (``nft_x0_old``), computed with the old weights swapped in, micro-batched as the update."""
        x0 = batch["latents"][:, -1].float()
        schedule = batch["sigmas"].float()
        index = draw_timesteps(x0.shape[0], schedule.shape[1], steps, generator)
        sigmas = torch.gather(schedule, 1, index)
        eps = torch.randn((x0.shape[0], steps, *x0.shape[1:]), generator=generator, dtype=torch.float32)
        t = sigmas.reshape(*sigmas.shape, *([1] * (x0.ndim - 1)))
        batch["nft_sigmas"] = sigmas
        batch["nft_x_t"] = (1.0 - t) * x0[:, None] + t * eps
        x0_old = torch.zeros_like(batch["nft_x_t"])
        with self.nft_old.swapped_in():
            for start in range(0, len(rows), micro):
                idx = torch.as_tensor(rows[start : start + micro])
                for j in range(steps):
                    x0_old[idx, j] = self._x0_estimate(self.model, batch, idx, j).float().cpu()
        batch["nft_x0_old"] = x0_old

    def _x0_estimate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], idx: torch.Tensor, j: int):
        """``x_t - t v`` of ``model`` at rows ``idx``' ``j``-th draw: the family's trainer binding with a CPS step to
        ``s_next = 0``, whose mean is exactly that estimate (``x0 (1 - 0) + x1 * 0``), as the replicas' velocity
        (no CFG negative: DiffusionNFT is CFG-free)."""
        dev = self.device
        x_t = batch["nft_x_t"][idx, j].to(dev)
        sigmas = batch["nft_sigmas"][idx, j].to(dev)
        args = {
            "latents": x_t,
            "next_latents": x_t,
            "sigmas": sigmas,
            "sigmas_next": torch.zeros_like(sigmas),
            "conditioning": self._bundle(batch, CONDITIONING_INDEX, idx),
            "negative_conditioning": None,
            "guidance_scale": self.guidance_scale,
            "noise_level": self.noise_level,
            "sde_type": "cps",
            "detach_uncond": self.cfg_detach_uncond,
            "dtype": self.compute_dtype,
        }
        return self._compute_log_prob(model, args)[1]

    def _nft_loss_at_step(
        self, batch: dict[str, torch.Tensor], idx: torch.Tensor, j: int
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        """DiffusionNFT's loss of rows ``idx`` at their ``j``-th draw (:func:`nft_loss`), with the reference's
        estimate when the KL term is on."""
        x0_theta = self._x0_estimate(self.model, batch, idx, j)
        x0_ref = None
        if self.beta > 0:
            with torch.no_grad(), self._reference():
                ref_model = self.ref_model if self.ref_model is not None else self.model
                x0_ref = self._x0_estimate(ref_model, batch, idx, j)
        r = optimality_probability(batch["advantages"][idx].to(self.device).float(), self.nft_options.reward_norm)
        return nft_loss(
            x0_theta,
            batch["nft_x0_old"][idx, j].to(self.device),
            batch["latents"][idx, -1].to(self.device).float(),
            batch["nft_sigmas"][idx, j].to(self.device),
            r,
            beta=self.nft_options.beta,
            reward_norm=self.nft_options.reward_norm,
            x0_ref=x0_ref,
            kl_coef=self.beta,
        )

    def _nft_finish(
        self, batch: dict[str, torch.Tensor], nft_rows: dict[str, list[dict[str, torch.Tensor]]]
    ) -> dict[str, float]:
        """The update's DiffusionNFT metrics, then the old policy's soft update (after ``k`` optimizer steps in all,
        decay ``d(k)``). ``actor/nft_old_dev_max_first``: the largest ``|v_theta - v_old|`` before this update's
        first optimizer step, i.e. how far the sampling policy lags the trained one (0 when the last decay was 0;
        bit for bit under batch-invariant mode); ``_max`` over the whole update; ``_rms`` its root mean square."""
        out: dict[str, float] = {}
        every = nft_rows["first"] + nft_rows["later"]
        if nft_rows["first"]:
            out["actor/nft_old_dev_max_first"] = float(torch.cat([r["old_dev_max"] for r in nft_rows["first"]]).max())
        if every:
            out["actor/nft_old_dev_max"] = float(torch.cat([r["old_dev_max"] for r in every]).max())
            out["actor/nft_old_dev_rms"] = float(torch.cat([r["old_dev_sq"] for r in every]).double().mean().sqrt())
        advantages = batch["advantages"].float()
        out["actor/nft_r_saturated"] = float((advantages.abs() >= self.nft_options.reward_norm).float().mean())
        options = self.nft_options
        decay = old_policy_decay(
            self._optimizer_steps, options.old_decay_flat, options.old_decay_rate, options.old_decay_max
        )
        self.nft_old.soft_update(decay)
        out["actor/nft_old_decay"] = decay
        for key in ("nft_x_t", "nft_x0_old", "nft_sigmas"):
            batch.pop(key, None)
        return out

    def _loss_at_step(
        self, batch: dict[str, torch.Tensor], idx: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Loss and metrics of rows ``idx`` at trained step ``t``, their detached log-ratio as the loss clips it, the
        log-ratios to report per step (``ratio``: the plain one; with GRPO-Guard also ``guard_ratio``) and, for
        re-centred rows, how far this policy's means moved from the sampler's (:func:`_mean_shift`; else None)."""
        step_args = self._step_args(batch, idx, t)
        if NOISE in batch:  # re-centred on this policy's means (actor.recentre_stale): no stale part in the score
            step_args["noise"] = batch[NOISE][idx, t].to(self.device)
        log_prob, mean, std_dev = self._compute_log_prob(self.model, step_args)
        ref_mean = None
        if self.beta > 0:
            with torch.no_grad(), self._reference():
                ref_model = self.ref_model if self.ref_model is not None else self.model
                _, ref_mean, _ = self._compute_log_prob(ref_model, step_args)
        old_log_prob = batch["old_log_probs"][idx, t].to(self.device)
        log_ratios = {"ratio": (log_prob - old_log_prob).detach()}
        shift = None
        if NOISE in batch:
            shift = _mean_shift(mean, std_dev, step_args["noise"], step_args["next_latents"])
        if self.guard:
            old_mean = batch["old_means"][idx, t].to(self.device)
            log_prob = guard_log_prob(log_prob, old_log_prob, mean, old_mean, std_dev)
            log_ratios["guard_ratio"] = (log_prob - old_log_prob).detach()
        is_weights = None
        if self.rollout_is_threshold is not None and "rollout_log_probs" in batch:
            rollout_log_prob = batch["rollout_log_probs"][idx, t].to(self.device)
            is_weights = truncated_is_weights(old_log_prob, rollout_log_prob, self.rollout_is_threshold)
        loss, metrics = flowgrpo_policy_loss(
            log_prob=log_prob,
            old_log_prob=old_log_prob,
            advantages=batch["advantages"][idx].to(self.device),
            clip_range=self.clip_range,
            prev_sample_mean=mean,
            ref_prev_sample_mean=ref_mean,
            kl_std=kl_std(self.kl_form, step_args["sigmas"], step_args["sigmas_next"], self.noise_level, self.sde_type),
            beta=self.beta,
            is_weights=is_weights,
        )
        return loss, metrics, (log_prob - old_log_prob).detach(), log_ratios, shift

    @torch.no_grad()
    def _old_means(self, batch: dict[str, torch.Tensor], rows: np.ndarray, micro: int) -> torch.Tensor:
        """GRPO-Guard: every stored transition's mean under the weights before this update (those that sampled it,
        in ``sync`` mode), ``(N, T, *latent)`` on the host; micro-batches as the update's, so bit-exact with it."""
        steps = batch["old_log_probs"].shape[1]
        latents = batch["latents"]
        means = torch.zeros((latents.shape[0], steps, *latents.shape[2:]), dtype=torch.float32)
        for start in range(0, len(rows), micro):
            idx = torch.as_tensor(rows[start : start + micro])
            for t in range(steps):
                means[idx, t] = self._compute_log_prob(self.model, self._step_args(batch, idx, t))[1].float().cpu()
        return means

    def _policy_log_prob(self, batch: dict[str, torch.Tensor]) -> LogProbFn:
        """``(rows, t) -> log_prob``: the current policy's log-prob of stored transitions, as the update computes it."""

        def log_prob(idx: torch.Tensor, t: int) -> torch.Tensor:
            return self._compute_log_prob(self.model, self._step_args(batch, idx, t))[0]

        return log_prob

    def _bundle(self, batch: dict[str, torch.Tensor], key: str, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Rows ``idx``' conditioning bundle (``key``: the positive or negative index) expanded from the table."""
        found = expand(self._table, batch[key][idx])
        return None if found is None else {k: v.to(self.device) for k, v in found.items()}

    def _step_args(self, batch: dict[str, torch.Tensor], idx: torch.Tensor, t: int) -> dict[str, Any]:
        """The model's ``compute_log_prob`` arguments for rows ``idx`` at trained step ``t``, on the device: step ``t``
        moves ``latents[:, t]`` to ``latents[:, t + 1]``; the conditioning is expanded from the table here."""
        dev = self.device

        def bundle(key: str) -> dict[str, torch.Tensor] | None:
            return self._bundle(batch, key, idx)

        return {
            "latents": batch["latents"][idx, t].to(dev),
            "next_latents": batch["latents"][idx, t + 1].to(dev),
            "sigmas": batch["sigmas"][idx, t].to(dev),
            "sigmas_next": batch["sigmas"][idx, t + 1].to(dev),
            "conditioning": bundle(CONDITIONING_INDEX),
            "negative_conditioning": bundle(NEGATIVE_CONDITIONING_INDEX) if self.guidance_scale > 1.0 else None,
            "guidance_scale": self.guidance_scale,
            "noise_level": self.noise_level,
            "sde_type": self.sde_type,
            "detach_uncond": self.cfg_detach_uncond,
            "dtype": self.compute_dtype,
        }

    def _compute_log_prob(self, model: torch.nn.Module, step_args: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """``compute_log_prob`` as the replicas sampled: in chunks of exactly ``chunk_size`` rows (the last padded
        by repeating a real row; padded outputs are dropped, so they get no gradient and no metric), on CPU
        without oneDNN and with the replicas' thread count, under batch-invariant mode; on the whole micro-batch
        otherwise."""
        # every per-row tensor, the conditioning bundles' included, is chunked alike
        flat: dict[tuple[str, str | None], torch.Tensor | None] = {}
        params = {}
        for key, value in step_args.items():
            if isinstance(value, dict):
                flat.update({(key, name): tensor for name, tensor in value.items()})
            elif value is None or isinstance(value, torch.Tensor):
                flat[(key, None)] = value
            else:
                params[key] = value
        names = list(flat)

        def call(*rows: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            args: dict[str, Any] = {}
            for (key, name), row in zip(names, rows, strict=True):
                if name is None:
                    args[key] = row
                else:
                    args.setdefault(key, {})[name] = row
            return self.compute_log_prob(model, **args, **params)

        with onednn(enabled=self.use_onednn), torch_threads(self.recompute_threads):
            return map_chunks(call, list(flat.values()), self.chunk_size)

    def _reference(self):
        """With LoRA the reference is the base model: the same module with adapters disabled."""
        if self.lora_config is None:
            return nullcontext()
        model = self.model

        class _Disabled:
            def __enter__(self):
                model.disable_adapters()

            def __exit__(self, *exc):
                model.enable_adapters()

        return _Disabled()

    def _step(self) -> float:
        # Under FSDP the gradients are already averaged and sharded; the norm is reduced over ranks.
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip))
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self._optimizer_steps += 1
            if self.ema is not None:
                self.ema.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # --------------------------------------------------------- weights, state
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def put_rollout_weights(self, ema: bool = False, trained: bool = False) -> dict[str, ray.ObjectRef] | None:
        """What the rollout replicas load, put into Ray's object store by this worker: the LoRA adapter (with its
        config) or the full state dict, as ``update_weights`` keyword -> ``ObjectRef``.

        The worker puts the tensors itself and the driver only passes the refs on (Ray resolves a top-level ref
        argument in each replica), so the weights never pass through the driver: for full fine-tuning of a large
        transformer that is gigabytes per step. The objects live while someone holds a ref.

        The full state dict holds parameters only: buffers are not trained, the replicas loaded them from the same
        model files in their own dtype, and this copy's are cast to the compute dtype (see ``precision``).

        ``ema=True``: the EMA weights instead of the trained ones (validation samples with them); an error when
        ``actor.ema.enable`` is off. DiffusionNFT's rollouts sample with its old policy: by default its weights go
        out, ``trained=True`` the trained ones (its validation). Every rank takes part in gathering the shards;
        rank 0 puts the full tensors and returns the refs, the others None.
        """
        if ema and self.ema is None:
            raise ValueError("put_rollout_weights(ema=True) but actor_rollout_ref.actor.ema.enable is false")
        lora = self.lora_config is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
        swapped = self.ema if ema else (self.nft_old if not trained else None)
        with swapped.swapped_in() if swapped is not None else nullcontext():
            state = get_model_state_dict(self.model, options=options)
            if swapped is not None:  # on one CPU rank the state dict aliases the parameters, which get theirs back
                state = {k: v.clone() for k, v in state.items()}
        if self.rank != 0:
            return None
        if lora:
            from peft.utils import get_peft_model_state_dict

            weights = {
                "lora_state_dict": get_peft_model_state_dict(self.model, state_dict=state),
                "lora_config": dict(self.lora_config),
            }
        else:
            weights = {"state_dict": {k: v for k, v in state.items() if k not in self.buffer_names}}
        return {key: ray.put(value) for key, value in weights.items()}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def state_dict(self) -> dict[str, Any] | None:
        """Trainable weights and optimizer state, gathered to full tensors (rank 0's; the others None).

        Full (unsharded) tensors keyed by parameter name, so a checkpoint resumes on any number of ranks.
        """
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights, optimizer = get_state_dict(self.model, self.optimizer, options=options)
        ema = self.ema.state_dict() if self.ema is not None else None  # a collective under FSDP: every rank
        nft_old = self.nft_old.state_dict() if self.nft_old is not None else None
        if self.rank != 0:
            return None
        trainable = {k: v for k, v in weights.items() if k in self.trainable_names}  # buffers come from the model files
        return {
            "trainable": trainable,
            "optimizer": optimizer,
            "update_calls": self._update_calls,
            "optimizer_steps": self._optimizer_steps,
            "ema": ema,
            "nft_old": nft_old,
        }

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(state["trainable"]) - self.trainable_names)
        if missing:
            raise ValueError(f"checkpoint has trainable parameters this model does not: {missing[:5]}")
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["trainable"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        self._update_calls = int(state.get("update_calls", 0))
        self._optimizer_steps = int(state.get("optimizer_steps", 0))
        if self.nft_old is not None:
            if state.get("nft_old") is None:
                raise ValueError(
                    "algorithm.name='diffusion_nft' but the checkpoint has no old-policy weights (saved by another "
                    "algorithm); start a new run"
                )
            self.nft_old.load_state_dict(state["nft_old"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(
                    "actor_rollout_ref.actor.ema.enable is true but the checkpoint has no EMA weights (saved with EMA "
                    "off); resume with ema.enable=false or start a new run"
                )
            self.ema.load_state_dict(state["ema"])


@torch.no_grad()
def _mean_shift(
    mean: torch.Tensor, std_dev: torch.Tensor, noise: torch.Tensor, next_latents: torch.Tensor
) -> torch.Tensor:
    """Per row, ``(max, mean of squares)`` over elements of ``(mu_theta - mu_old) / std_dev``: how far this policy's
    transition means moved from the sampler's (``mu_old = next_latents - std_dev * noise``) in units of the step's
    noise; the re-centring moves each stale sample by this much. Steps without noise (CPS's last) count 0."""
    noisy = std_dev > 0
    safe = torch.where(noisy, std_dev, torch.ones_like(std_dev))
    shift = torch.where(noisy, (mean.float() - (next_latents.float() - std_dev * noise.float())) / safe, 0.0)
    flat = shift.flatten(1)
    return torch.stack([flat.abs().amax(dim=1), flat.square().mean(dim=1)], dim=1).cpu()


def _full(value: torch.Tensor) -> torch.Tensor:
    """A reduced value (grad or param norm) as a plain tensor; under FSDP it is a replicated DTensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds."""
    return param.to_local() if isinstance(param, DTensor) else param
