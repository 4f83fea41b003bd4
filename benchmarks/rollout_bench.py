"""One diffusers replica's throughput: fused batches vs one request at a time, prompt cache on vs off.

Runs ``DiffusersRolloutServer`` in-process (no Ray: a Ray call costs about as much as a tiny-model
image and would blur the engine comparison) on the tiny SD3 model, FlowGRPO training settings by
default (10 steps, CFG 4.5, the model's default size, noise level 0.7, batch-invariant mode as the replica runs it).
Every configuration is timed in interleaved rounds in this one run and the median is reported, so
ratios are side by side under the same machine load.

Part 1: B concurrent requests (B copies of one prompt, distinct seeds) on a server that fuses them
(``max_num_seqs=B``) vs one that runs them one at a time (``max_num_seqs=1``), B = 1, 4, 8, 16.
Part 2: fused groups of 8 copies, a new prompt per group, with the prompt cache (each distinct text
encoded once) vs without (every request encodes its prompt and its negative prompt).

    python -m benchmarks.rollout_bench [--model DIR] [--steps 10] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import os

# Like the replica's actors: MKL in strict reproducibility mode (set before torch loads MKL).
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from verl_omni.models.tiny_sd3 import ensure_tiny_sd3  # noqa: E402
from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer  # noqa: E402

BATCH_SIZES = (1, 4, 8, 16)
GROUP = 8


def _server(model: str, threads: int, **config) -> DiffusersRolloutServer:
    return DiffusersRolloutServer(model, {"cpu_threads": threads, "admission_window_ms": 10.0, **config})


async def _burst(server: DiffusersRolloutServer, prompts: list[str], seed0: int, params: dict) -> float:
    """Seconds to serve ``prompts`` submitted concurrently."""
    start = time.perf_counter()
    await asyncio.gather(
        *[server.generate(f"r{seed0 + i}", p, {"seed": seed0 + i, **params}) for i, p in enumerate(prompts)]
    )
    return time.perf_counter() - start


async def run(model: str, steps: int, rounds: int, threads: int) -> None:
    params = {"num_inference_steps": steps, "guidance_scale": 4.5, "noise_level": 0.7}
    images = 32  # per measurement, for every batch size
    fused = {b: _server(model, threads, max_num_seqs=b) for b in BATCH_SIZES}
    single = _server(model, threads, max_num_seqs=1)
    cached = _server(model, threads, max_num_seqs=GROUP)
    uncached = _server(model, threads, max_num_seqs=GROUP, prompt_cache_size=0)
    times: dict[str, list[float]] = {}
    seed = 0

    async def measure(name: str, server: DiffusersRolloutServer, batch: int, fresh_prompts: bool) -> None:
        nonlocal seed
        total = 0.0
        for _ in range(images // batch):
            prompt = f"a photo of object {seed}" if fresh_prompts else "a photo of a cat"
            total += await _burst(server, [prompt] * batch, seed, params)
            seed += batch
        times.setdefault(name, []).append(images / total)

    # Warm-up: first calls allocate and fill caches.
    for server in (*fused.values(), single, cached, uncached):
        await _burst(server, ["warm-up"] * 2, 10**9, params)

    for _ in range(rounds):  # interleaved: every configuration sees the same background load
        for b in BATCH_SIZES:
            await measure(f"fused-{b}", fused[b], b, fresh_prompts=False)
            await measure(f"single-{b}", single, b, fresh_prompts=False)
        await measure("cache-on", cached, GROUP, fresh_prompts=True)
        await measure("cache-off", uncached, GROUP, fresh_prompts=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    spec = single.engine.spec
    print(
        f"model={model}\nsettings: {steps} steps, CFG 4.5, {spec.default_height}x{spec.default_width}, "
        f"noise_level 0.7, torch threads={threads}, "
        f"batch_invariant=True (MKL_CBWR={os.environ.get('MKL_CBWR')}), in-process server, "
        f"median of {rounds} interleaved rounds of {images} images"
    )
    print("\nPart 1: fused batch vs one request at a time (B concurrent copies of one prompt)")
    print(f"{'B':>4} {'fused img/s':>12} {'one-at-a-time img/s':>20} {'fused / one-at-a-time':>22}")
    for b in BATCH_SIZES:
        f, s = med[f"fused-{b}"], med[f"single-{b}"]
        print(f"{b:>4} {f:>12.1f} {s:>20.1f} {f / s:>21.2f}x")
    on, off = med["cache-on"], med["cache-off"]
    print(f"\nPart 2: prompt cache, fused groups of {GROUP} copies of a new prompt each (CFG negative shared)")
    print(f"{'cache on img/s':>15} {'cache off img/s':>16} {'on / off':>9}")
    print(f"{on:>15.1f} {off:>16.1f} {on / off:>8.2f}x")
    stats_on, stats_off = await cached.get_stats(), await uncached.get_stats()
    print(
        f"texts encoded: cache on {stats_on['texts_encoded']}, cache off {stats_off['texts_encoded']} "
        f"(hits {stats_on['prompt_cache']['hits']} / misses {stats_on['prompt_cache']['misses']} with the cache)"
    )
    for server in (*fused.values(), single, cached, uncached):
        await server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="diffusers pipeline directory (default: the tiny SD3, built once)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replica")
    args = parser.parse_args(argv)
    model = args.model or str(ensure_tiny_sd3(Path(tempfile.gettempdir()) / "verl_omni_models"))
    asyncio.run(run(model, args.steps, args.rounds, args.threads))


if __name__ == "__main__":
    main()
