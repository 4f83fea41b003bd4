"""Routing at scale: a discrete-event model of FlowGRPO rollout bursts over R replicas, driving the real balancer.

Every placement decision is made by the real ``OmniRequestLoadBalancer`` class (in-process, the calls the
client makes: one ``acquire_group`` per group, one ``release_group`` when the group's calls return, one
``remove_servers`` plus a re-placement of the lost copies when a replica dies). Only the replicas are
modelled:

- a replica runs one batch at a time: when idle it takes up to ``max_num_seqs`` queued requests (FIFO);
- a batch of ``b`` requests with ``k`` prompts not in the replica's prompt cache takes
  ``speed * (encode(k) + steps * step(b) + decode(b))``, each term ``fixed + per_item * size``;
- groups arrive with a uniform jitter (agent-loop workers and the network do not send a burst at once);
- a replica can be slower than the others (``speed`` 2.0 = half as fast) or die at a given time.

Default costs are the tiny SD3 model's on this project's CPU machine (``docs/advanced_features/
rollout_server_routing.md``, "Cost mix": encode 3.3 + 0.58/prompt ms, one step 1.61 + 0.18/image ms,
decode 0.77 + 3.64/image ms, 8 steps). Two lower bounds per burst, both counting every batch full and every
prompt encoded once:

- ``LB`` (fluid): the work spread over the replicas' speeds as if copies could be split at will; no schedule
  beats it.
- ``LBg`` (whole groups): no schedule that keeps each group on one replica beats it: the optimal makespan of
  identical jobs (one group's work) on replicas of the given speeds (greedy on earliest finish is optimal
  there). ``makespan / LBg`` is how far a co-locating policy is from the best co-locating schedule; ``LBg /
  LB`` is what co-location itself costs when a burst has few groups per replica.

The balancer's clock is the simulated time, so ``speed_aware`` routing measures the modelled replicas.

    python -m benchmarks.routing_sim [--replicas 4 64 256 1024] [--n 8] [--max-num-seqs 8] [--steps-per-run 4]
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from collections import deque
from dataclasses import dataclass, field

from verl_omni.workers.config.rollout_routing import VALID_ROLLOUT_SERVER_ROUTING_POLICIES, RolloutServerRoutingConfig
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer


@dataclass(frozen=True)
class CostModel:
    """Milliseconds: ``fixed + per_item * size`` for each part of a batch."""

    steps: int = 8
    step_fixed: float = 1.61
    step_per_image: float = 0.18
    decode_fixed: float = 0.77
    decode_per_image: float = 3.64
    encode_fixed: float = 3.30
    encode_per_prompt: float = 0.58

    def batch_ms(self, images: int, new_prompts: int) -> float:
        encode = self.encode_fixed + self.encode_per_prompt * new_prompts if new_prompts else 0.0
        step = self.step_fixed + self.step_per_image * images
        return encode + self.steps * step + self.decode_fixed + self.decode_per_image * images


@dataclass(frozen=True)
class Scenario:
    """One burst pattern: ``prompts`` groups of ``n`` copies per step, ``steps`` steps in a row."""

    name: str
    prompts: int
    n: int
    steps: int = 1
    key_repeats: bool = False  # route by prompt (the same keys every step) instead of a new uid per step
    jitter_ms: float = 20.0
    slow_replicas: int = 0  # this many replicas run at half speed
    lose_replica_at_ms: float | None = None  # replica 0 dies this long into the first step


@dataclass
class _Replica:
    speed: float
    queue: deque = field(default_factory=deque)
    busy: bool = False
    alive: bool = True
    cache: set = field(default_factory=set)
    batch: list = field(default_factory=list)


@dataclass
class _Group:
    key: str
    prompt: str
    ids: list[str]
    outstanding: int = 0
    parts: list = field(default_factory=list)  # (server_id, copy indices) of the current placement
    failed: list = field(default_factory=list)  # copy indices whose replica died
    servers: set = field(default_factory=set)  # every replica that finished a copy


@dataclass
class RunResult:
    makespan_ms: float
    lower_bound_ms: float
    group_bound_ms: float
    warm_ratio: float | None  # makespan / LBg over the steps after the first (speeds measured), multi-step runs
    colocation: float
    encode_hit_rate: float
    rpcs_per_sample: float
    balancer_us_per_burst: float
    diversions: int
    resent: int

    @property
    def ratio(self) -> float:
        return self.makespan_ms / self.lower_bound_ms

    @property
    def group_ratio(self) -> float:
        return self.makespan_ms / self.group_bound_ms


class Simulation:
    """One scenario, one routing config, ``replicas`` replicas; :meth:`run` returns the measurements."""

    def __init__(
        self,
        scenario: Scenario,
        routing: RolloutServerRoutingConfig,
        replicas: int,
        max_num_seqs: int,
        cost: CostModel,
        seed: int = 0,
    ):
        self.s, self.cost, self.max_num_seqs = scenario, cost, max_num_seqs
        self.rng = random.Random(seed)
        ids = [f"replica-{i:04d}" for i in range(replicas)]
        speeds = [2.0 if i < scenario.slow_replicas else 1.0 for i in range(replicas)]
        self.replicas = {sid: _Replica(speed) for sid, speed in zip(ids, speeds, strict=True)}
        self.clock_ms = 0.0  # simulated time, continuous over the bursts (each burst's events start at 0)
        self.lb = OmniRequestLoadBalancer(
            servers=dict.fromkeys(ids), routing=routing, clock=lambda: self.clock_ms / 1000, seed=seed
        )
        self.events: list = []
        self.seq = 0
        self.rpcs = 0
        self.balancer_s = 0.0
        self.hits = self.misses = 0
        self.resent = 0

    # ----- events
    def _at(self, t: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def _balancer(self, method: str, *args: object, **kwargs: object) -> object:
        self.rpcs += 1
        start = time.perf_counter()
        result = getattr(self.lb, method)(*args, **kwargs)
        self.balancer_s += time.perf_counter() - start
        return result

    def _place(self, now: float, group: _Group, copies: list[int]) -> None:
        placement = self._balancer("acquire_group", [group.ids[i] for i in copies], routing_key=group.key)
        group.parts = [(sid, [copies[j] for j in idx]) for sid, _, idx in placement]
        group.outstanding = len(copies)
        for sid, idx in group.parts:
            self.replicas[sid].queue.extend((group, i) for i in idx)
            self._start(now, sid)

    def _start(self, now: float, sid: str) -> None:
        replica = self.replicas[sid]
        if replica.busy or not replica.alive or not replica.queue:
            return
        batch = [replica.queue.popleft() for _ in range(min(self.max_num_seqs, len(replica.queue)))]
        prompts = {group.prompt for group, _ in batch}
        new = prompts - replica.cache
        self.misses += len(new)
        self.hits += len(batch) - len(new)
        replica.cache |= new
        replica.busy, replica.batch = True, batch
        self._at(now + replica.speed * self.cost.batch_ms(len(batch), len(new)), "done", (sid, batch))

    def _group_returned(self, now: float, group: _Group) -> None:
        """The client's gather is back: release the placement, then resend what a dead replica held."""
        self._balancer("release_group", [(sid, len(idx)) for sid, idx in group.parts])
        if group.failed:
            dead = sorted({sid for sid, idx in group.parts if not self.replicas[sid].alive})
            self._balancer("remove_servers", dead)
            copies, group.failed = group.failed, []
            self.resent += len(copies)
            self._place(now, group, copies)
        else:
            self.finished += 1
            self.last_done = now

    def _burst(self, step: int) -> float:
        """Run one step's burst to completion; returns its makespan in ms."""
        s = self.s
        groups = []
        for p in range(s.prompts):
            prompt = f"prompt-{p}"
            key = prompt if s.key_repeats else f"uid-{step}-{p}"
            groups.append(_Group(key, prompt, [f"s{step}-g{p}-c{c}" for c in range(s.n)]))
        self.finished, self.last_done = 0, 0.0
        for group in groups:
            self._at(self.rng.uniform(0, s.jitter_ms), "arrive", group)
        if s.lose_replica_at_ms is not None and step == 0:
            self._at(s.lose_replica_at_ms, "die", next(iter(self.replicas)))
        start = self.clock_ms
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            self.clock_ms = start + now
            if kind == "arrive":
                self._place(now, payload, list(range(s.n)))
            elif kind == "done":
                sid, batch = payload
                replica = self.replicas[sid]
                if not replica.alive or batch is not replica.batch:
                    continue  # the replica died with this batch
                replica.busy, replica.batch = False, []
                for group, _ in batch:
                    group.servers.add(sid)
                    group.outstanding -= 1
                    if group.outstanding == 0:
                        self._group_returned(now, group)
                self._start(now, sid)
            elif kind == "die":
                replica = self.replicas[payload]
                replica.alive = False
                for group, i in [*replica.batch, *replica.queue]:
                    group.failed.append(i)
                    group.outstanding -= 1
                    if group.outstanding == 0:
                        self._group_returned(now, group)
                replica.queue.clear()
                replica.batch = []
        assert self.finished == len(groups), "every group completes"
        self.colocated += sum(len(g.servers) == 1 for g in groups)
        self.groups += len(groups)
        return self.last_done

    def _per_image_ms(self) -> float:
        c, b = self.cost, self.max_num_seqs
        return (c.steps * (c.step_fixed + c.step_per_image * b) + c.decode_fixed + c.decode_per_image * b) / b

    def lower_bound_ms(self) -> float:
        """Fluid bound of one burst: full batches over the live replicas' speeds, each prompt encoded once."""
        c = self.cost
        alive = [r for r in self.replicas.values() if r.alive]
        capacity = sum(1.0 / r.speed for r in alive)  # images per (per_image ms)
        images = self.s.prompts * self.s.n
        encode = self.s.prompts * c.encode_per_prompt + c.encode_fixed
        return (images * self._per_image_ms() + encode) / capacity

    def group_bound_ms(self) -> float:
        """Whole-group bound: each group is ``n`` images at full batches plus its prompt's encode, on one replica;
        groups go one by one to the live replica that would finish them first (optimal for identical jobs)."""
        c = self.cost
        group_ms = self.s.n * self._per_image_ms() + c.encode_per_prompt
        finish = [(r.speed * group_ms, r.speed * group_ms) for r in self.replicas.values() if r.alive]
        heapq.heapify(finish)
        end = 0.0
        for _ in range(self.s.prompts):
            done, per_group = heapq.heappop(finish)
            end = max(end, done)
            heapq.heappush(finish, (done + per_group, per_group))
        return end + c.encode_fixed

    def run(self) -> RunResult:
        self.colocated = self.groups = 0
        makespan = bound = group_bound = 0.0
        warm = warm_bound = 0.0
        for step in range(self.s.steps):
            burst = self._burst(step)
            self.clock_ms += 1000.0  # a gap between steps (the update), idle for the balancer
            step_group_bound = self.group_bound_ms()
            makespan += burst
            bound += self.lower_bound_ms()
            group_bound += step_group_bound
            if step > 0:
                warm += burst
                warm_bound += step_group_bound
        status = self.lb.get_status()
        assert status["total_inflight"] == 0, "every acquire was released"
        samples = self.s.prompts * self.s.n * self.s.steps
        return RunResult(
            makespan_ms=makespan,
            lower_bound_ms=bound,
            group_bound_ms=group_bound,
            warm_ratio=warm / warm_bound if warm_bound else None,
            colocation=self.colocated / self.groups,
            encode_hit_rate=self.hits / max(self.hits + self.misses, 1),
            rpcs_per_sample=self.rpcs / samples,
            balancer_us_per_burst=self.balancer_s / self.s.steps * 1e6,
            diversions=status["diversions"],
            resent=self.resent,
        )


