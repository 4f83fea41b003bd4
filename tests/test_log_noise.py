"""The known-noise filters drop exactly the listed messages and keep everything else from those loggers."""

from __future__ import annotations

import logging

import pytest

from verl_omni.utils.log_noise import quiet_known_noise


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture):
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger
    caplog.set_level(logging.WARNING)
    return caplog


def test_known_noise_is_dropped_and_other_warnings_kept(records: pytest.LogCaptureFixture) -> None:
    platform = logging.getLogger("verl.plugin.platform.platform_manager")
    assert len(platform.filters) == 1
    platform.warning("Platform '%s' (%s) is registered but not available.", "nvidia", "PlatformCUDA")
    platform.warning("No supported accelerator detected. Registered: %s.", ("nvidia",))
    platform.warning("Platform 'npu' failed to load")  # not in the list: kept
    truncation = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    truncation.warning(
        "The following part of your input was truncated because `max_sequence_length` is set to  16 tokens: ['', '']"
    )
    truncation.warning(
        "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: "
        "['a red car']"
    )
    kept = [r.getMessage() for r in records.records]
    assert kept == [
        "Platform 'npu' failed to load",
        "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: "
        "['a red car']",
    ]
