"""Methods verl-omni adds to vllm-omni's diffusion workers (``worker_extension_cls``): full-weight updates.

vllm-omni installs its own ``CustomPipelineWorkerExtension`` (``re_init_pipeline``, which loading a custom pipeline
needs) only when no ``worker_extension_cls`` is given, so this extension subclasses it and keeps it. vllm-omni
reloads LoRA adapters through ``add_lora`` but has no RPC for new base weights; the server calls
``collective_rpc(LOAD_WEIGHTS_METHOD, args=(state_dict,))`` and every worker loads them into its pipeline's
transformer with the pipeline's own ``load_weights`` (which maps diffusers names onto vllm-omni's layers).
Runs inside vllm-omni's worker processes (imports vllm-omni).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from vllm_omni.diffusion.worker.diffusion_worker import CustomPipelineWorkerExtension


class VerlOmniWorkerExtension(CustomPipelineWorkerExtension):
    """Mixed into vllm-omni's diffusion worker, which provides ``model_runner.pipeline``."""

    def verl_omni_load_transformer_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Load transformer weights named as in the diffusers checkpoint; returns how many tensors were loaded.

        Raises ``RuntimeError`` naming the tensors the pipeline did not take, so a partial update never passes
        for a whole one.
        """
        pipeline = self.model_runner.pipeline
        names = {f"transformer.{name}" for name in state_dict}
        loaded = pipeline.load_weights((f"transformer.{name}", tensor) for name, tensor in state_dict.items())
        missing = sorted(names - set(loaded))
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(names)} transformer tensors were not loaded: {missing[:5]}")
        return len(loaded)
