"""``collector_paused`` restores the collector's state, nested or not, even when the block raises; the modules that
pause it at import leave it on."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from verl_omni.utils.gc_pause import collector_paused


def test_paused_inside_and_restored_after_even_on_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block found it paused: it stays paused for the outer one
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # found disabled by the caller: left disabled
    finally:
        gc.enable()


def test_importing_the_actor_modules_leaves_the_collector_on() -> None:
    modules = "verl_omni.agent_loop.diffusion_worker, verl_omni.workers.diffusion_actor"
    code = f"import gc, {modules}; print(gc.isenabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "True"
