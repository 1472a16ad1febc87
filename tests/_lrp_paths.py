"""The two LRP paths as a fixture: the LRP tests run once on the fast path (shortcut steps, the
generated forward) and once on the general path (AUDITKIT_LRP_GENERAL=1: every node interpreted and
sent through its rule's Step; auditkit/explain/lrp/switch.py). On the general path the fixture
checks afterwards that no forward or relevance pass of the test ran on the fast path."""

from __future__ import annotations

import pytest

from auditkit.explain.lrp import switch


@pytest.fixture(params=["fast", "general"])
def lrp_path(request, monkeypatch):
    if request.param == "fast":
        monkeypatch.delenv(switch.ENVIRONMENT_VARIABLE, raising=False)
        yield "fast"
        return
    monkeypatch.setenv(switch.ENVIRONMENT_VARIABLE, "1")
    before = dict(switch.runs)
    yield "general"
    # Nothing of the test ran on the fast path (switch.runs counts each path's forwards and passes).
    assert (switch.runs["fast_forward"], switch.runs["fast_relevance"]) == (before["fast_forward"],
                                                                            before["fast_relevance"])
