"""A rollout server double that records what reaches it, in a module that imports neither verl nor torch.

Each Ray actor is a new process that imports its class's module: kept light, an actor starts in about a second
instead of the several seconds an import of verl costs on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import cloudpickle

# Ray workers cannot import this file (tests/ is not on their path): ship the classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class Output:
    """What the client reads of a server's output (verl's ``TokenOutput`` has the same two fields)."""

    token_ids: list[int]
    extra_fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """What the client reads of a ``generate_group`` answer (``verl_omni.protocol.SampleGroup``'s two fields)."""

    samples: list[Output]
    conditioning: dict[str, Any] = field(default_factory=dict)


@ray.remote(num_cpus=0)
class RecordingServer:
    """Accepts exactly the kwargs verl's client sends to a server; an unexpected kwarg raises.

    ``gated``: each request stays in flight until :meth:`finish` names it (or :meth:`finish_all`), so a test can
    compare a balancer's in-flight counts with what the servers hold at one instant.
    """

    def __init__(self, name: str, fail: bool = False, delay: float = 0.01, gated: bool = False):
        self.name = name
        self.fail = fail
        self.delay = delay
        self.calls: list[dict] = []
        self.gated = gated
        self.gates: dict[str, asyncio.Event] = {}

    async def generate(self, request_id, prompt_ids, sampling_params, image_data=None, video_data=None):
        self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids)})
        if self.gated:
            await self.gates.setdefault(request_id, asyncio.Event()).wait()
            del self.gates[request_id]
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("server exploded")
        return Output(token_ids=[1, 2], extra_fields={"server": self.name, "request_id": request_id})

    async def generate_group(self, requests):
        self.calls.append({"group": [r["request_id"] for r in requests]})
        if self.gated:  # every copy held at once
            return Group(list(await asyncio.gather(*(self.generate(**r) for r in requests))))
        return Group([await self.generate(**r) for r in requests])

    def get_calls(self):
        return self.calls

    def in_flight(self) -> list[str]:
        """The requests held at the gate now."""
        return sorted(self.gates)

    def finish(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.gates[request_id].set()

    def finish_all(self) -> None:
        self.gated = False
        for gate in self.gates.values():
            gate.set()
