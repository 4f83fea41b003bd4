"""The patch layer: series parsing, the checker, the verl version guard, and overlay == patched verl.

The behaviour tests load ``LLMServerClient`` from a copy of verl's ``llm_server.py`` with the
series applied (under an alias module name, next to the installed verl it imports from) and drive
it, the overlay's ``OmniLLMServerClient`` and stock verl's client against the same recording
balancer and servers. The balancer and servers are in-process objects behind ``ActorStandIn``,
not Ray actors: what is compared is argument plumbing (which kwargs reach the balancer, which
reach the server, which request id the server sees), which needs no Ray.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import OmegaConf
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.replica import TokenOutput

import verl_omni
from patches.check import APPLIED, FAILED, UPSTREAM, SeriesError, apply_series, import_patched, main, read_series
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerClient
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"
SERIES = read_series(PATCHES)
LLM_SERVER = "verl/workers/rollout/llm_server.py"
INSTALLED_VERL = Path(importlib.util.find_spec("verl").submodule_search_locations[0])


# ----------------------------------------------------------------------------- helpers
def _fake_verl(root: Path, *, patched_upto: int = 0, edit=None) -> Path:
    """A minimal verl package: ``__init__`` plus the files the series touches, copied from the installed verl.

    ``patched_upto`` applies the first N patches (to play a verl that already has them);
    ``edit(text) -> text`` alters llm_server.py (to play a verl the series no longer fits).
    """
    src = INSTALLED_VERL
    (root / "verl").mkdir(parents=True)
    (root / "verl" / "__init__.py").write_text("")
    for target in {t for p in SERIES for t in p.targets}:
        dest = root / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / target.split("/", 1)[1], dest)
    if patched_upto:
        assert all(status == APPLIED for _, status, _ in apply_series(SERIES[:patched_upto], root))
    if edit is not None:
        path = root / LLM_SERVER
        text = path.read_text()
        new = edit(text)
        assert new != text, "the edit must change the file"
        path.write_text(new)
    return root / "verl"


def _statuses(out: str) -> dict[str, str]:
    """Map patch name -> status from ``check`` output lines like ``  applied  verl/0001-x.patch  [subject]``."""
    line = re.compile(rf"^\s+({APPLIED}|{UPSTREAM}|{FAILED})\s+(\S+\.patch)", re.M)
    return {name: status for status, name in line.findall(out)}


# ----------------------------------------------------------------------------- series + CLI
def test_real_series_has_headers_and_targets_verl_only():
    assert [p.name for p in SERIES] == sorted(p.name for p in SERIES)  # numbered, in order
    assert len(SERIES) >= 2
    for patch in SERIES:
        assert patch.header["Purpose"] and patch.header["Overlay"] and patch.header["Upstream"]
        assert "OmniLLMServerClient" in patch.header["Overlay"]
        assert all(t.startswith("verl/") for t in patch.targets)


def test_missing_patch_named_in_series_is_an_error_naming_it(tmp_path, capsys):
    shutil.copytree(PATCHES, tmp_path / "patches")
    with open(tmp_path / "patches" / "series", "a") as f:
        f.write("verl/0099-not-there.patch\n")
    with pytest.raises(SeriesError, match="0099-not-there.patch"):
        read_series(tmp_path / "patches")
    assert main(["--patches-dir", str(tmp_path / "patches")]) == 2
    assert "0099-not-there.patch" in capsys.readouterr().err


def test_header_without_upstream_status_is_rejected(tmp_path):
    shutil.copytree(PATCHES, tmp_path / "patches")
    path = tmp_path / "patches" / SERIES[0].name
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("Upstream:")))
    with pytest.raises(SeriesError, match=r"lacks Upstream"):
        read_series(tmp_path / "patches")


# ----------------------------------------------------------------------------- checker
def test_real_series_checks_clean_against_installed_verl(capsys):
    """The CI check itself: copy, apply, import the patched copy in a subprocess."""
    assert main(["--patches-dir", str(PATCHES)]) == 0
    out = capsys.readouterr().out
    assert _statuses(out) == {p.name: APPLIED for p in SERIES}, out
    assert "import of the patched copy: ok" in out
    assert "verl-omni-patches-" in out  # the import came from the temporary copy, not site-packages


def test_patch_that_no_longer_fits_verl_fails_with_nonzero_exit(tmp_path, capsys):
    # A verl whose _vllm_request_id changed: patch 0002's context no longer matches, 0001 still applies.
    verl_dir = _fake_verl(tmp_path / "src", edit=lambda s: s.replace("return uuid4().hex", "return uuid4().hex[:16]"))
    rc = main(["--patches-dir", str(PATCHES), "--source", str(verl_dir), "--no-import"])
    out = capsys.readouterr().out
    assert rc == 1
    assert _statuses(out) == {SERIES[0].name: APPLIED, SERIES[1].name: FAILED}, out
    assert "llm_server.py" in out  # the tool's message says where it failed


def test_altered_patch_fails_with_nonzero_exit(tmp_path, capsys):
    shutil.copytree(PATCHES, tmp_path / "patches")
    path = tmp_path / "patches" / SERIES[0].name
    text = path.read_text()
    path.write_text(text.replace(" **kwargs: Any,\n     ) -> TokenOutput:", " **kwargs: Any,\n     ) -> TokenOut:", 1))
    assert path.read_text() != text
    rc = main(["--patches-dir", str(tmp_path / "patches"), "--source", str(INSTALLED_VERL)])
    out = capsys.readouterr().out
    assert rc == 1 and _statuses(out)[SERIES[0].name] == FAILED, out
    assert "skipped: a patch failed" in out


def test_changes_already_in_verl_are_reported_upstream(tmp_path, capsys):
    verl_dir = _fake_verl(tmp_path / "src", patched_upto=1)
    rc = main(["--patches-dir", str(PATCHES), "--source", str(verl_dir), "--no-import"])
    out = capsys.readouterr().out
    assert rc == 0
    assert _statuses(out) == {SERIES[0].name: UPSTREAM, SERIES[1].name: APPLIED}, out


def test_patched_copy_that_does_not_import_fails(tmp_path):
    (tmp_path / "verl").mkdir()
    (tmp_path / "verl" / "__init__.py").write_text("")
    (tmp_path / "verl" / "broken.py").write_text("raise ImportError('patched module is broken')\n")
    ok, detail = import_patched(tmp_path, ["verl.broken"])
    assert not ok and "patched module is broken" in detail
    ok, detail = import_patched(tmp_path, ["verl"])
    assert ok and str(tmp_path.resolve()) in detail


# ----------------------------------------------------------------------------- version guard
def test_version_guard_warns_once_naming_pin_and_pip(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: "0.8.0")
    monkeypatch.setattr(verl_omni, "_verl_version_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = verl_omni.check_verl_version()
        second = verl_omni.check_verl_version()
    assert [w.category for w in caught] == [verl_omni.VerlVersionWarning]
    msg = str(caught[0].message)
    assert "0.8.0" in msg and "verl==0.9.1" in msg and "pip install" in msg
    assert first == second == msg


def test_version_guard_silent_for_pinned_release(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: verl_omni.PINNED_VERL_VERSION)
    monkeypatch.setattr(verl_omni, "_verl_version_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert verl_omni.check_verl_version() is None
    assert caught == []


def test_importing_with_another_verl_warns_once(tmp_path):
    """A fake ``verl-0.8.0.dist-info`` first on sys.path plays an installed verl 0.8.0."""
    dist = tmp_path / "verl-0.8.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: verl\nVersion: 0.8.0\n")
    code = "import importlib, verl_omni; importlib.reload(verl_omni); import verl_omni"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("VerlVersionWarning") == 1, proc.stderr
    assert 'pip install "verl==0.9.1"' in proc.stderr


# ----------------------------------------------------------------------------- overlay == patched verl
class ActorStandIn:
    """Stand-in for a Ray actor handle: ``handle.method.remote(...)`` calls ``method`` now and returns an awaitable.

    No Ray: the tests compare argument plumbing, not scheduling. Async methods run as tasks;
    results of sync methods come back as done futures, so verl's fire-and-forget
    ``release_server.remote(...)`` (never awaited) still takes effect.
    """

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, name)

        class _Remote:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> asyncio.Future:
                result = method(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    return asyncio.ensure_future(result)
                future = asyncio.get_running_loop().create_future()
                future.set_result(result)
                return future

        return _Remote()


@dataclass
class Trace:
    acquires: list = field(default_factory=list)  # (request_id, routing_key) as the balancer saw them
    releases: list = field(default_factory=list)  # server ids
    served: list = field(default_factory=list)  # (prompt, server, request_id seen by the server, extra kwargs)


class RecordingBalancer(OmniRequestLoadBalancer):
    """The overlay's balancer (asks for ``routing_key``), recording what reaches it."""

    def __init__(self, trace: Trace, **kwargs: Any):
        super().__init__(**kwargs)
        self.trace = trace

    def acquire_server(self, request_id: str, routing_key: str | None = None) -> tuple[str, Any]:
        self.trace.acquires.append((request_id, routing_key))
        return super().acquire_server(request_id, routing_key=routing_key)

    def release_server(self, server_id: str, request_id: str | None = None) -> None:
        self.trace.releases.append(server_id)
        super().release_server(server_id, request_id)

    def acquire_group(self, request_ids: list[str], routing_key: str | None = None, **kwargs: Any) -> list:
        """The overlay's one-call path: recorded per copy, as verl's per-request calls are (``kwargs``: the
        owner, lease and incarnation the client adds)."""
        self.trace.acquires.extend((request_id, routing_key) for request_id in request_ids)
        return super().acquire_group(request_ids, routing_key=routing_key, **kwargs)

    def release_group(self, placement: list, **kwargs: Any) -> str:
        self.trace.releases.extend(server_id for server_id, count in placement for _ in range(count))
        return super().release_group(placement, **kwargs)


