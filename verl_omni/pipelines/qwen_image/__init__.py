"""Qwen-Image (``QwenImagePipeline``): the model code the diffusers backend and the trainer share.

- :mod:`.conditioning`: prompt encoding through the pipeline's chat template (Qwen2.5-VL's last hidden state,
  padded to a fixed length with its mask) and the transformer's velocity: 2x2-packed latents, the text mask, and
  true classifier-free guidance with Qwen-Image's norm rescaling;
- :mod:`.sampling`: the schedule, FlowGRPO sampling (the project's one SDE loop bound to Qwen-Image), the
  trainer's log-prob recompute and decoding with the 3-D VAE;
- :mod:`.diffusers_adapter`: the diffusers backend's adapter.

The conditioning bundle of one text is ``prompt_embeds`` (L, D) and ``prompt_embeds_mask`` (L,), L fixed (the
rollout's ``max_sequence_length``), so entries of different prompts stack and every call has one shape. Latents
are kept unpacked, (C, h, w), in samples and the trainer, as the stock pipeline draws them.
"""
