"""Well-known endpoints at a relay (RFC 3340 §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from apexnet import attach, start_relay
from twisted.internet import reactor

from imxp.apex import wire
from imxp.apex.service import build_relay
from imxp.beep.session import (
    TUNING_MESSAGE_SIZE,
    BEEPError,
    SessionConfig,
)
from imxp.beep.users import UserStore
from imxp.certs import Issued, issue_server


@pytest_twisted.ensureDeferred
async def test_data_to_the_report_service_or_an_unknown_service_is_refused(
    test_ca: Issued, tmp_path: Path
) -> None:
    """§6.2: nobody sends to apex=report; an unknown apex= service does not exist."""
    relay = await start_relay("a.test", test_ca, tmp_path, users=("fred",))
    try:
        fred = await attach(relay, test_ca, "fred@a.test")
        trans_id = await fred.send(["apex=report@a.test", "apex=nothing@a.test"])
        await fred.wait("reports", 1)
        outcomes = fred.outcomes()
        assert outcomes[(trans_id, "apex=report@a.test")][0][0] == 554
        assert outcomes[(trans_id, "apex=nothing@a.test")][0][0] == 550
        # The reports came from the report service and nothing was delivered to fred.
        assert fred.data == []
        fred.session.disconnect()
    finally:
        await relay.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_refusal_in_the_configuration_means_access_denied(
    test_ca: Issued, tmp_path: Path
) -> None:
    """§4.4.4.1 step 5.3: the recipient's provisioning refuses this originator: 537."""
    relay = await start_relay(
        "a.test",
        test_ca,
        tmp_path,
        users=("fred", "wilma", "barney"),
        refusals={"wilma@a.test": ["fred@a.test"]},
    )
    try:
        fred = await attach(relay, test_ca, "fred@a.test")
        wilma = await attach(relay, test_ca, "wilma@a.test")
        barney = await attach(relay, test_ca, "barney@a.test")
        trans_id = await fred.send(["wilma@a.test", "barney@a.test"], b"hi")
        await fred.wait("reports", 1)
        await barney.wait("data", 1)
        outcomes = fred.outcomes()
        assert outcomes[(trans_id, "wilma@a.test")] == [(537, "access denied")]
        assert outcomes[(trans_id, "barney@a.test")] == [(250, "")]
        assert wilma.data == []
        for app in (fred, wilma, barney):
            app.session.disconnect()
    finally:
        await relay.service.stopService()


def test_dns_servers_are_the_only_servers_asked(test_ca: Issued, tmp_path: Path) -> None:
    """`dns_servers` chooses who is asked: not also the system's resolv.conf servers."""
    service = build_relay(
        domain="a.test",
        identity=issue_server(test_ca, ["a.test"]),
        trust=[test_ca.certificate],
        users=UserStore(tmp_path / "users"),
        edge_listen=[],
        mesh_listen=[],
        session_config=SessionConfig(),
        reactor=reactor,
        dns_servers=[("192.0.2.53", 53)],
    )
    resolver = service.relay.router._resolver
    assert resolver.servers == [("192.0.2.53", 53)]
    assert not resolver.dynServers


@pytest.mark.parametrize("given", [None, 4096])
def test_a_relay_takes_no_long_message_from_a_peer_before_it_logs_in(
    test_ca: Issued, tmp_path: Path, given: int | None
) -> None:
    """Before a peer logs in a relay takes TLS and SASL from it and nothing else, on edge
    and mesh listeners: TUNING_MESSAGE_SIZE is room for those, unless the session config
    given sets a bound of its own."""
    service = build_relay(
        domain="a.test",
        identity=issue_server(test_ca, ["a.test"]),
        trust=[test_ca.certificate],
        users=UserStore(tmp_path / "users"),
        edge_listen=["tcp:0:interface=127.0.0.1"],
        mesh_listen=["tcp:0:interface=127.0.0.1"],
        session_config=SessionConfig(max_message_size_unauthenticated=given),
        reactor=reactor,
    )
    bounds = {factory.config.max_message_size_unauthenticated for _, factory in service.listeners}
    assert bounds == {given or TUNING_MESSAGE_SIZE}


@pytest_twisted.ensureDeferred
async def test_recipients_with_the_same_next_hop_travel_in_one_data(
    test_ca: Issued, tmp_path: Path
) -> None:
    """§4.4.4.1 step 5.2: b.test and c.test both go to a's smart host, b's relay, which
    proves the one name a expects of it: one data there, with both recipients. (Static
    routes expect a certificate for each destination domain: different next hops.)"""
    b = await start_relay(
        "b.test",
        test_ca,
        tmp_path,
        identity=issue_server(test_ca, ["b.test"], ips=["127.0.0.1"]),
        users=("barney",),
        routes={"c.test": "127.0.0.1:1"},
        delivery_timeout=0.5,
    )
    smart_host = f"127.0.0.1:{b.port('mesh')}"
    a = await start_relay("a.test", test_ca, tmp_path, users=("fred",), smart_host=smart_host)
    seen: list[list[str]] = []
    accept = b.service.relay.data

    def counting(channel, data, received):  # type: ignore[no-untyped-def]
        seen.append([r.identity for r in data.recipients])
        return accept(channel, data, received)

    b.service.relay.data = counting  # type: ignore[method-assign]
    try:
        fred = await attach(a, test_ca, "fred@a.test")
        barney = await attach(b, test_ca, "barney@b.test")
        await fred.send(["barney@b.test", "betty@c.test"], b"together")
        await barney.wait("data", 1)
        assert seen == [["barney@b.test", "betty@c.test"]]
        for app in (fred, barney):
            app.session.disconnect()
    finally:
        await a.service.stopService()
        await b.service.stopService()


@pytest_twisted.ensureDeferred
async def test_terminate_by_transid_and_zero(test_ca: Issued, tmp_path: Path) -> None:
    """§4.4.3: terminate ends the attachment its transID made (550 for an unknown one);
    transID 0 ends every attachment of the channel. Data then finds nobody attached."""
    relay = await start_relay("a.test", test_ca, tmp_path, users=("fred", "wilma"))
    try:
        fred = await attach(relay, test_ca, "fred@a.test")
        wilma = await attach(relay, test_ca, "wilma@a.test")
        # A second attachment on fred's channel: a subaddress, transID 2.
        reply = await fred.channel.send(wire.encode(wire.Attach("fred/appl=im@a.test", 2)))
        assert isinstance(wire.decode(reply), wire.OK)
        with pytest.raises(BEEPError) as unknown:
            await fred.channel.send(wire.encode(wire.Terminate(13)))
        assert unknown.value.code == 550
        await fred.channel.send(wire.encode(wire.Terminate(2)))
        trans_id = await wilma.send(["fred/appl=im@a.test", "fred@a.test"])
        await wilma.wait("reports", 1)
        assert wilma.outcomes()[(trans_id, "fred/appl=im@a.test")][0][0] == 450
        assert wilma.outcomes()[(trans_id, "fred@a.test")][0][0] == 250
        await fred.channel.send(wire.encode(wire.Terminate(0)))
        again = await wilma.send(["fred@a.test"])
        await wilma.wait("reports", 2)
        assert wilma.outcomes()[(again, "fred@a.test")][0][0] == 450
        for app in (fred, wilma):
            app.session.disconnect()
    finally:
        await relay.service.stopService()