def routing_setups(n: int) -> dict[str, RolloutServerRoutingConfig]:
    """Every policy; soft affinity gated at one group's worth of requests (``max_imbalance = n``, no relative
    threshold); and affinity and least_inflight with speed-aware picks."""
    setups = {policy: RolloutServerRoutingConfig(policy=policy) for policy in VALID_ROLLOUT_SERVER_ROUTING_POLICIES}
    gate = {"max_imbalance": n}
    setups["affinity+gate"] = RolloutServerRoutingConfig(policy="prompt_uid_affinity", **gate)
    setups["least_inflight+speed"] = RolloutServerRoutingConfig(policy="least_inflight", speed_aware=True)
    setups["affinity+speed"] = RolloutServerRoutingConfig(policy="prompt_uid_affinity", speed_aware=True)
    setups["affinity+gate+speed"] = RolloutServerRoutingConfig(policy="prompt_uid_affinity", speed_aware=True, **gate)
    return setups


def scenarios(replicas: int, n: int, steps: int) -> list[Scenario]:
    uneven = 2 * replicas + replicas // 2 + 1  # B mod R != 0
    return [
        Scenario("uneven bursts, equal replicas", prompts=uneven, n=n, steps=steps),
        Scenario("1 slow replica, new keys", prompts=4 * replicas, n=n, steps=steps, slow_replicas=1),
        Scenario("1 slow replica, keys repeat", prompts=4 * replicas, n=n, steps=steps, slow_replicas=1,
                 key_repeats=True),
        Scenario("replica lost mid-burst", prompts=2 * replicas, n=n, lose_replica_at_ms=30.0),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[4, 64, 256, 1024])
    parser.add_argument("--n", type=int, default=8, help="copies per prompt (rollout.n)")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="largest batch a replica runs")
    parser.add_argument("--steps-per-run", type=int, default=4, help="steps of the multi-step scenarios")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cost = CostModel()
    setups = routing_setups(args.n)
    print(
        f"routing simulator: n={args.n}, max_num_seqs={args.max_num_seqs}, tiny-SD3 CPU cost model; "
        "makespan / lower bound (lower is better), co-location, prompt-cache hit rate, balancer calls per sample, "
        "balancer CPU per burst"
    )
    for replicas in args.replicas:
        for scenario in scenarios(replicas, args.n, args.steps_per_run):
            results = {
                name: Simulation(scenario, routing, replicas, args.max_num_seqs, cost, args.seed).run()
                for name, routing in setups.items()
            }
            print_table(replicas, scenario, results)


