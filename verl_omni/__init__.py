"""verl-omni: online RL for diffusion models on verl, with multi-replica rollout server routing.

Importing the package is light (no verl, torch or Ray): the modules that build verl objects register
the overlay's extensions in verl's registries when they are imported
(:func:`verl_omni.workers.rollout.backends.register_rollout_backends`); nothing patches verl.

Importing it installs the known-noise log filters (:mod:`verl_omni.utils.log_noise`): every process that loads one of
the overlay's classes, Ray workers included, loads this package first, before verl, so its workers need no
``runtime_env`` hook (a ``runtime_env`` starts each worker through Ray's setup process: about 0.5 CPU-s a worker).
"""

from verl_omni.utils.log_noise import quiet_known_noise

__version__ = "0.1.0"

# The overlay subclasses verl internals and patches/ is diffed against this exact release.
PINNED_VERL_VERSION = "0.9.1"


class VerlVersionWarning(UserWarning):
    """The installed verl is not the release the overlay (and patches/) were written against."""


# Kept across importlib.reload (which reuses this module's namespace), so the warning shows once.
_verl_version_warned: bool = globals().get("_verl_version_warned", False)


def check_verl_version() -> str | None:
    """Warn once per process when the installed verl differs from ``PINNED_VERL_VERSION``.

    A warning, not an error: a nearby release may work, but subclassed internals can change
    silently between verl releases. Reads package metadata only, so importing stays light.
    Returns the warning text (``None`` when verl matches).
    """
    global _verl_version_warned
    from importlib import metadata

    try:
        installed = metadata.version("verl")
    except metadata.PackageNotFoundError:
        installed = None
    if installed == PINNED_VERL_VERSION:
        return None
    found = f"verl {installed} is installed" if installed else "verl is not installed"
    message = (
        f"{found}, but verl-omni is pinned to verl=={PINNED_VERL_VERSION}; "
        f'install it with: pip install "verl=={PINNED_VERL_VERSION}"'
    )
    if not _verl_version_warned:
        _verl_version_warned = True
        import warnings

        warnings.warn(message, VerlVersionWarning, stacklevel=2)
    return message


check_verl_version()
quiet_known_noise()
