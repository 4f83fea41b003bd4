"""Schema of how the FlowGRPO actor shards its transformer: ``actor_rollout_ref.actor.strategy`` and ``fsdp_config``.

Key names follow verl's actor config (``strategy``, ``fsdp_config.mixed_precision``, ``reshard_after_forward``,
``wrap_policy.transformer_layer_cls_to_wrap``); only what a diffusion transformer needs is read.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import Field

from verl_omni.workers.config.schema import Section, option, section

ACTOR_PREFIX = "actor_rollout_ref.actor"
# fp16 would need a gradient scaler; FlowGRPO trains in bf16 or fp32.
FSDPDtype = Literal["float32", "bfloat16"]
_DTYPE_WHY = "is not a valid dtype; valid choices: {choices}"


@section(ACTOR_PREFIX)
class ActorFSDPConfig(Section):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) settings of the training ranks.

    With one rank the transformer is not wrapped at all; with several, parameters, gradients and
    optimizer state are sharded over the ranks and gradients are averaged (data parallel).

    Args:
        strategy: ``fsdp2``; verl's ``fsdp`` (FSDP1) and ``megatron`` are not supported for diffusion.
        param_dtype: compute dtype of forward and backward (``MixedPrecisionPolicy``); the sharded
            master weights and the optimizer state stay float32.
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3 memory)
            instead of keeping them for the backward (less communication).
        wrap_modules: module class names sharded as separate FSDP units; null = the model's
            ``_no_split_modules`` (``JointTransformerBlock`` for SD3).
    """

    _target_: str = "verl_omni.workers.config.actor_fsdp.ActorFSDPConfig"
    # Where each field sits in the ``actor`` section (verl's key names).
    KEYS: ClassVar[dict[str, str]] = {
        "param_dtype": "fsdp_config.mixed_precision.param_dtype",
        "reduce_dtype": "fsdp_config.mixed_precision.reduce_dtype",
        "reshard_after_forward": "fsdp_config.reshard_after_forward",
        "wrap_modules": "fsdp_config.wrap_policy.transformer_layer_cls_to_wrap",
    }

    strategy: Literal["fsdp2"] = option(
        "fsdp2", why="is not supported for diffusion training; valid choices: {choices}"
    )
    param_dtype: FSDPDtype = option("float32", why=_DTYPE_WHY)
    reduce_dtype: FSDPDtype = option("float32", why=_DTYPE_WHY)
    reshard_after_forward: bool = True
    wrap_modules: list[Annotated[str, Field(min_length=1)]] | None = option(
        None, why="must be a list of module class names or null"
    )

    @classmethod
    def from_actor_config(cls, actor: Any) -> ActorFSDPConfig:
        """Read ``strategy`` and ``fsdp_config`` from the ``actor_rollout_ref.actor`` section."""
        if isinstance(actor, DictConfig):
            actor = OmegaConf.to_container(actor, resolve=True)
        actor = dict(actor or {})
        fsdp = dict(actor.get("fsdp_config") or {})
        mixed = dict(fsdp.get("mixed_precision") or {})
        wrap = (fsdp.get("wrap_policy") or {}).get("transformer_layer_cls_to_wrap")
        if isinstance(wrap, str):
            wrap = [wrap]
        return cls(
            strategy=actor.get("strategy", "fsdp2"),
            param_dtype=mixed.get("param_dtype", "float32"),
            reduce_dtype=mixed.get("reduce_dtype", "float32"),
            reshard_after_forward=fsdp.get("reshard_after_forward", True),
            wrap_modules=None if wrap is None else list(wrap),
        )

    def mp_policy(self) -> Any:
        """The FSDP2 ``MixedPrecisionPolicy`` these dtypes describe.

        ``cast_forward_inputs`` is off: the actor casts the transformer's inputs itself, exactly as the rollout
        does (latents and text conditioning to ``param_dtype``, the timestep kept float32); FSDP2's cast would
        round the timestep to bf16 and make the trainer compute another function than the sampler.
        """
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(
            param_dtype=getattr(torch, self.param_dtype),
            reduce_dtype=getattr(torch, self.reduce_dtype),
            cast_forward_inputs=False,
        )


def check_training_split(rollout_batch: int, mini_batch: int, world_size: int, on_gpu: bool = True) -> None:
    """Every rank must run the same number of forward/backward passes (each is a collective under FSDP).

    ``on_gpu`` only picks the keys the message names: GPU ranks per node, or CPU ranks per node.
    """
    if rollout_batch % world_size:
        per_node = "trainer.n_gpus_per_node" if on_gpu else "trainer.cpu_ranks_per_node"
        raise ValueError(
            f"the rollout batch (data.train_batch_size x rollout.n = {rollout_batch}) must divide evenly over "
            f"the {world_size} training ranks ({per_node} x trainer.nnodes)"
        )
    if mini_batch % world_size:
        raise ValueError(
            f"{ACTOR_PREFIX}.ppo_mini_batch_size={mini_batch} must be a multiple of the {world_size} training ranks"
        )
