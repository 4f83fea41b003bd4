"""The routing benchmark's core on a minimal burst: its result holds the invariants no timing can change.

Counts (texts encoded, cache lookups, balancer RPCs, placement) follow from the routing alone, so they are
checked exactly; throughput numbers are only checked to exist.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.rollout_routing_bench import (
    BASELINE,
    BenchResult,
    bench_config,
    cost_mix_in_process,
    print_report,
    run_bench,
    targets,
)

pytestmark = pytest.mark.integration

PROMPTS, N, UNEVEN = 2, 2, 3
OVERRIDES = [  # a small, fast rollout; one agent-loop worker (each worker is a process to start: seconds)
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "actor_rollout_ref.rollout.diffusion.num_inference_steps=2",
    "actor_rollout_ref.rollout.diffusion.height=32",
    "actor_rollout_ref.rollout.diffusion.width=32",
]


@pytest.fixture(scope="module")
def result(ray_local, tiny_model_path) -> BenchResult:
    # The cost mix is measured in this process (run_bench would start a Ray task for it: seconds of start-up).
    result = run_bench(
        tiny_model_path,
        prompts=PROMPTS,
        n=N,
        uneven_prompts=UNEVEN,
        rounds=1,
        max_imbalance=(1,),
        overrides=OVERRIDES,
        cost_mix=False,
        warmup=False,
    )
    diffusion = bench_config(tiny_model_path, N, OVERRIDES).actor_rollout_ref.rollout.diffusion
    result.cost_mix = cost_mix_in_process(tiny_model_path, dict(diffusion), [1, N], repeats=1)
    return result


def test_every_setup_ran_once_per_burst_kind(result):
    for kind, prompts in (("even", PROMPTS), ("uneven", UNEVEN)):
        for setup in result.setups[kind]:
            (burst,) = result.runs(kind, setup.label)
            assert (burst.prompts, burst.samples) == (prompts, prompts * N)
            assert burst.images_per_s > 0 and burst.wall_s > 0
    assert {s.label for s in result.setups["even"]} >= {
        "least_inflight",
        "prompt_uid_affinity",
        "prompt_hash_sharding",
        "round_robin",
        "prompt_uid_affinity mi=1",
    }


def test_counts_follow_from_routing(result):
    for burst in result.bursts:
        # every sample is acquired and released, whatever the policy
        assert burst.acquires == burst.releases == burst.samples
        # one acquire and one release per group under every policy (the single agent-loop worker holds whole
        # groups); one replica call per replica a group used: one for keyed groups, up to 2 when split
        calls = burst.prompts
        assert (burst.acquire_calls, burst.release_calls) == (calls, calls), burst.setup
        assert calls <= burst.server_calls <= 2 * calls, burst.setup
        if burst.setup != BASELINE and burst.setup != "round_robin":
            assert burst.server_calls == calls, burst.setup
        assert burst.rpcs == 2 * calls
        assert sum(burst.load.values()) == burst.samples
        assert burst.busy_s.keys() == burst.load.keys()
        assert all((burst.busy_s[s] > 0) == (burst.load[s] > 0) for s in burst.load)  # busy iff it served
        assert burst.batches >= 1 and math.isclose(burst.mean_batch_size * burst.batches, burst.samples)
        # new prompts every burst: a replica encodes each of its distinct prompts exactly once
        assert burst.texts_encoded == burst.prompt_replica_pairs
        assert burst.cache_hits + burst.cache_misses == burst.samples  # no CFG: one lookup per request
        assert math.isclose(burst.cache_hit_rate, 1 - burst.texts_encoded / burst.samples)


def test_affinity_and_hashing_colocate_and_encode_once(result):
    for kind in ("even", "uneven"):
        for label in ("prompt_uid_affinity", "prompt_hash_sharding"):
            for burst in result.runs(kind, label):
                assert burst.colocation == 1.0, (kind, label)
                assert burst.texts_encoded == burst.prompts, (kind, label)
                assert math.isclose(burst.cache_hit_rate, (N - 1) / N)
                assert all(count % N == 0 for count in burst.load.values())  # whole groups per replica
                assert burst.diversions == 0
    for burst in result.runs("even", BASELINE):
        assert burst.diversions == 0


def test_ratios_cost_mix_and_report(result, capsys):
    assert result.ratio("even", BASELINE, "images_per_s") == 1.0
    assert result.ratio("even", "prompt_uid_affinity", "rpcs") == 1.0  # one acquire + release per group, both
    rows = targets(result)
    assert len(rows) == 3 and all(isinstance(met, bool) for _, _, met in rows)
    assert rows[0][2]  # affinity encodes each prompt once: a count, not a timing

    mix = result.cost_mix
    assert mix is not None and mix.settings["steps"] == 2
    for component in ("text_encode", "denoise_step", "vae_decode", "generate"):
        assert set(mix.seconds[component]) == {1, N}
        assert all(t > 0 for t in mix.seconds[component].values())

    print_report(result)
    out = capsys.readouterr().out
    assert "targets (issue 6)" in out and "cost mix" in out and "uneven burst" in out
    assert "soft affinity: max_imbalance=1" in out