def print_table(replicas: int, scenario: Scenario, results: dict[str, RunResult]) -> None:
    s = scenario
    print(f"\nR={replicas}  {s.name}: {s.prompts} prompts x {s.n} x {s.steps} step(s)")
    columns = ("mk/LB", "mk/LBg", "warm", "coloc", "hits", "rpc/s", "lb us", "div", "resent")
    print(f"  {'policy':<22}" + "".join(f"{c:>8}" for c in columns))
    for name, r in results.items():
        warm = f"{r.warm_ratio:8.3f}" if r.warm_ratio is not None else f"{'-':>8}"
        print(
            f"  {name:<22}{r.ratio:8.3f}{r.group_ratio:8.3f}{warm}{r.colocation:8.2f}{r.encode_hit_rate:8.2f}"
            f"{r.rpcs_per_sample:8.3f}{r.balancer_us_per_burst:8.0f}{r.diversions:8d}{r.resent:8d}"
        )
    best = min(results, key=lambda k: results[k].ratio)
    ours, ref = results["affinity+gate+speed"], results["least_inflight"]
    print(
        f"  fastest: {best}; LBg / LB = {ours.group_bound_ms / ours.lower_bound_ms:.3f}; affinity+gate+speed: "
        f"makespan / LBg = {ours.group_ratio:.3f}, / least_inflight's = {ours.makespan_ms / ref.makespan_ms:.3f} "
        f"at co-location {ours.colocation:.2f}"
    )


if __name__ == "__main__":
    main()
