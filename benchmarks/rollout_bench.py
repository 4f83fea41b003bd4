"""One diffusers replica's throughput: batch-invariant vs free batching, fused batches vs one request at a
time, prompt cache on vs off.

Runs ``DiffusersRolloutServer`` in-process (no Ray: a Ray call costs about as much as a tiny-model
image and would blur the engine comparison) on the tiny SD3 model, FlowGRPO training settings by
default (10 steps, CFG 4.5, the model's default size, noise level 0.7). Every configuration is timed in
interleaved rounds in this one run and the median is reported, so ratios are side by side under the same
machine load.

Part 1: batch-invariant mode (``MKL_CBWR=AVX2,STRICT``, oneDNN off in the transformer, every network call
at ``chunk_size`` 8 samples, the last chunk padded) vs free batching (MKL's default dispatch, oneDNN on, one
call per fused batch), groups of B copies of one prompt served as one batch, B = 3 (a ragged chunk), 8 (one
chunk), 16 (two chunks). MKL's mode is fixed when MKL loads, so each mode serves from its own spawned
process (used one at a time).
Part 2: B concurrent requests on a server that fuses them (``max_num_seqs=B``) vs one that runs them
one at a time (``max_num_seqs=1``), B = 1, 4, 8, 16; batch-invariant with ``chunk_size=max_num_seqs``.
Part 3: fused groups of 8 copies, a new prompt per group, with the prompt cache (each distinct text
encoded once) vs without (every request encodes its prompt and its negative prompt).
Part 4 (where the vllm-omni extra is installed, e.g. ``make install-vllm-omni``): the two rollout backends on the
same model and the same batch shapes, groups of B copies through ``generate_group`` (B = 1, 8), both in
batch-invariant mode; images/s of each, their ratio, and each engine's start-up time.

    python -m benchmarks.rollout_bench [--model DIR] [--steps 10] [--rounds 5] [--threads 1] [--parts 1 2 3 4]
    .venv-vllm-omni/bin/python -m benchmarks.rollout_bench --parts 4
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# torch (and so MKL) is imported inside functions: the modes' processes set MKL_CBWR before it loads.

BATCH_SIZES = (1, 4, 8, 16)
MODE_BATCH_SIZES = (3, 8, 16)
CHUNK = 8
GROUP = 8
STRICT_MKL = "AVX2,STRICT"


def _server(model: str, threads: int, **config: Any) -> Any:
    from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer

    return DiffusersRolloutServer(model, {"cpu_threads": threads, "admission_window_ms": 10.0, **config})


async def _burst(server: Any, prompts: list[str], seed0: int, params: dict) -> float:
    """Seconds to serve ``prompts`` submitted concurrently."""
    start = time.perf_counter()
    await asyncio.gather(
        *[server.generate(f"r{seed0 + i}", p, {"seed": seed0 + i, **params}) for i, p in enumerate(prompts)]
    )
    return time.perf_counter() - start


async def _group(server: Any, batch: int, seed0: int, params: dict, check_batch: bool = True) -> float:
    """Seconds to serve one group of ``batch`` copies of a prompt (one fused batch, no admission wait)."""
    group = [
        {
            "request_id": f"g{seed0 + i}",
            "prompt_ids": "a photo of a cat",
            "sampling_params": {"seed": seed0 + i, **params},
        }
        for i in range(batch)
    ]
    start = time.perf_counter()
    outs = await server.generate_group(group)
    if check_batch:  # the diffusers server reports the fused batch; vllm-omni's scheduler does not
        assert {o.extra_fields["batch_size"] for o in outs} == {batch}
    return time.perf_counter() - start


def _mode_worker(conn: Any, model: str, threads: int, invariant: bool, params: dict) -> None:
    """A process serving one mode: answers ``(batch, images, seed0)`` with the seconds to serve the images."""
    loop = asyncio.new_event_loop()
    # No admission window: a group is one fused batch at once, so only the engine's work is timed.
    server = _server(
        model, threads, max_num_seqs=16, batch_invariant=invariant, chunk_size=CHUNK, admission_window_ms=0.0
    )
    loop.run_until_complete(_group(server, 2, 10**9, params))
    conn.send(os.environ.get("MKL_CBWR"))
    while (message := conn.recv()) is not None:
        batch, images, seed = message
        conn.send(
            sum(
                loop.run_until_complete(_group(server, batch, seed + i * batch, params)) for i in range(images // batch)
            )
        )
    loop.run_until_complete(server.close())


def _start_mode(model: str, threads: int, invariant: bool, params: dict) -> tuple[Any, Any, str | None]:
    """Spawn a mode's process with MKL's mode in its environment (restored here after the start)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    saved = os.environ.get("MKL_CBWR")
    if invariant:
        os.environ["MKL_CBWR"] = saved or STRICT_MKL
    else:
        os.environ.pop("MKL_CBWR", None)
    try:
        proc = ctx.Process(target=_mode_worker, args=(child, model, threads, invariant, params), daemon=True)
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("MKL_CBWR", None)
        else:
            os.environ["MKL_CBWR"] = saved
    return proc, parent, parent.recv()


