"""Name -> reward factory registry, so the recipe picks a reward by config (``reward.name``).

A reward is any callable ``(images, prompts) -> scores`` where ``images`` is a uint8 tensor of shape
``(B, 3, H, W)``, ``prompts`` a list of ``B`` strings and ``scores`` a float32 tensor of shape ``(B,)``. A video
family's samples are uint8 videos ``(B, F, 3, H, W)``: they need a video reward (``video_color``).
The registry stores factories (usually classes) so that options such as a model path reach the reward.

A reward outside the package needs no registration: ``reward.name: my_rewards:brightness`` imports
``brightness`` from the module ``my_rewards`` in every process that scores (the recipe's Ray workers run in
the driver's working directory; on a multi-node cluster ship the module with Ray's ``runtime_env``). A class
there is a factory like the registered ones; a function is the reward itself and ``reward.kwargs`` are
passed to each call as keyword arguments.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    import torch

REWARD_NAME_KEY = "reward.name"
# The built-in rewards and the module that registers each, imported when the name is first resolved: naming a
# reward (or misspelling one) costs no torch or transformers import.
BUILTIN_REWARD_MODULES: dict[str, str] = {
    "geneval_color": "verl_omni.rewards.color",
    "jpeg_compressibility": "verl_omni.rewards.jpeg",
    "jpeg_incompressibility": "verl_omni.rewards.jpeg",
    "ocr": "verl_omni.rewards.ocr",
    "pickscore": "verl_omni.rewards.pickscore",
    "remote": "verl_omni.rewards.remote",
    "video_color": "verl_omni.rewards.video",
}
# The built-in rewards that score videos (B, F, 3, H, W) (a video family's samples); the other built-ins score images.
VIDEO_REWARDS = frozenset({"video_color"})
# A term of a weighted reward may be named ``<reward>-<label>`` (e.g. ``remote-geneval``): reward ``<reward>``
# under its own name, so one reward (two reward services) can appear several times with different options.
LABEL_SEPARATOR = "-"


class RewardFn(Protocol):
    """What every registered reward returns once built."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_F = TypeVar("_F", bound=Callable[..., RewardFn])
_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[_F], _F]:
    """Register a reward factory under ``name``; a second registration of the same name is an error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_reward needs a non-empty string name, got {name!r}")

    def decorator(factory: _F) -> _F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"reward {name!r} is already registered to {existing!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def registered_rewards() -> tuple[str, ...]:
    """Sorted names of all registered rewards (the built-in ones included, imported or not)."""
    return tuple(sorted(set(_REGISTRY) | set(BUILTIN_REWARD_MODULES)))


def get_reward_fn(name: str, **kwargs) -> RewardFn:
    """Build the reward registered as ``name`` with ``kwargs``.

    Raises ``ValueError`` naming ``reward.name``, the bad value and the valid choices for an unknown name,
    and naming the reward's valid options for an unknown keyword, so a config typo fails before any work.
    """
    check_reward_options(name, kwargs)
    factory, is_function = _resolve(name)
    return functools.partial(factory, **kwargs) if is_function else factory(**kwargs)


def reward_factory(name: str) -> Callable:
    """The class or function ``name`` resolves to (registered or ``module:attribute``), without building it."""
    return _resolve(name)[0]


def base_reward_name(name: str) -> str:
    """The reward a name stands for: itself, or ``<reward>`` for a labelled name ``<reward>-<label>``."""
    if not isinstance(name, str) or name in _REGISTRY or name in BUILTIN_REWARD_MODULES or ":" in name:
        return name
    base, sep, label = name.partition(LABEL_SEPARATOR)
    return base if sep and label and (base in _REGISTRY or base in BUILTIN_REWARD_MODULES) else name


def reward_sample_kind(name: str) -> str | None:
    """``"video"`` or ``"image"``: what the built-in reward ``name`` (or ``<reward>-<label>``) scores; None for a reward
    the registry cannot tell (a ``module:function`` path, a reward service). Imports nothing."""
    base = base_reward_name(name)
    if base in VIDEO_REWARDS:
        return "video"
    return "image" if base in BUILTIN_REWARD_MODULES and base != "remote" else None


def is_known_reward(name: str) -> bool:
    """Whether ``name`` resolves without importing anything: registered, built in (labelled or not) or a path."""
    base = base_reward_name(name)
    return isinstance(base, str) and (base in _REGISTRY or base in BUILTIN_REWARD_MODULES or ":" in base)


def _resolve(name: str) -> tuple[Callable, bool]:
    """``(factory or function, is_function)`` for a registered name or a ``module:attribute`` path."""
    name = base_reward_name(name)
    if isinstance(name, str) and name not in _REGISTRY and name in BUILTIN_REWARD_MODULES:
        importlib.import_module(BUILTIN_REWARD_MODULES[name])  # registers it
    if name in _REGISTRY:
        return _REGISTRY[name], False
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(
            f"Unknown {REWARD_NAME_KEY}={name!r}; valid choices: {list(registered_rewards())} "
            "(or '<reward>-<label>') or 'package.module:function'"
        )
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a broken user module must be reported at start-up, whatever it raised
        raise ValueError(f"{REWARD_NAME_KEY}={name!r}: cannot import {module_name!r}: {err!r}") from None
    obj = getattr(module, attribute, None)
    if obj is None or not callable(obj):
        raise ValueError(f"{REWARD_NAME_KEY}={name!r}: module {module_name!r} has no callable {attribute!r}")
    return obj, not inspect.isclass(obj)


def check_reward_options(name: str, kwargs: dict, key: str = "reward.kwargs") -> None:
    """Check that ``name`` resolves and takes every option in ``kwargs``, building nothing."""
    factory, is_function = _resolve(name)
    params = inspect.signature(factory).parameters
    if is_function:  # (images, prompts, **options)
        params = dict(list(params.items())[2:])
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} in {key} for reward {name!r}; valid options: {sorted(params)}"
            )


def validate_reward_inputs(images: torch.Tensor, prompts: list[str] | None = None) -> None:
    """Reject inputs a reward would silently mis-score (float images cast to uint8 turn black)."""
    import torch

    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 torch.Tensor of shape (B, 3, H, W), got {got}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; need one prompt per image")