class RecordingServer:
    """A rollout server recording the request id it is given and any kwarg beyond verl's server signature."""

    def __init__(self, name: str, trace: Trace):
        self.name, self.trace = name, trace

    async def generate(self, request_id, prompt_ids, sampling_params, image_data=None, video_data=None, **extra):
        self.trace.served.append((tuple(prompt_ids), self.name, request_id, tuple(sorted(extra))))
        await asyncio.sleep(0)
        return TokenOutput(token_ids=[0], extra_fields={})

    async def generate_group(self, requests):  # the overlay's call: one per replica used by a group
        """The samples in request order, no conditioning (what the client reads of a ``SampleGroup``)."""
        return SimpleNamespace(samples=[await self.generate(**request) for request in requests], conditioning={})


async def _drive(client_cls: type, n_groups: int = 3, n_copies: int = 3) -> Trace:
    """Run groups of concurrent requests (plus one without a routing key) and return what was seen where."""
    trace = Trace()
    servers = {f"s{i}": ActorStandIn(RecordingServer(f"s{i}", trace)) for i in range(3)}
    # Hash sharding: placement is a pure function of (routing_key or request_id), whatever the
    # interleaving and with no random tie-break, so the same plumbing gives the same placement.
    balancer = ActorStandIn(
        RecordingBalancer(trace, servers=servers, routing=RolloutServerRoutingConfig(policy="prompt_hash_sharding"))
    )
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "recording", "full_determinism": False}}})
    client = client_cls(config=config, load_balancer_handle=balancer)
    calls = [
        client.generate(f"req-{g}-{c}", prompt_ids=[g, c], sampling_params={}, routing_key=f"uid-{g}")
        for g in range(n_groups)
        for c in range(n_copies)
    ]
    calls.append(client.generate("req-nokey", prompt_ids=[99], sampling_params={}))
    await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
    await asyncio.sleep(0)
    return Trace(sorted(trace.acquires, key=str), sorted(trace.releases), sorted(trace.served))


