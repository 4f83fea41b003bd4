"""verl-omni: online RL for diffusion models on verl, with multi-replica rollout server routing.

Importing the package registers its extensions in verl's registries; it never patches verl.
"""

__version__ = "0.1.0"
