"""Launch the FlowGRPO paper's trainer (``yifan123/flow_grpo``, ``scripts/train_sd3.py``) unmodified, for
:mod:`benchmarks.reference_trainer_bench`.

Run by the benchmark in the reference's own environment (a separate venv), never imported by this project. It
loads the reference's training script as a module, sets its config from a JSON description (the same work as our
recipe run beside it), and from the outside:

- sets torch's thread count;
- caps every tokenizer call's ``max_length`` at the tokenizer's own ``model_max_length``: the reference pads CLIP
  prompts to 77 tokens and T5 prompts to 128 (SD3's lengths), which the tiny model's text encoders (32 CLIP
  positions, 16 T5 tokens) cannot take; capped, its transformer sees the same 48 text tokens as our pipeline's;
- replaces its evaluation function with a no-op (it evaluates at epoch 0 whatever ``eval_freq`` says; our runs
  beside it validate neither);
- wraps its prompt sampler's ``set_epoch`` (called once per sampling batch) to record when each epoch (one
  training step: sampling, rewards, advantages, update) starts, and exits once ``steps + 1`` epochs have started
  (the reference trains until killed).

Timestamps (``time.time()``) go to ``$REF_BENCH_OUT`` as JSON lines: ``{"epoch": k, "t": ...}``.

Usage (by the benchmark): ``REF_BENCH_SETTINGS=<json> REF_BENCH_OUT=<file> python reference_trainer_wrapper.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from typing import Any


def _load_training_script(reference_dir: str) -> Any:
    """The reference's ``scripts/train_sd3.py`` as a module (its flags are defined on import)."""
    sys.path.insert(0, reference_dir)
    path = os.path.join(reference_dir, "scripts", "train_sd3.py")
    spec = importlib.util.spec_from_file_location("reference_train_sd3", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _set_config(config: Any, values: dict[str, Any]) -> None:
    """Set dotted keys (``"sample.num_steps"``) of an ``ml_collections.ConfigDict``; each must exist."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = getattr(node, name)
        if leaf not in node:
            raise KeyError(f"the reference config has no key {dotted!r}")
        setattr(node, leaf, value)


def _cap_tokenizer_lengths() -> None:
    """Cap ``max_length`` at ``model_max_length`` in every tokenizer call (see the module docstring)."""
    from transformers import PreTrainedTokenizerBase

    original_call = PreTrainedTokenizerBase.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        limit = getattr(self, "model_max_length", None)
        if limit and kwargs.get("max_length") and kwargs["max_length"] > limit:
            kwargs["max_length"] = limit
        return original_call(self, *args, **kwargs)

    PreTrainedTokenizerBase.__call__ = call


def main() -> None:
    """Configure and run the reference trainer until ``steps + 1`` epochs have started."""
    settings = json.loads(os.environ["REF_BENCH_SETTINGS"])
    out_path = os.environ["REF_BENCH_OUT"]
    reference_dir = os.path.abspath(settings["reference_dir"])
    stop_after = int(settings["steps"]) + 1
    batches_per_epoch = int(settings["config"]["sample.num_batches_per_epoch"])

    import torch

    torch.set_num_threads(int(settings["threads"]))
    _cap_tokenizer_lengths()
    script = _load_training_script(reference_dir)
    script.eval = lambda *args, **kwargs: None

    sampler_cls = script.DistributedKRepeatSampler
    original_set_epoch = sampler_cls.set_epoch
    started: list[float] = []

    def set_epoch(self: Any, epoch: int) -> None:
        if epoch % batches_per_epoch == 0:  # the first sampling batch of an epoch
            started.append(time.time())
            with open(out_path, "a") as f:
                f.write(json.dumps({"epoch": len(started) - 1, "t": started[-1]}) + "\n")
            if len(started) >= stop_after:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        original_set_epoch(self, epoch)

    sampler_cls.set_epoch = set_epoch

    from absl import app, flags

    def run(argv: list[str]) -> None:
        _set_config(flags.FLAGS.config, settings["config"])
        script.main(argv)

    os.chdir(settings["work_dir"])
    sys.argv = [sys.argv[0], f"--config={os.path.join(reference_dir, 'config', 'base.py')}"]
    app.run(run)


if __name__ == "__main__":
    main()
