"""Audit of the report service and the access decisions of §4.4.4.1 step 5.3."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from apexnet import App, RelayHandle, attach, start_relay

from imxp.apex import options as apex_options
from imxp.apex import wire
from imxp.certs import Issued


@contextlib.asynccontextmanager
async def fred_and_wilma(
    test_ca: Issued, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[RelayHandle, App, App]]:
    """A relay for a.test with fred and wilma attached; all of it gone afterwards."""
    relay = await start_relay("a.test", test_ca, tmp_path, users=("fred", "wilma"), **settings)
    try:
        fred = await attach(relay, test_ca, "fred@a.test")
        wilma = await attach(relay, test_ca, "wilma@a.test")
        yield relay, fred, wilma
        for app in (fred, wilma):
            app.session.disconnect()
    finally:
        await relay.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_refused_originator_gets_through_as_a_subaddress_of_itself(
    test_ca: Issued, tmp_path: Path
) -> None:
    """wilma refuses fred@a.test. fred, attached as fred@a.test, may originate as
    fred/x@a.test (§4.5.1, may_originate), and that is still fred: the access check
    of §4.4.4.1 step 5.3 must refuse it (537) rather than deliver it to wilma."""
    refusals = {"wilma@a.test": ["fred@a.test"]}
    async with fred_and_wilma(test_ca, tmp_path, refusals=refusals) as (relay, fred, wilma):
        await fred.send(["wilma@a.test"], b"hi", originator="fred/x@a.test")
        await relay.service.relay.when_idle()
        assert wilma.data == []


@pytest_twisted.ensureDeferred
async def test_a_domain_refusal_written_in_another_form_of_the_domain_still_refuses(
    test_ca: Issued, tmp_path: Path
) -> None:
    """ "@a.test." names the domain a.test (§2.2.1, normalise_domain), yet the
    refusal it stands for lets every originator of a.test through."""
    refusals = {"wilma@a.test": ["@a.test."]}
    async with fred_and_wilma(test_ca, tmp_path, refusals=refusals) as (_relay, fred, wilma):
        trans_id = await fred.send(["wilma@a.test"], b"hi")
        await fred.wait("reports", 1)
        assert fred.outcomes()[(trans_id, "wilma@a.test")] == [(537, "access denied")]
        assert wilma.data == []


@pytest_twisted.ensureDeferred
async def test_a_per_recipient_status_request_on_a_second_spelling_is_answered(
    test_ca: Issued, tmp_path: Path
) -> None:
    """§5.1: a statusRequest gets a statusResponse from the report service. Here it
    rides on the recipient "wilma@A.TEST", which the relay folds into an earlier
    "wilma@a.test" (§2.2.1) and then never answers: the request is lost."""
    async with fred_and_wilma(test_ca, tmp_path) as (relay, fred, wilma):
        trans_id = 4242
        data = wire.Data(
            wire.Originator("fred@a.test", []),
            [
                wire.Recipient("wilma@a.test", []),
                wire.Recipient("wilma@A.TEST", [apex_options.make_status_request(trans_id)]),
            ],
            [],
            content=wire.Content.from_bytes(b"hi", "text/plain"),
        )
        await fred.channel.send(wire.encode(data))
        await wilma.wait("data", 1)
        # The journey ends only once its reports are delivered (they keep it in flight).
        await relay.service.relay.when_idle()
        assert [t for t, _ in fred.outcomes()] == [trans_id]