def compare_modes(model: str, threads: int, rounds: int, params: dict) -> dict[str, Any]:
    """Part 1: images/s of each mode and batch size, median of interleaved rounds."""
    images = 48  # per measurement: a multiple of every batch size
    modes = {"invariant": True, "free": False}
    started = {name: _start_mode(model, threads, inv, params) for name, inv in modes.items()}
    times: dict[tuple[str, int], list[float]] = {}
    seed = 0
    try:
        for _ in range(rounds):
            for b in MODE_BATCH_SIZES:
                for name in modes:
                    _, conn, _ = started[name]
                    conn.send((b, images, seed))
                    times.setdefault((name, b), []).append(images / conn.recv())
                seed += images
    finally:
        for proc, conn, _ in started.values():
            conn.send(None)
            proc.join(timeout=60)
    return {
        "img_s": {key: statistics.median(v) for key, v in times.items()},
        "mkl_cbwr": {name: started[name][2] for name in modes},
    }


async def compare_backends(model: str, steps: int, rounds: int, threads: int) -> None:
    """Part 4: diffusers vs vllm_omni, in-process servers on the same model and request shapes."""
    from verl_omni.workers.rollout.vllm_omni_server import VllmOmniRolloutServer

    config = {
        "num_inference_steps": steps,
        "guidance_scale": 4.5,
        "cpu_threads": threads,
        "batch_invariant": True,
        "chunk_size": GROUP,
        "max_num_seqs": GROUP,
        "admission_window_ms": 0.0,
        "dtype": "float32",
    }
    os.environ["OMP_NUM_THREADS"] = str(threads)  # vllm-omni's worker process starts with it
    start_s, servers = {}, {}
    for name, make in (
        ("diffusers", lambda: _server(model, threads, **config)),
        ("vllm_omni", lambda: VllmOmniRolloutServer(model, config, server_id="vllm-omni-bench", device="cpu")),
    ):
        start = time.perf_counter()
        servers[name] = make()
        await _group(servers[name], 2, 10**9, {}, check_batch=False)  # warm-up
        start_s[name] = time.perf_counter() - start
    images = 16  # per measurement
    times: dict[tuple[str, int], list[float]] = {}
    seed = 0
    for _ in range(rounds):  # interleaved: both backends see the same background load
        for b in (1, GROUP):
            for name, server in servers.items():
                total = sum([await _group(server, b, seed + i * b, {}, check_batch=False) for i in range(images // b)])
                times.setdefault((name, b), []).append(images / total)
            seed += images
    med = {key: statistics.median(v) for key, v in times.items()}
    print(
        f"\nPart 4: rollout backends, groups of B copies of one prompt through generate_group ({steps} steps, CFG 4.5, "
        f"batch-invariant chunks of {GROUP}, float32, {threads} thread(s) each), {images} images per measurement"
    )
    print(f"{'B':>4} {'diffusers img/s':>16} {'vllm_omni img/s':>16} {'vllm_omni / diffusers':>22}")
    for b in (1, GROUP):
        d, v = med[("diffusers", b)], med[("vllm_omni", b)]
        print(f"{b:>4} {d:>16.2f} {v:>16.2f} {v / d:>21.2f}x")
    print(
        f"engine start-up incl. first group: diffusers {start_s['diffusers']:.1f} s, vllm_omni "
        f"{start_s['vllm_omni']:.1f} s (its engine alone: {servers['vllm_omni'].engine_start_s:.1f} s)"
    )
    for server in servers.values():
        await server.close()


async def run(model: str, steps: int, rounds: int, threads: int, parts: list[int]) -> None:
    if 4 in parts:
        await compare_backends(model, steps, rounds, threads)
    if not {1, 2, 3} & set(parts):
        return
    params = {"num_inference_steps": steps, "guidance_scale": 4.5, "noise_level": 0.7}
    modes = compare_modes(model, threads, rounds, params)

    images = 32  # per measurement, for every batch size
    fused = {b: _server(model, threads, max_num_seqs=b, chunk_size=b) for b in BATCH_SIZES}
    single = _server(model, threads, max_num_seqs=1, chunk_size=1)
    cached = _server(model, threads, max_num_seqs=GROUP)
    uncached = _server(model, threads, max_num_seqs=GROUP, prompt_cache_size=0)
    times: dict[str, list[float]] = {}
    seed = 0

    async def measure(name: str, server: Any, batch: int, fresh_prompts: bool) -> None:
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
        f"noise_level 0.7, torch threads={threads}, in-process server, median of {rounds} interleaved rounds"
    )
    cbwr = modes["mkl_cbwr"]
    print(
        f"\nPart 1: batch-invariant (chunk_size {CHUNK}, MKL_CBWR={cbwr['invariant']}, transformer without oneDNN) vs "
        "free batching "
        f"(MKL_CBWR={cbwr['free']}, oneDNN on); groups of B copies of one prompt (one fused batch each), 48 images "
        "per measurement"
    )
    print(f"{'B':>4} {'invariant img/s':>16} {'free img/s':>11} {'invariant / free':>17}")
    for b in MODE_BATCH_SIZES:
        inv, free = modes["img_s"][("invariant", b)], modes["img_s"][("free", b)]
        print(f"{b:>4} {inv:>16.1f} {free:>11.1f} {inv / free:>16.2f}x")
    print(
        f"\nPart 2: fused batch vs one request at a time (B concurrent copies of one prompt; batch-invariant, "
        f"chunk_size = max_num_seqs; MKL_CBWR={os.environ.get('MKL_CBWR')}), {images} images per measurement"
    )
    print(f"{'B':>4} {'fused img/s':>12} {'one-at-a-time img/s':>20} {'fused / one-at-a-time':>22}")
    for b in BATCH_SIZES:
        f, s = med[f"fused-{b}"], med[f"single-{b}"]
        print(f"{b:>4} {f:>12.1f} {s:>20.1f} {f / s:>21.2f}x")
    on, off = med["cache-on"], med["cache-off"]
    print(f"\nPart 3: prompt cache, fused groups of {GROUP} copies of a new prompt each (CFG negative shared)")
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
    parser.add_argument(
        "--parts", type=int, nargs="+", help="parts to run (default: 1-3, and 4 where vllm-omni is installed)"
    )
    args = parser.parse_args(argv)
    import importlib.util

    parts = args.parts or [1, 2, 3] + ([4] if importlib.util.find_spec("vllm_omni") else [])
    # Parts 2 and 3 run here, like the replica's actors: MKL in strict mode, set before torch loads MKL.
    os.environ.setdefault("MKL_CBWR", STRICT_MKL)
    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3

    model = args.model or str(ensure_tiny_sd3(Path(tempfile.gettempdir()) / "verl_omni_models"))
    asyncio.run(run(model, args.steps, args.rounds, args.threads, parts))


if __name__ == "__main__":
    main()
