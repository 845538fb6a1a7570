"""The access policy of RFC 3340 §4.5 as a reload (SIGHUP) changes it."""

from __future__ import annotations

import pytest

from imxp.apex.address import Endpoint
from imxp.apex.policy import AccessPolicy

FRED = Endpoint.parse("fred@a.test")
BARNEY = Endpoint.parse("barney@b.test")


def test_a_reload_replaces_refusals_and_trusted_relays_and_a_bad_one_changes_nothing() -> None:
    policy = AccessPolicy("b.test", lambda local: True, refusals={"barney@b.test": ["@a.test"]})
    assert not policy.may_deliver(FRED, BARNEY)
    assert not policy.may_relay(["c.test"], FRED)

    policy.use(["C.Test."], {})
    assert policy.may_deliver(FRED, BARNEY)
    # §4.5.2: c.test is now a trusted intermediary, in the form domains are compared in.
    assert policy.may_relay(["c.test"], FRED)

    with pytest.raises(ValueError):
        policy.use([], {"barney@b.test": ["fred"]})
    assert policy.may_deliver(FRED, BARNEY)
    assert policy.may_relay(["c.test"], FRED)
