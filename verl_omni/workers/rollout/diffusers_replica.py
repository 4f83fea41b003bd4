"""``DiffusersRolloutReplica``: the rollout replica of the ``diffusers`` backend (``rollout.name=diffusers``)."""

from __future__ import annotations

from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer
from verl_omni.workers.rollout.replica_base import DiffusionRolloutReplica


class DiffusersRolloutReplica(DiffusionRolloutReplica):
    """One :class:`DiffusersRolloutServer` actor per replica."""

    backend = "diffusers"
    server_class = DiffusersRolloutServer
    address_prefix = "diffusers-replica"
