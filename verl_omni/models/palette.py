"""The colour palette shared by the colour reward (:mod:`verl_omni.rewards.color`) and the tiny model's pretraining
scenes (:mod:`verl_omni.models.color_scenes`): plain data, no torch, so the recipe's start-up check of the colour
reward and its prompts loads none."""

# Well separated in CIELAB (smallest distance: blue-purple, 34; every other pair is at least 45 apart).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 150, 20),
    "yellow": (245, 225, 35),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (150, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