def _patched_client(tmp_path: Path, upto: int) -> type:
    """``LLMServerClient`` from llm_server.py with the first ``upto`` patches applied, under an alias module."""
    root = tmp_path / f"patched-{upto}"
    _fake_verl(root)
    results = apply_series(SERIES[:upto], root)
    assert [status for _, status, _ in results] == [APPLIED] * upto, [detail for *_, detail in results]
    spec = importlib.util.spec_from_file_location(f"_verl_omni_test_patched_llm_server_{upto}", root / LLM_SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports the rest from the installed verl, which the series leaves alone
    return module.LLMServerClient


def _routing_aspect(t: Trace) -> Any:
    """What patch 0001 is about: the key reaches the balancer, and nothing extra reaches the server."""
    placement = sorted((prompt, server) for prompt, server, _, _ in t.served)
    extra_to_server = sorted({extra for *_, extra in t.served})
    return t.acquires, t.releases, placement, extra_to_server


def _request_id_aspect(t: Trace) -> Any:
    """What patch 0002 is about: the id the server sees, per request (prompt)."""
    return sorted((prompt, rid) for prompt, _, rid, _ in t.served)


BEHAVIOUR = {
    "verl/0001-llm-server-client-routing-hint.patch": _routing_aspect,
    "verl/0002-llm-server-client-forward-request-id.patch": _request_id_aspect,
}


def test_every_patch_has_a_behaviour_test():
    assert sorted(BEHAVIOUR) == sorted(p.name for p in SERIES), "add an aspect to BEHAVIOUR for each new patch"
    assert {t for p in SERIES for t in p.targets} == {LLM_SERVER}, "_patched_client loads llm_server.py only"


@pytest.mark.parametrize("index", range(len(SERIES)), ids=[p.name.split("/")[-1] for p in SERIES])
async def test_overlay_behaves_as_patched_verl(tmp_path, index):
    """Stock verl differs from the overlay in this patch's aspect; verl with the series up to it does not."""
    aspect = BEHAVIOUR[SERIES[index].name]
    overlay = await _drive(OmniLLMServerClient)
    stock = await _drive(LLMServerClient)
    patched = await _drive(_patched_client(tmp_path, index + 1))
    assert aspect(stock) != aspect(overlay), "the patch would change nothing: the test could not fail"
    assert aspect(patched) == aspect(overlay)


async def test_overlay_matches_fully_patched_verl_exactly(tmp_path):
    overlay = await _drive(OmniLLMServerClient)
    patched = await _drive(_patched_client(tmp_path, len(SERIES)))
    assert patched == overlay
    # And what that shared behaviour is: keys at the balancer only, caller ids at the server, groups co-located.
    assert ("req-0-0", "uid-0") in overlay.acquires and ("req-nokey", None) in overlay.acquires
    assert all(extra == () for *_, extra in overlay.served)
    assert {rid for _, _, rid, _ in overlay.served} == {a for a, _ in overlay.acquires}
    groups: dict[int, set] = {}
    for prompt, server, _, _ in overlay.served:
        groups.setdefault(prompt[0], set()).add(server)
    assert all(len(s) == 1 for g, s in groups.items() if g != 99)
    assert len(overlay.releases) == len(overlay.served) == 10
