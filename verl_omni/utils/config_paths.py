"""Where verl's Hydra configs live, found without importing verl.

Hydra's ``pkg://verl.trainer.config`` search path imports the ``verl`` package (torch, tensordict:
about 5 s) before a config can even be checked. ``find_spec`` of the top-level package reads only its
location, so the recipe's search path is ``file://${verl_config_dir:}`` instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

VERL_CONFIG_RESOLVER = "verl_config_dir"


def verl_config_dir() -> str:
    """The directory of verl's trainer configs (``verl/trainer/config``) of the installed verl."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError('verl is not installed; install it with: pip install "verl==0.9.1"')
    return str(Path(next(iter(spec.submodule_search_locations))) / "trainer" / "config")


def register_config_resolvers() -> None:
    """Register ``${verl_config_dir:}`` for the recipe's ``hydra.searchpath`` (idempotent)."""
    if not OmegaConf.has_resolver(VERL_CONFIG_RESOLVER):
        OmegaConf.register_new_resolver(VERL_CONFIG_RESOLVER, verl_config_dir)
