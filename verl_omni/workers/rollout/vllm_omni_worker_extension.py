"""Methods verl-omni adds to vllm-omni's diffusion workers (``worker_extension_cls``): full-weight updates.

vllm-omni reloads LoRA adapters through ``add_lora`` but has no RPC for new base weights; the server calls
``collective_rpc(LOAD_WEIGHTS_METHOD, args=(state_dict,))`` and every worker loads them into its pipeline's
transformer with the pipeline's own ``load_weights`` (which maps diffusers names onto vllm-omni's layers).
Runs inside vllm-omni's worker processes; not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

LOAD_WEIGHTS_METHOD = "verl_omni_load_transformer_weights"
WORKER_EXTENSION = "verl_omni.workers.rollout.vllm_omni_worker_extension.VerlOmniWorkerExtension"


class VerlOmniWorkerExtension:
    """Mixed into vllm-omni's diffusion worker, which provides ``model_runner.pipeline``."""

    def verl_omni_load_transformer_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Load transformer weights named as in the diffusers checkpoint; returns how many tensors were loaded."""
        pipeline = self.model_runner.pipeline
        loaded = pipeline.load_weights((f"transformer.{name}", tensor) for name, tensor in state_dict.items())
        return len(loaded)
