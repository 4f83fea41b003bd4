"""Stable Diffusion 3 / 3.5: the model code both rollout backends and the trainer share.

- :mod:`.conditioning`: prompt encoding and the CFG-guided velocity of the SD3 transformer;
- :mod:`.sampling`: the schedule, FlowGRPO sampling (the project's one SDE loop bound to SD3), the trainer's
  log-prob recompute and VAE decoding;
- :mod:`.diffusers_adapter`: the diffusers backend's adapter; :mod:`.vllm_omni_pipeline`: vllm-omni's custom
  pipeline class (imported only inside vllm-omni workers).
"""
