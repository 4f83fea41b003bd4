"""The FlowGRPO training loop: rollout through routed replicas, group advantages, policy update, weight sync,
and periodic validation of the current policy on fixed prompts and seeds."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from verl.protocol import DataProto
from verl.utils.tracking import Tracking

from verl_omni.protocol import CONDITIONING, NOISE, TRAIN_KEYS, compact
from verl_omni.trainer.flowgrpo.advantages import compute_group_advantages, group_reward_stats, nonzero_advantage_rows
from verl_omni.trainer.flowgrpo.preemption import GracefulStop
from verl_omni.trainer.flowgrpo.rollout_batch import ROW_SAMPLING_PARAMS, rollout_rows
from verl_omni.trainer.flowgrpo.sde_windows import window_metrics, window_schedule
from verl_omni.trainer.flowgrpo.trained_steps import trained_step_count
from verl_omni.utils.arrays import object_column
from verl_omni.utils.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from verl_omni.utils.heartbeat import Heartbeat
from verl_omni.utils.payload_bytes import held_bytes
from verl_omni.utils.visualize import save_reward_curve, save_sample_grid
from verl_omni.workers.config.training import TrainingSections

if TYPE_CHECKING:
    from verl_omni.utils.startup import StartupClock
from verl_omni.workers.rollout.replica_pool import RolloutReplicaPool

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# The validation grid shows the first rows only: the same ones at every validation, and a bounded PNG on a large
# test set (64 tiles of 512 px are about 4k x 4k pixels).
_VAL_GRID_MAX_IMAGES = 64


class OffPolicyBatchError(RuntimeError):
    """A rollout sample was produced by weights other than the current policy's."""


