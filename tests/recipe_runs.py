"""Overrides shared by the tests that run the FlowGRPO recipe end to end: small and fast on 2 CPU cores."""

from __future__ import annotations

# 2 prompts x 4 samples (8 images, two groups) per step, 4 denoising steps at 32 x 32, metrics to a file; one
# agent-loop worker process (the tiny default's; named for the configs whose default is more).
SMALL_RUN = [
    "data.train_batch_size=2",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.diffusion.num_inference_steps=4",
    "actor_rollout_ref.rollout.diffusion.height=32",
    "actor_rollout_ref.rollout.diffusion.width=32",
    "trainer.logger=[console,file]",
    "actor_rollout_ref.rollout.agent.num_workers=1",
]
# One rollout replica (the tiny default has two): for runs whose subject is not routing over replicas; each replica
# is a process that imports torch and diffusers and loads the model (about 10 CPU-s of a run's start-up).
ONE_REPLICA = ["actor_rollout_ref.rollout.n_gpus_per_node=1"]
# Two agent-loop workers: the batch split over workers, end to end.
TWO_AGENT_WORKERS = ["actor_rollout_ref.rollout.agent.num_workers=2"]
# No validation rollouts (before training or during it).
NO_VALIDATION = ["trainer.test_freq=-1", "trainer.val_before_train=false"]
# The SD3.5 LoRA recipe on CPU (the tiny model at MODEL_PATH): only placement and image size change; precision,
# LoRA, CFG, steps, clip range and chunking stay as shipped.
SD35_ON_CPU = [
    "--config-name",
    "flowgrpo_sd35_medium_lora",
    "reward.name=geneval_color",
    "~reward.kwargs",
    "trainer.n_gpus_per_node=0",
    "actor_rollout_ref.rollout.n_gpus_per_node=2",
    "actor_rollout_ref.rollout.diffusion.device=cpu",
    "actor_rollout_ref.rollout.diffusion.height=64",
    "actor_rollout_ref.rollout.diffusion.width=64",
]
