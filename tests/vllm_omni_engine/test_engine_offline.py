"""vllm-omni's parts that need no running engine: the worker extension's weight loader and the upstream patch series
(``patches/vllm-omni``), checked against the installed release. Synchronous tests, so they sit apart from
``test_engine.py``, whose module-wide asyncio mark would otherwise warn on each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_the_worker_extension_loads_transformer_weights_and_reports_what_it_skipped():
    from types import SimpleNamespace

    from verl_omni.pipelines.vllm_omni_protocol import LOAD_WEIGHTS_METHOD
    from verl_omni.workers.rollout.vllm_omni_worker_extension import VerlOmniWorkerExtension

    loaded: list[str] = []

    def load_weights(weights):  # vllm-omni's pipeline loader: returns the names it loaded
        names = [name for name, _ in weights]
        loaded.extend(names)
        return {n for n in names if "skip" not in n}

    worker = SimpleNamespace(model_runner=SimpleNamespace(pipeline=SimpleNamespace(load_weights=load_weights)))
    load = getattr(VerlOmniWorkerExtension, LOAD_WEIGHTS_METHOD)
    assert load(worker, {"pos_embed.proj.weight": torch.zeros(3)}) == 1
    assert loaded == ["transformer.pos_embed.proj.weight"]  # diffusers names under the pipeline's prefix
    with pytest.raises(RuntimeError, match=r"1 of 2 transformer tensors were not loaded: \['transformer.skip'\]"):
        load(worker, {"pos_embed.proj.weight": torch.zeros(3), "skip": torch.zeros(1)})


def test_the_vllm_omni_patch_series_applies_and_imports(capsys):
    """patches/vllm-omni: upstream-bound changes to vllm-omni, checked against the installed release."""
    from patches.check import main

    assert main(["--package", "vllm_omni"]) == 0, capsys.readouterr().out
    assert "4 applied, 0 already upstream, 0 failed -- OK" in capsys.readouterr().out


def test_the_patched_lora_manager_binds_an_adapters_to_out_0_to_a_flattened_to_out(tmp_path):
    """patches/vllm-omni/0003: an adapter's diffusers ``to_out.0`` reaches a model whose layer is ``to_out``
    (Qwen-Image, Wan); a model that keeps ``to_out.0`` (FLUX) keeps the name. The overlay renames in its loader."""
    import importlib.util
    import shutil
    from types import SimpleNamespace

    import vllm_omni

    from patches.check import SERIES_DIRS, apply_series, read_series

    manager_file = "vllm_omni/diffusion/lora/manager.py"
    series = read_series(SERIES_DIRS["vllm_omni"], "vllm_omni")
    patched = {p.name: p for p in series}["0003-lora-manager-renames-to-out-0.patch"]
    for patch in series[: series.index(patched) + 1]:  # the series up to 0003, on a copy of what it touches
        for target in patch.targets:
            if not (tmp_path / target).exists():
                (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(vllm_omni.__file__).parent / target.split("/", 1)[1], tmp_path / target)
    assert [status for _, status, _ in apply_series(series[: series.index(patched) + 1], tmp_path)] == ["applied"] * (
        series.index(patched) + 1
    )
    spec = importlib.util.spec_from_file_location("_patched_lora_manager", tmp_path / manager_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    pipeline = torch.nn.Module()
    pipeline.transformer = torch.nn.Module()
    flat, wrapped = torch.nn.Module(), torch.nn.Module()
    flat.to_out = torch.nn.Linear(2, 2)  # Qwen-Image / Wan
    wrapped.to_out = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # FLUX
    pipeline.transformer.blocks = torch.nn.ModuleList([flat, wrapped])
    names = ["blocks.0.to_out.0", "blocks.1.to_out.0"]
    lora = SimpleNamespace(loras={n: SimpleNamespace(module_name=n) for n in names})
    helper = SimpleNamespace(target_modules=["to_q", "to_out.0"])
    module.DiffusionLoRAManager._align_to_out_names(SimpleNamespace(pipeline=pipeline), lora, helper)
    assert sorted(lora.loras) == ["blocks.0.to_out", "blocks.1.to_out.0"]
    assert lora.loras["blocks.0.to_out"].module_name == "blocks.0.to_out" and helper.target_modules == [
        "to_q",
        "to_out",
    ]
    stock = importlib.import_module("vllm_omni.diffusion.lora.manager").DiffusionLoRAManager
    assert not hasattr(stock, "_align_to_out_names")  # vllm-omni 0.28 binds such an adapter's to_out.0 to no layer