class FlowGRPOTrainer:
    """Drives one FlowGRPO run; the heavy parts live in Ray actors (replicas, agent-loop workers, actor).

    Args:
        config: the recipe config (verl key names).
        batcher: yields each step's prompts (``PromptBatch``), a pure function of the step.
        agent_loop_manager: ``OmniAgentLoopManager``: returns images, trajectories, rewards, routing metrics.
        actor_wg: ``RayWorkerGroup`` of ``DiffusionActorWorker``.
        replicas: the rollout replicas (``server_manager.get_replicas()``) that receive new weights; a replica
            whose server dies is replaced (``RolloutReplicaPool``).
        run_dir: where samples, curves, metrics and checkpoints go.
        sections: the typed ``diffusion`` and ``algorithm`` sections as the driver parsed them (which steps are
            trained, the SDE windows).
        validation: the fixed validation rows (``ValidationBatches``: ``batches()`` and ``n``); None = never
            validate. When to validate comes from ``trainer.test_freq`` and ``trainer.val_before_train``.
        load_balancer: the clients' balancer actor, where a replacement replica is registered.

    ``startup``: the launcher's :class:`~verl_omni.utils.startup.StartupClock`, if any: its breakdown is printed
    and logged (``timing_s/startup/*``) with this process's first step.
    """

    def __init__(
        self,
        config: DictConfig,
        batcher: Any,
        agent_loop_manager: Any,
        actor_wg: Any,
        replicas: list[Any],
        run_dir: str | os.PathLike,
        sections: TrainingSections,
        tracker_factory: Callable[[], Tracking] | None = None,
        validation: Any = None,
        load_balancer: Any = None,
    ):
        self.config = config
        self.batcher = batcher
        self.agent_loop_manager = agent_loop_manager
        self.actor_wg = actor_wg
        self.rollout_replicas = RolloutReplicaPool(replicas, load_balancer)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.sample_dir = self.run_dir / "samples"
        self.total_steps = int(config.trainer.total_training_steps)
        self.validation = validation
        self.test_freq = int(config.trainer.get("test_freq", -1) or -1)
        self.val_before_train = bool(config.trainer.get("val_before_train", False))
        actor = config.actor_rollout_ref.get("actor") or {}
        diffusion = sections.diffusion
        self.trained_steps = trained_step_count(
            diffusion.num_inference_steps, diffusion.sde_window, float(actor.get("timestep_fraction", 1.0))
        )
        # Flow-GRPO-Fast / MixGRPO: each request's SDE window (all of it is trained); None: the fixed sde_window
        self.windows = window_schedule(
            sections.algorithm,
            diffusion.num_inference_steps,
            float(actor.get("timestep_fraction", 1.0)),
            diffusion.sde_window,
            diffusion.guidance_scale,
        )
        if self.windows is not None:
            self.trained_steps = self.windows.size
        self.validate_with_ema = bool((actor.get("ema") or {}).get("enable", False))
        self.algorithm = sections.algorithm
        self.num_inference_steps = diffusion.num_inference_steps
        self.validate_swap = self.validate_with_ema or self.nft
        self.clip_range = float(actor.get("clip_ratio", 0.0) or 0.0)
        self.warn_clip_frac_first = float(config.trainer.get("warn_clip_frac_first", 0.05))
        self._warned_off_policy = False
        # a line every progress_interval_s while a phase runs: the step line alone can be minutes apart on CPU
        self.heartbeat = Heartbeat(float(config.trainer.get("progress_interval_s", 60) or 0), write=tqdm.write)
        self.weight_sync_driver_bytes = 0
        # one_step_off: the next step's rollout, sampled in this thread while the current step trains
        self.one_step_off = config.trainer.get("rollout_mode", "sync") == "one_step_off"
        # ... whose stale transitions the actor re-centres on its means, with the noise the rollouts return
        self.recentre_stale = self.one_step_off and bool(actor.get("recentre_stale", True))
        self._rollout_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self._next_rollout: tuple[DataProto, int, float] | None = None
        self.stopped: str | None = None  # why the run stopped before its last step (a stop signal), if it did
        self.version = 0
        self.start_step = 0
        self.history: list[dict[str, float]] = []
        self.val_history: list[dict[str, float]] = []
        self._tracker_factory = tracker_factory or self._default_tracker
        self.startup: StartupClock | None = None

    # ---------------------------------------------------------------- helpers
    def _default_tracker(self) -> Tracking:
        """verl's ``Tracking``; its ``file`` backend writes ``metrics.jsonl``, one line per step across resumes.

        verl's file logger truncates its file, so the lines of the steps before ``start_step`` are carried over
        (from a ``.prev`` copy that survives a crash at this point); steps replayed after the checkpoint are
        logged again, once.
        """
        os.environ.setdefault("TENSORBOARD_DIR", str(self.run_dir / "tensorboard"))
        metrics_file = self.run_dir / METRICS_FILE
        previous = metrics_file.with_name(METRICS_FILE + ".prev")
        if metrics_file.exists() and not previous.exists():
            os.replace(metrics_file, previous)
        kept = _lines_before_step(previous, self.start_step) if previous.exists() else []
        os.environ["VERL_FILE_LOGGER_PATH"] = str(metrics_file)
        tracker = Tracking(
            project_name=self.config.trainer.project_name,
            experiment_name=self.config.trainer.experiment_name,
            default_backend=list(self.config.trainer.logger),
            config=OmegaConf.to_container(self.config, resolve=True),
        )
        file_logger = getattr(tracker, "logger", {}).get("file")
        if file_logger is not None:
            file_logger.fp.write(b"".join(kept))
            os.fsync(file_logger.fp.fileno())
            previous.unlink(missing_ok=True)
        return tracker

    def _resume(self) -> None:
        mode = self.config.trainer.get("resume_mode", "auto")
        if mode == "disable":
            return
        if mode == "resume_path":
            path = self.config.trainer.get("resume_from_path")
            if not path or not Path(path).is_dir():
                raise ValueError(f"trainer.resume_from_path={path!r} is not a checkpoint directory")
            found = (int(Path(path).name.rsplit("_", 1)[-1]), Path(path))
        else:
            found = find_latest_checkpoint(self.ckpt_dir)
        if found is None:
            return
        step, path = found
        state = load_checkpoint(path, weights_only=False)
        self.actor_wg.load_state_dict(state["actor"])
        trainer_state = state["trainer"]
        self.batcher.load_state_dict(trainer_state["batcher"])
        self.start_step = int(trainer_state["step"])
        self.version = int(trainer_state["version"])
        self.history = list(trainer_state["history"])
        self.val_history = list(trainer_state.get("val_history", []))
        self._sync_weights()
        print(f"Resumed from {path} at step {self.start_step} (model version {self.version})")

    def _save(self, step: int) -> None:
        actor_state = self.actor_wg.state_dict()
        state = {
            "actor": actor_state[0] if isinstance(actor_state, list) else actor_state,
            "trainer": {
                "step": step,
                "version": self.version,
                "history": self.history,
                "val_history": self.val_history,
                "batcher": self.batcher.state_dict(),
            },
        }
        keep = self.config.trainer.get("max_actor_ckpt_to_keep")
        save_checkpoint(self.ckpt_dir, step, state, keep_last=keep)

    def _sync_weights(self, ema: bool = False) -> float:
        """Push the sampling policy (or, ``ema=True``, the validation weights) to every rollout replica, replacing
        dead ones. The sampling policy is the trained weights, DiffusionNFT's old policy; the validation weights
        the EMA with ``actor.ema.enable``, else (DiffusionNFT) the trained ones.

        The sampling weights are tagged with ``self.version``, the validation weights with :meth:`_ema_version` so
        such a sample can never pass for an on-policy one. The actor puts the weights into Ray's object store and the
        driver only hands the refs on: ``weight_sync_driver_bytes`` counts what the driver itself held (0).
        """
        start = time.perf_counter()
        if ema and self.nft:
            refs = self.actor_wg.put_rollout_weights(ema=self.validate_with_ema, trained=True)
        else:
            refs = self.actor_wg.put_rollout_weights(ema=ema)
        refs = refs[0] if isinstance(refs, list) else refs
        self.weight_sync_driver_bytes = held_bytes(refs)
        self.rollout_replicas.push(refs, self._ema_version() if ema else self.version)
        return time.perf_counter() - start

    @property
    def replicas(self) -> list[Any]:
        """The rollout replicas serving now (a dead one's replacement included)."""
        return self.rollout_replicas.live

    def _make_batch(self, rows: Any, validate: bool = False) -> DataProto:
        """The rollout request for ``rows`` (a ``PromptBatch``), whose ``step`` and ``base_seed`` seed its rows."""
        tag = f"val{self.version}" if validate else f"step{rows.step}"
        non_tensors = rollout_rows(rows, tag)
        if not validate:
            params: list[dict[str, Any]] = [{} for _ in rows.uids]
            if self.windows is not None:
                for row, uid in zip(params, rows.uids, strict=True):
                    row["sde_window"] = list(self.windows.window(rows.step, uid, rows.base_seed))
            if self.nft:  # every step deterministic and recorded: the clean sample and the schedule
                for row in params:
                    row.update(sde_type="ode", sde_window=[0, self.num_inference_steps])
            if self.recentre_stale:
                for row in params:
                    row["record_noise"] = True
            if any(params):
                non_tensors[ROW_SAMPLING_PARAMS] = object_column(params)
        return DataProto.from_dict(
            non_tensors=non_tensors,
            meta_info={"global_steps": rows.step, "seed": rows.base_seed, "validate": validate},
        )

    @property
    def nft(self) -> bool:
        """DiffusionNFT: rollouts sample every step deterministically with its old policy and record the clean
        sample and the schedule (no log-probs); validation samples with the trained weights (or their EMA)."""
        return self.algorithm.name == "diffusion_nft"

    def _ema_version(self) -> int:
        """The version tag of the EMA weights at policy version ``v``: ``-1 - v`` (never a trained version)."""
        return -1 - self.version

    def _check_on_policy(self, out: DataProto, what: str, expected: int | None = None) -> None:
        expected = self.version if expected is None else expected
        versions = out.batch["model_version"]
        if not bool((versions == expected).all()):
            raise OffPolicyBatchError(
                f"{what}: rollout used model versions {sorted(set(versions.tolist()))}, "
                f"expected version {expected}; refusing an off-policy batch"
            )

    def validates_at(self, step: int) -> bool:
        """Whether to validate the policy after ``step`` updates: verl's schedule (every ``test_freq`` steps and
        after the last one, at step 0 with ``val_before_train``), so a resumed run validates where an
        uninterrupted one does."""
        if self.validation is None:
            return False
        if step == 0:
            return self.val_before_train
        return self.test_freq > 0 and (step % self.test_freq == 0 or step == self.total_steps)

    # ------------------------------------------------------------------- loop
    def fit(self) -> list[dict[str, float]]:
        """Train until ``trainer.total_training_steps``, or until a stop signal (``GracefulStop``: then
        ``stopped`` says why); returns the per-step metric history."""
        self._resume()
        if self.start_step == 0:
            self._sync_weights()
        tracker = self._tracker_factory()
        save_freq = int(self.config.trainer.get("save_freq", -1) or -1)
        print(
            f"Outputs in {self.run_dir}/: samples/ (image grids), reward_curve.png, "
            f"{METRICS_FILE}, tensorboard/, checkpoints/"
        )
        # a bar on a terminal only (disable=None): in a log file the per-step lines say the same
        bar = tqdm(
            range(self.start_step, self.total_steps), initial=self.start_step, total=self.total_steps, disable=None
        )
        bar.set_description("FlowGRPO")
        stop = GracefulStop(float(self.config.trainer.get("preempt_grace_s", 20)), write=tqdm.write)
        with stop:
            try:
                self._loop(bar, tracker, save_freq, stop)
            except KeyboardInterrupt:
                if not stop.expired:  # Ctrl-C twice (or a signal outside the grace logic): the caller reports it
                    raise
                self.stopped = f"{stop.requested}: the step in flight was abandoned after the grace period"
                tqdm.write(f"{self.stopped}; {self._resume_hint()}")
            finally:
                bar.close()
                for backend in getattr(tracker, "logger", {}).values():
                    if hasattr(backend, "finish"):
                        backend.finish()
        self._save_reward_curve()
        return self.history

    def _loop(self, bar: Any, tracker: Any, save_freq: int, stop: GracefulStop) -> None:
        """The steps, each saved when ``save_freq`` says so or when a stop signal came during it."""
        for step in bar:
            # validation of the policy after `step` updates: the one this step's rollout samples from
            startup = self._startup_metrics() if step == self.start_step else {}
            val_metrics = self._validate(step) if self.validates_at(step) else {}
            metrics = self._train_step(step)
            self.history.append({"step": step, **metrics})
            tracker.log(data={**metrics, **val_metrics, **startup}, step=step)
            tqdm.write(self._console_line(step, metrics, val_metrics))
            self._warn_off_policy(step, metrics)
            done = step + 1
            if stop.requested or (save_freq > 0 and (done % save_freq == 0 or done == self.total_steps)):
                self._save(done)
            if stop.requested:
                self.stopped = f"{stop.requested}: stopped after step {done} of {self.total_steps}"
                tqdm.write(f"{self.stopped}, checkpoint written; {self._resume_hint()}")
                return
        if self.start_step < self.total_steps and self.validates_at(self.total_steps):
            val_metrics = self._validate(self.total_steps)
            tracker.log(data=val_metrics, step=self.total_steps)
            tqdm.write(f"validation after step {self.total_steps}: val {val_metrics['val/reward/mean']:.3f}")

    def _startup_metrics(self) -> dict[str, float]:
        """The start-up breakdown up to now (this process's first step): printed once and logged with the step."""
        if self.startup is None:
            return {}
        first_step_at = self.startup.now()
        tqdm.write(self.startup.line(first_step_at))
        return self.startup.metrics(first_step_at)

    def _resume_hint(self) -> str:
        found = find_latest_checkpoint(self.ckpt_dir)
        newest = f"the newest checkpoint is {found[1]}" if found else "no checkpoint was written yet"
        return f"{newest}; run the same command to resume"

    def _rollout(self, step: int) -> tuple[DataProto, int, float]:
        """Step ``step``'s rollout with the weights the replicas hold now: the batch, their version, the seconds."""
        start, version = time.perf_counter(), self.version
        request = self._make_batch(self.batcher.batch(step))
        with self.heartbeat.phase(f"step {step + 1}: rollout of {len(request)} samples"):
            out = self.agent_loop_manager.generate_sequences(request)
        return out, version, time.perf_counter() - start

    def _train_step(self, step: int) -> dict[str, float]:
        """One step. ``sync``: sample with the current policy, train, push the weights. ``one_step_off``: train on
        the samples drawn during the previous step (one version behind) while the next step's rollout samples with
        the weights the replicas hold; the new weights go out once that rollout is back."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if self._next_rollout is not None:
            out, sampled_with, timings["timing_s/rollout"] = self._next_rollout
            self._next_rollout = None
        else:  # sync mode, or the first step of one_step_off
            out, sampled_with, timings["timing_s/rollout"] = self._rollout(step)
        self._check_on_policy(out, f"step {step}", sampled_with)
        ahead = None
        if self.one_step_off and step + 1 < self.total_steps:
            ahead = self._rollout_thread.submit(self._rollout, step + 1)
        rewards = out.batch["rewards"].float()
        uids = list(out.non_tensor_batch["uid"])
        advantages = compute_group_advantages(
            rewards,
            uids,
            global_std=self.algorithm.global_std,
            clip_max=self.algorithm.adv_clip_max,
        )
        out.batch["advantages"] = advantages

        sample_freq = int(self.config.trainer.get("sample_freq", -1) or -1)
        if sample_freq > 0 and ((step + 1) % sample_freq == 0 or step == 0 or step + 1 == self.total_steps):
            self._save_samples(step, out)

        t1 = time.perf_counter()
        train_batch, kept_fraction = self._training_batch(out, rewards, uids)
        actor_metrics: dict[str, float] = {}
        if train_batch is not None:  # else every advantage was 0: nothing to learn from this step
            with self.heartbeat.phase(f"step {step + 1}: policy update on {len(train_batch)} samples"):
                actor_metrics = self.actor_wg.update_policy(train_batch)
            actor_metrics = _mean_dicts(actor_metrics if isinstance(actor_metrics, list) else [actor_metrics])
        timings["timing_s/update"] = time.perf_counter() - t1
        if ahead is not None:  # the weights change only once the rollout sampling with them is back
            t2 = time.perf_counter()
            self._next_rollout = ahead.result()
            timings["timing_s/rollout_wait"] = time.perf_counter() - t2
        self.version += 1
        with self.heartbeat.phase(f"step {step + 1}: weight sync"):
            timings["timing_s/weight_sync"] = self._sync_weights()
        timings["timing_s/step"] = time.perf_counter() - t0

        metrics: dict[str, float] = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std(unbiased=False)),
            "reward/max": float(rewards.max()),
            "reward/min": float(rewards.min()),
            "advantages/abs_mean": float(advantages.abs().mean()),
            "advantages/kept_fraction": kept_fraction,
            "actor/trained_steps": float(self.trained_steps),
            "rollout/model_version": float(sampled_with),
            "rollout/staleness": float(self.version - 1 - sampled_with),  # versions behind the policy it trained
            **_video_shape(out.batch["image"]),
            **self.rollout_replicas.metrics(),
            "weight_sync/driver_bytes": float(self.weight_sync_driver_bytes),
            **_reward_term_means(out, "reward"),
            **{f"reward/{k}": float(v) for k, v in group_reward_stats(rewards, uids).items()},
            **actor_metrics,
            **timings,
        }
        for key, value in (out.meta_info.get("metrics") or {}).items():
            metrics[key] = float(value)
        if self.windows is not None:
            metrics.update(window_metrics([p["sde_window"] for p in out.non_tensor_batch[ROW_SAMPLING_PARAMS]]))
        if "reward_s" in out.non_tensor_batch:
            metrics["timing_s/reward_mean_per_sample"] = float(np.mean(out.non_tensor_batch["reward_s"]))
        return metrics

    def _training_batch(self, out: DataProto, rewards: torch.Tensor, uids: list[str]) -> tuple[DataProto | None, float]:
        """The rows and steps the update trains on, and the kept share of the samples.

        Steps: the first ``trained_steps`` recorded ones (``timestep_fraction``); DiffusionNFT keeps the clean sample
        (the last latents) and the ``N`` noise levels of the schedule it draws from, and no log-probs. Rows: with
        ``algorithm.drop_zero_advantage``, those whose advantage is not 0 (per sample, as the reference trainer);
        every training rank must run the same number of passes, so the first dropped rows (advantage exactly 0,
        no policy-gradient signal) top the count up to the next multiple of the ranks. None when no row is left.
        """
        present = set(out.batch.keys())
        keys = [k for k in (*TRAIN_KEYS, NOISE) if k in present and not (self.nft and k == "log_probs")]
        batch = out.select(batch_keys=keys, meta_info_keys=[CONDITIONING])
        if self.nft:
            batch.batch["latents"] = batch.batch["latents"][:, -1:].contiguous()
            batch.batch["sigmas"] = batch.batch["sigmas"][:, :-1].contiguous()  # the N levels, not the final 0
        else:
            k = self.trained_steps  # step t moves latents[:, t] to latents[:, t + 1]
            for key in ("log_probs", NOISE):
                if key in present:
                    batch.batch[key] = batch.batch[key][:, :k].contiguous()
            for key in ("latents", "sigmas"):
                batch.batch[key] = batch.batch[key][:, : k + 1].contiguous()
        if not self.algorithm.drops_zero_advantage:
            return compact(batch), 1.0
        keep = nonzero_advantage_rows(rewards, uids)
        kept = int(keep.sum())
        if kept == 0:
            return None, 0.0
        top_up = (~keep).nonzero().flatten()[: -kept % int(self.actor_wg.world_size)]
        keep[top_up] = True
        return compact(batch.select_idxs(keep)), kept / len(keep)

    def _console_line(self, step: int, metrics: dict[str, float], val_metrics: dict[str, float]) -> str:
        """One short line per step; every metric is in the tracker (jsonl, tensorboard).

        ``val`` (when validated at this step) scores the policy this step's rollout sampled from.
        ``ratio_dev`` is max |ratio - 1| before the first update: 0 when training is exactly on-policy; when it
        exceeds the clip range the line says so (those rows start clipped). ``clip_first`` is the clip fraction of
        that first inner step, ``clip`` the mean over all inner steps. DiffusionNFT has no ratio: ``nft_dev_first``
        is max |v_theta - v_old| before the first update (0 while the old policy is the trained one). ``shift``
        (re-centred ``one_step_off`` steps) is the rms distance, in noise stds, the stale transitions were moved.
        """
        width = len(str(self.total_steps))
        parts = [f"step {step + 1:>{width}}/{self.total_steps}", f"reward {metrics['reward/mean']:.3f}"]
        if val_metrics:
            parts.append(f"val {val_metrics['val/reward/mean']:.3f}")
        parts += [
            f"kl {metrics.get('actor/kl', 0.0):.1e}",
            f"clip_first {metrics.get('actor/clip_frac_first', 0.0):.2f}",
            f"clip {metrics.get('actor/clip_frac', 0.0):.2f}",
        ]
        if self.nft:
            parts[-2:] = [f"nft_dev_first {metrics.get('actor/nft_old_dev_max_first', float('nan')):.1e}"]
        else:
            parts.append(f"ratio_dev {metrics.get('actor/ratio_max_abs_dev', float('nan')):.1e}")
        if metrics.get("actor/ratio_max_abs_dev", 0.0) > self.clip_range > 0:
            parts[-1] += f" > clip_ratio {self.clip_range:.1e}"
        if "actor/recentre_shift_rms" in metrics:
            parts.append(f"shift {metrics['actor/recentre_shift_rms']:.3f}")
        parts.append(f"{metrics['timing_s/step']:.2f}s")
        return "  ".join(parts)

    def _warn_off_policy(self, step: int, metrics: dict[str, float]) -> None:
        """One warning line, the first time the first inner step clips more than ``trainer.warn_clip_frac_first``
        of its rows: with the weights unchanged the ratio should be 1, so the rollout and the trainer disagree."""
        clip_first = metrics.get("actor/clip_frac_first")
        if self._warned_off_policy or clip_first is None or clip_first <= self.warn_clip_frac_first:
            return
        self._warned_off_policy = True
        dev = metrics.get("actor/ratio_max_abs_dev", float("nan"))
        tqdm.write(
            f"WARNING step {step + 1}: the first inner step clipped {clip_first:.0%} of its rows before any update "
            f"(actor/clip_frac_first > trainer.warn_clip_frac_first={self.warn_clip_frac_first:g}; "
            f"actor/ratio_max_abs_dev={dev:.1e}, clip_ratio={self.clip_range:g}): the rollout's log-probs are not "
            "the trainer's. Give the rollout and the trainer the same dtype, or set "
            "actor_rollout_ref.actor.recompute_old_log_prob=true (see docs/advanced_features/determinism.md)"
        )

    def _validate(self, step: int) -> dict[str, float]:
        """Sample every validation row with the current policy, the ``diffusion_val`` overrides and the fixed
        validation seeds; returns the ``val/*`` metrics and saves the image grid.

        Never updates the policy and leaves the training data order and seeds alone, so a run with validation
        trains exactly as one without. With ``actor.ema.enable`` the replicas sample with the EMA weights, then get
        the trained ones back.
        """
        start = time.perf_counter()
        outs = []
        if self.validate_swap:
            self._sync_weights(ema=True)
        try:
            for rows in self.validation.batches():
                with self.heartbeat.phase(f"validation after {step} updates: {len(rows)} samples"):
                    out = self.agent_loop_manager.generate_sequences(self._make_batch(rows, validate=True))
                expected = self._ema_version() if self.validate_swap else self.version
                self._check_on_policy(out, f"validation after step {step}", expected)
                outs.append(out)
        finally:
            if self.validate_swap:
                self._sync_weights()
        out = DataProto.concat(outs)
        reward = out.batch["rewards"].float()
        prompts, uids = list(out.non_tensor_batch["prompt"]), list(out.non_tensor_batch["uid"])
        metrics = {
            "val/reward/mean": float(reward.mean()),
            "val/reward/std": float(reward.std(unbiased=False)),
            **_reward_term_means(out, "val/reward"),
        }
        n = int(self.validation.n)
        if n > 1:
            metrics["val/reward/group_std_mean"] = group_reward_stats(reward, uids)["group_std_mean"]
        shown = min(len(reward), _VAL_GRID_MAX_IMAGES)
        captions = [f"{p[:40]} | r={float(r):.2f}" for p, r in zip(prompts[:shown], reward[:shown], strict=True)]
        save_sample_grid(
            out.batch["image"][:shown],
            self.sample_dir / f"val_step_{step:05d}",
            captions=captions,
            ncols=n if n > 1 else None,
            scale=int(self.config.trainer.get("sample_scale", 2)),
        )
        metrics["val/timing_s"] = time.perf_counter() - start
        self.val_history.append({"step": step, **metrics})
        return metrics

    def _save_samples(self, step: int, out: DataProto) -> None:
        n = int(self.config.actor_rollout_ref.rollout.n)
        images = out.batch["image"]
        rewards = out.batch["rewards"]
        prompts = list(out.non_tensor_batch["prompt"])
        # one row per prompt group: its n samples side by side
        captions = [f"{p[:40]} | r={float(r):.2f}" for p, r in zip(prompts, rewards, strict=True)]
        save_sample_grid(  # PNG; a video family's (B, F, 3, H, W) as an animated WebP
            images,
            self.sample_dir / f"step_{step + 1:05d}",
            captions=captions,
            ncols=n,
            scale=int(self.config.trainer.get("sample_scale", 2)),
        )

    def _save_reward_curve(self) -> None:
        if not self.history:
            return
        steps = [h["step"] + 1 for h in self.history]
        save_reward_curve(
            steps,
            [h["reward/mean"] for h in self.history],
            [h["reward/std"] for h in self.history],
            self.run_dir / "reward_curve.png",
            val_points=[(h["step"], h["val/reward/mean"]) for h in self.val_history],
        )


# Per-rank metrics that are maxima: merged by max over ranks (a mean would hide one rank's deviation).
_MAX_MERGED_METRICS = frozenset(
    {
        "actor/ratio_max_abs_dev",
        "actor/rollout_log_prob_gap_max",
        "actor/rollout_ratio_max_abs_dev",
        "actor/nft_old_dev_max_first",
        "actor/nft_old_dev_max",
    }
)


def _lines_before_step(path: Path, step: int) -> list[bytes]:
    """The JSON lines of ``path`` logged for steps before ``step`` (a torn last line is dropped)."""
    kept = []
    for line in path.read_bytes().splitlines():
        try:
            logged = json.loads(line)
        except ValueError:
            continue
        if isinstance(logged, dict) and isinstance(logged.get("step"), int) and logged["step"] < step:
            kept.append(line + b"\n")
    return kept


def _video_shape(samples: torch.Tensor) -> dict[str, float]:
    """``rollout/video_{frames,height,width}`` of a video family's samples ``(B, F, 3, H, W)``; nothing for images."""
    if samples.ndim != 5:
        return {}
    frames, _, height, width = samples.shape[1:]
    return {f"rollout/video_{k}": float(v) for k, v in (("frames", frames), ("height", height), ("width", width))}


def _reward_term_means(out: DataProto, prefix: str) -> dict[str, float]:
    """``{prefix}/<name>/mean`` of each reward term when the reward has several (``reward.weights``)."""
    terms = [k for k in list(out.batch.keys()) if k.startswith("reward_terms.")]  # a TensorDict iterates values
    if len(terms) < 2:
        return {}
    return {f"{prefix}/{k.split('.', 1)[1]}/mean": float(out.batch[k].float().mean()) for k in terms}


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Merge the training ranks' metric dicts: the mean of each key, the max of those in ``_MAX_MERGED_METRICS``."""
    keys = {k for d in dicts for k in d}
    merged = {}
    for k in sorted(keys):
        values = [d[k] for d in dicts if k in d]
        merged[k] = float(max(values) if k in _MAX_MERGED_METRICS else np.mean(values))
    return merged
