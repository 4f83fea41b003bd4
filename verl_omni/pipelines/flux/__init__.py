"""FLUX.1 (``FluxPipeline``): the model code the diffusers backend and the trainer share.

- :mod:`.conditioning`: the FLUX transformer's velocity: 2x2 latent packing, text and image position ids, and
  the embedded guidance scale of the guidance-distilled checkpoints (FLUX.1-dev: no true CFG, no negative);
- :mod:`.sampling`: FLUX's schedule (resolution-dependent shift), FlowGRPO sampling (the project's one SDE loop
  bound to FLUX) and the trainer's log-prob recompute;
- :mod:`.diffusers_adapter`: the diffusers backend's adapter.

The conditioning bundle has SD3's field names and shapes (``prompt_embeds`` (L, D): T5; ``pooled_prompt_embeds``
(P,): CLIP pooled), so the per-text encoding and batching of :mod:`verl_omni.pipelines.sd3.conditioning` serve
both. Latents are kept unpacked, (C, h, w), in samples and the trainer, as the stock pipeline draws them.
"""
