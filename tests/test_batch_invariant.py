"""The fixed-chunk helper, the ``chunk_size`` setting, and how per-rank on-policy metrics merge."""

from __future__ import annotations

import pytest
import torch

from verl_omni.trainer.flowgrpo.trainer import _mean_dicts
from verl_omni.utils.batch_invariant import cpu_process_env, map_chunks, pad_rows, torch_threads
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig


def test_every_call_sees_exactly_chunk_size_rows_and_padding_is_dropped():
    shapes = []

    def fn(x, y, none):
        shapes.append((x.shape[0], y.shape[0], none))
        return x * 2, (y + 1, None)

    x, y = torch.arange(11.0), torch.arange(22.0).reshape(11, 2)
    out_x, (out_y, out_none) = map_chunks(fn, [x, y, None], chunk_size=4)
    assert shapes == [(4, 4, None)] * 3  # 4 + 4 + 3 real rows padded to 4
    assert torch.equal(out_x, x * 2) and torch.equal(out_y, y + 1) and out_none is None
    shapes.clear()
    map_chunks(fn, [x, y, None], chunk_size=None)  # free batching: one call on all rows
    assert shapes == [(11, 11, None)]


def test_padding_repeats_a_real_row_or_uses_the_fill():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(pad_rows(x, 4), torch.tensor([[1.0, 2.0], [3.0, 4.0], [3.0, 4.0], [3.0, 4.0]]))
    assert torch.equal(pad_rows(x, 3, fill=0.0)[2], torch.zeros(2))
    assert pad_rows(["a cat"], 3, fill="") == ["a cat", "", ""]
    with pytest.raises(ValueError, match="cannot pad 2 rows down to 1"):
        pad_rows(x, 1)


def test_padded_rows_get_no_gradient():
    w = torch.ones(3, requires_grad=True)
    x = torch.arange(6.0).reshape(2, 3)
    out = map_chunks(lambda rows: (rows * w).sum(dim=1), [x], chunk_size=8)
    out.sum().backward()
    assert torch.equal(w.grad, x.sum(dim=0))  # the 6 repeated padding rows contributed nothing


def test_map_chunks_rejects_inputs_of_different_lengths():
    with pytest.raises(ValueError, match=r"differ in rows: \[3, 2\]"):
        map_chunks(lambda a, b: a, [torch.zeros(3), torch.zeros(2)], chunk_size=2)


@pytest.mark.parametrize(("chunk_size", "max_num_seqs"), [(0, 16), (17, 16), (9, 8), (2.5, 16), (True, 16)])
def test_chunk_size_outside_one_to_max_num_seqs_is_refused_naming_key_value_and_range(chunk_size, max_num_seqs):
    with pytest.raises(ValueError) as err:
        DiffusionRolloutConfig(chunk_size=chunk_size, max_num_seqs=max_num_seqs)
    expected = f"actor_rollout_ref.rollout.diffusion.chunk_size={chunk_size!r} must be an integer in [1, "
    assert str(err.value) == expected + f"max_num_seqs={max_num_seqs}]"


def test_chunk_size_defaults_to_8_and_may_equal_max_num_seqs():
    assert DiffusionRolloutConfig().chunk_size == 8
    assert DiffusionRolloutConfig(chunk_size=4, max_num_seqs=4).chunk_size == 4


def test_process_env_sets_threads_and_strict_mkl_only_when_batch_invariant(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert cpu_process_env(2, True) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_CBWR": "AVX2,STRICT"}
    assert cpu_process_env(0, False) == {}
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE,STRICT")  # the driver's choice wins
    assert cpu_process_env(None, True) == {"MKL_CBWR": "COMPATIBLE,STRICT"}


def test_torch_threads_sets_the_count_for_the_block_and_restores_it():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_rank_metrics_merge_by_mean_except_the_max_deviation():
    ranks = [
        {"actor/ratio_max_abs_dev": 0.0, "actor/log_ratio_abs_mean": 0.0, "actor/loss": 1.0},
        {"actor/ratio_max_abs_dev": 3e-6, "actor/log_ratio_abs_mean": 1e-6, "actor/loss": 3.0},
    ]
    merged = _mean_dicts(ranks)
    assert merged == {"actor/ratio_max_abs_dev": 3e-6, "actor/log_ratio_abs_mean": 5e-7, "actor/loss": 2.0}
