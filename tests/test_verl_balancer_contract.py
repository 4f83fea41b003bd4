"""verl 0.9.1's own ``GlobalRequestLoadBalancer`` tests, run against ``OmniRequestLoadBalancer``.

The test classes are imported from the installed verl wheel's test package (``tests.experimental.agent_loop``,
shipped in the wheel), not copied: subclassing them here makes pytest collect them, and the name
``GlobalRequestLoadBalancer`` in that module is pointed at our balancer for the duration of each test.
"""

from __future__ import annotations

import pytest

verl_tests = pytest.importorskip("tests.experimental.agent_loop.test_basic_agent_loop")

from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer  # noqa: E402


@pytest.fixture(scope="module")
def ray_for_lb(ray_local):
    """verl's fixture starts Ray with every core; ours has explicit resources."""
    yield


@pytest.fixture(autouse=True)
def _our_balancer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verl_tests, "GlobalRequestLoadBalancer", OmniRequestLoadBalancer)


class TestOmniRouting(verl_tests.TestLoadBalancerRouting):
    pass


class TestOmniStickySession(verl_tests.TestLoadBalancerStickySession):
    pass


class TestOmniHybrid(verl_tests.TestLoadBalancerHybrid):
    pass
