"""Wan 2.1 / 2.2 text-to-video (``WanPipeline``): the model code the diffusers backend and the trainer share.

- :mod:`.conditioning`: UMT5 prompt encoding and the Wan transformer's velocity on video latents, with true
  classifier-free guidance (a negative prompt; the conditional and unconditional passes run separately, as
  ``WanPipeline`` runs them);
- :mod:`.sampling`: the scheduler's flow sigmas, FlowGRPO sampling (the project's one SDE loop bound to Wan),
  the trainer's log-prob recompute and VAE decoding to uint8 videos;
- :mod:`.diffusers_adapter`: the diffusers backend's adapter.

Latents are ``(C, f, h, w)`` per sample (``f = (num_frames - 1) / 4 + 1`` for Wan's causal 3-D VAE); the shared SDE
step and its log-prob (a mean over all non-batch dims) take them as they are. A sample's ``image`` is the decoded
video, uint8 ``(F, 3, H, W)``.
"""
