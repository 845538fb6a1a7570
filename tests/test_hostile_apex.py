"""What hostile or buggy endpoints and peer relays can make a relay do (RFC 3340, RFC 3342).

The promise (DESIGN.md, "Principles"): every bad input gets the reply code the RFC names
and a structured log event, never an internal error; and once a relay answered ``ok`` to a
data whose originator asked for status, every recipient ends in exactly one final
statusResponse, and nothing is delivered twice.

The mesh is test_relay_mesh's: relays for a.test (fred, wilma), b.test (barney, bambam)
and c.test (betty) on loopback, routes from a real DNS server, TLS and SASL everywhere.
The fixture here does not settle the mesh at teardown, so that a test of a forwarding loop
that does not end fails quickly instead of waiting for the mesh to fall idle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from apexnet import PASSWORD, App, _AppChannel
from clinet import until
from dnsserver import srv
from test_relay_mesh import (
    BARNEY,
    BETTY,
    FRED,
    SHORT_DEADLINE,
    WILMA,
    Mesh,
    MeshBuilder,
    Settings,
    codes,
    fake_relay,
    meshes,
    named,
)
from twisted.internet import defer, endpoints, reactor
from twisted.logger import LogEvent

from imxp.apex import options as apex_options
from imxp.apex import relay as apex_relay
from imxp.apex import wire
from imxp.apex.address import Endpoint
from imxp.apex.relay import APEXChannel
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.sasl import authenticate
from imxp.beep.saslmech import AnonymousClient, ScramSHA256Client
from imxp.beep.session import BEEPError, Request, Role, Session, SessionConfig, SessionFactory
from imxp.beep.tls import TLS_URI, start_tls
from imxp.beep.tlsctx import client_options
from imxp.certs import Issued


@pytest_twisted.async_yield_fixture
async def mesh_of(
    test_ca: Issued, server_cert: Callable[..., Issued], tmp_path: Path
) -> AsyncIterator[MeshBuilder]:
    # Not settled at the end: a relay caught in a loop would keep the mesh busy for ever.
    async with meshes(
        test_ca, server_cert, tmp_path, shutdown_grace=0.5, check_at_end=False
    ) as build:
        yield build


async def sleep(seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def send(
    app: App,
    recipients: list[str],
    options: Sequence[wire.Option] = (),
    *,
    recipient_options: Sequence[wire.Option] = (),
    body: bytes = b"hello",
    originator: str | None = None,
) -> None:
    """Data from ``app`` (as ``originator``, by default the endpoint it attached as);
    ``recipient_options`` go into every recipient element."""
    data = wire.Data(
        wire.Originator(originator or app.endpoint),
        [wire.Recipient(r, list(recipient_options)) for r in recipients],
        list(options),
        content=wire.Content.from_bytes(body, "text/plain"),
    )
    await app.channel.send(wire.encode(data))


def reported(app: App, trans_id: int) -> dict[str, list[int]]:
    """recipient -> every code reported for it under ``trans_id``."""
    found: dict[str, list[int]] = {}
    for report in app.reports:
        if report.trans_id == trans_id:
            for identity, code, _text in report.destinations:
                found.setdefault(identity, []).append(code)
    return found


def status(trans_id: int, target_hop: str = "final") -> wire.Option:
    return apex_options.make_status_request(trans_id, target_hop)


def hopping(no_more_than: int, trans_id: int, report_errors: bool = False) -> wire.Option:
    [option] = apex_options.with_data_hopping([], no_more_than, trans_id, report_errors)
    return option


def loop_settings(server_cert: Callable[..., Issued], b_trusts_a: bool = False) -> Settings:
    """a.test follows DNS for loop.test to b.test's relay; b.test has a stale static route
    sending loop.test back to a.test's relay. a.test trusts b.test (and, if asked, b.test
    trusts a.test), so what one relays the other accepts."""

    def b_settings(mesh: Mesh) -> Settings:
        a_mesh = mesh.relay("a.test").port("mesh")
        settings: Settings = {
            "identity": server_cert("b.test", "loop.test"),
            "routes": {"loop.test": f"127.0.0.1:{a_mesh}=a.test"},
            "max_hops": 4,
        }
        if b_trusts_a:
            settings["trusted_relays"] = ("a.test",)
        return settings

    return {"a.test": {"max_hops": 4, "trusted_relays": ("b.test",)}, "b.test": b_settings}


async def hand_overs_within(
    events: list[LogEvent], identity: str, seconds: float, ceiling: int
) -> int:
    """How often data for ``identity`` was handed to a next hop, watched for ``seconds``
    or until it passes ``ceiling`` (a storm, then)."""
    deadline = reactor.seconds() + seconds
    count = 0
    while reactor.seconds() < deadline:
        count = sum(
            1
            for e in named(events, "apex.verdict")
            if e["identity"] == identity and e["code"] == 250 and not e["final"]
        )
        if count > ceiling:
            break
        await sleep(0.05)
    return count


def hostile_at(relay: Any, answer: Callable[[Request], Any]) -> Callable[..., Any]:
    """An APEXChannel.message_received under which ``relay`` answers every data with
    ``answer(request)`` (or what it raises) instead of processing it."""
    original = APEXChannel.message_received

    def message_received(self: APEXChannel, request: Request) -> Any:
        if self.relay is relay and isinstance(wire.decode(request.message), wire.Data):
            return answer(request)
        return original(self, request)

    return message_received


# -- duplicate recipients ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_recipient_named_twice_is_delivered_and_reported_once(
    mesh_of: MeshBuilder,
) -> None:
    """DESIGN.md: "nothing is delivered twice" and one final statusResponse per recipient.
    The same endpoint named twice in one data (locally and remotely) is one recipient."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    barney = await mesh.attach(BARNEY)

    await send(fred, [WILMA, WILMA, BARNEY, BARNEY], [status(71)])
    await mesh.settle()

    assert len(wilma.data) == 1
    assert len(barney.data) == 1
    assert reported(fred, 71) == {WILMA: [250], BARNEY: [250]}


@pytest_twisted.ensureDeferred
async def test_a_recipient_spelt_twice_is_delivered_once(mesh_of: MeshBuilder) -> None:
    """§2.2.1: domains compare case-insensitively, so wilma@A.TEST is wilma@a.test."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    barney = await mesh.attach(BARNEY)

    await send(fred, [WILMA, "wilma@A.TEST", BARNEY, "barney@B.Test"], [status(72)])
    await mesh.settle()

    assert len(wilma.data) == 1
    assert len(barney.data) == 1


@pytest_twisted.ensureDeferred
async def test_a_status_request_on_a_second_spelling_of_a_remote_recipient_is_answered(
    mesh_of: MeshBuilder,
) -> None:
    """§5.1: the statusRequest rides only on "barney@B.TEST", which a.test folds into
    the earlier "barney@b.test" (§2.2.1). a.test hands barney on (no final verdict of
    its own), so the request must travel with the naming that goes on: else b.test
    never hears of it and fred never gets the report he asked for."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    data = wire.Data(
        wire.Originator(FRED),
        [wire.Recipient(BARNEY), wire.Recipient("barney@B.TEST", [status(73)])],
        [],
        content=wire.Content.from_bytes(b"hello", "text/plain"),
    )
    await fred.channel.send(wire.encode(data))
    await mesh.settle()

    assert len(barney.data) == 1
    assert reported(fred, 73) == {BARNEY: [250]}


# -- options: statusRequest, mustUnderstand, dataHopping ----------------------------------


@pytest_twisted.ensureDeferred
async def test_a_status_request_without_transid_is_no_internal_error(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """The §9.1 DTD requires an option's transID, and a statusResponse cannot carry 0
    (UNIQID). A statusRequest without one must be refused before ok (501), or answered:
    today the relay says ok, fails building the report (an apex.internal-error with a
    traceback) and the originator never hears about nobody@a.test's 550."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    await mesh.attach(WILMA)
    no_trans_id = dataclasses.replace(status(1), trans_id=0)

    try:
        await send(fred, [WILMA, "nobody@a.test"], [no_trans_id])
        accepted = True
    except BEEPError as e:
        assert e.code == 501
        accepted = False
    await mesh.settle()

    assert named(events, "apex.internal-error") == []
    if accepted:
        reports = [d for r in fred.reports for d in r.destinations]
        assert sorted(identity for identity, _, _ in reports) == ["nobody@a.test", WILMA]


@pytest_twisted.ensureDeferred
async def test_a_data_hopping_report_without_transid_is_no_internal_error(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """RFC 3342 §4: reportErrors reports under the dataHopping option's transID. Without
    one, the relay fails building that report after ok (apex.internal-error)."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    no_trans_id = dataclasses.replace(hopping(1, 1, report_errors=True), trans_id=0)

    try:
        await send(fred, [BARNEY], [no_trans_id])
    except BEEPError as e:
        assert e.code == 501
    await mesh.settle()

    assert named(events, "apex.internal-error") == []


@pytest_twisted.ensureDeferred
async def test_a_bug_after_the_hand_over_reports_the_outcome_unknown(
    mesh_of: MeshBuilder, events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of the relay's own that strikes once wilma's application has the data: the
    451 that keeps fred's promise of one report says the outcome is unknown (as a lost
    session does), not a failure fred would send again on - wilma has the data."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    reply_outcome = wire.reply_outcome
    bugs = [RuntimeError("a bug reading the application's ok")]

    def buggy(reply: Any, who: str) -> tuple[int, str]:
        if bugs:
            raise bugs.pop()
        return reply_outcome(reply, who)

    monkeypatch.setattr(wire, "reply_outcome", buggy)

    await send(fred, [WILMA], [status(74)])
    await mesh.settle()

    assert len(wilma.data) == 1
    [(code, text)] = [
        entry for (tid, _), entries in fred.outcomes().items() if tid == 74 for entry in entries
    ]
    assert code == 451
    assert wire.says_outcome_unknown(code, text)
    assert len(named(events, "apex.internal-error")) == 1


@pytest_twisted.ensureDeferred
async def test_no_more_than_zero_sets_no_hop_limit(mesh_of: MeshBuilder) -> None:
    """RFC 3342 §4 (and the §6 DTD's default): the option acts only when noMoreThan is
    non-zero. Today 0 is taken as a limit already spent: 554 at the first relay."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)

    await send(fred, [BARNEY], [hopping(0, 5), status(73)])
    await mesh.settle()

    assert reported(fred, 73) == {BARNEY: [250]}
    assert len(barney.data) == 1


@pytest.mark.parametrize("recipient", [WILMA, BARNEY])
@pytest_twisted.ensureDeferred
async def test_unknown_must_understand_final_option_fails_at_the_final_relay(
    mesh_of: MeshBuilder, recipient: str
) -> None:
    """§5: a targetHop='final' option applies to the relay that transmits the data to the
    recipient; mustUnderstand='true' and not understood there is an error in processing.
    The recipient must not get the data (504, as the relay answers at the first hop);
    today a.test (final for wilma) and b.test (final for barney) deliver it."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    apps = {WILMA: await mesh.attach(WILMA), BARNEY: await mesh.attach(BARNEY)}
    unknown = wire.Option("noSuchOption", target_hop="final", must_understand=True, trans_id=3)

    try:
        await send(fred, [recipient], [unknown, status(74)])
        refused = None
    except BEEPError as e:
        refused = e.code
    await mesh.settle()

    assert apps[recipient].data == []
    if refused is None:
        assert reported(fred, 74) == {recipient: [504]}
    else:
        assert refused == 504


@pytest_twisted.ensureDeferred
async def test_a_per_recipient_status_request_is_honoured(mesh_of: MeshBuilder) -> None:
    """§8.4: statusRequest may be present in "data" and "recipient" elements, and §4.4.4.1
    step 5.1 processes per-recipient options. Today only the per-data one is read: these
    recipients, delivered or not, are never reported on."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    await mesh.attach(WILMA)
    await mesh.attach(BARNEY)

    await send(fred, [WILMA, BARNEY, "nobody@a.test"], recipient_options=[status(75)])
    await mesh.settle()

    assert reported(fred, 75) == {WILMA: [250], BARNEY: [250], "nobody@a.test": [550]}


@pytest_twisted.ensureDeferred
async def test_unknown_must_understand_per_recipient_option_is_an_error(
    mesh_of: MeshBuilder,
) -> None:
    """§4.4.4.1 step 5.1 and §5: a per-recipient option for this relay, mustUnderstand and
    not understood, is an error in processing for that recipient. Today it is ignored and
    the data delivered."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    unknown = wire.Option("noSuchOption", target_hop="this", must_understand=True, trans_id=3)

    try:
        await send(fred, [WILMA], [status(76)], recipient_options=[unknown])
        refused = None
    except BEEPError as e:
        refused = e.code
    await mesh.settle()

    assert wilma.data == []
    if refused is None:
        assert reported(fred, 76) == {WILMA: [504]}
    else:
        assert refused == 504


@pytest.mark.parametrize("target_hop", ["this", "all"])
@pytest_twisted.ensureDeferred
async def test_unknown_must_understand_option_for_the_first_relay_is_refused(
    mesh_of: MeshBuilder, events: list[LogEvent], target_hop: str
) -> None:
    """§5, §4.4.4.1 step 2: a per-data option for this relay that it does not understand
    is refused before ok with 504, logged once; nothing travels."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    unknown = wire.Option("noSuchOption", target_hop=target_hop, must_understand=True, trans_id=3)

    with pytest.raises(BEEPError) as refused:
        await send(fred, [BARNEY], [unknown, status(77)])
    await mesh.settle()

    assert refused.value.code == 504
    assert barney.data == [] and fred.reports == []
    assert [e["code"] for e in named(events, "apex.refused")] == [504]


# -- loops: one error report, not a storm (RFC 3342 §4) ------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_report_caught_in_a_routing_loop_is_not_relayed_forever(
    mesh_of: MeshBuilder, server_cert: Callable[..., Issued], events: list[LogEvent]
) -> None:
    """Reports are data the relay originates itself (send_internal), and they get no hop
    limit. A report to an originator whose domain loops between two relays (a -> b -> a)
    circles for ever, thousands of hand-overs a second, until a relay stops."""
    mesh = await mesh_of(**loop_settings(server_cert))
    mesh.dns.set(
        "_apex-mesh._tcp.loop.test", srv(0, 0, mesh.relay("b.test").port("mesh"), "b.test.")
    )
    # A relay that proves loop.test binds at a.test and relays x@loop.test's data, asking
    # for status; nobody@a.test does not exist, so a.test reports 550 to x@loop.test.
    peer = await fake_relay(mesh, "a.test", server_cert("loop.test"), "loop.test")
    assert peer.answer == wire.OK()
    await peer.send("x@loop.test", ["nobody@a.test"], b"x", [status(78), hopping(8, 1)])

    count = await hand_overs_within(events, "x@loop.test", 1.0, ceiling=50)

    assert count <= 2 * 4  # each relay's max_hops, with room to spare


@pytest_twisted.ensureDeferred
async def test_data_from_a_peer_without_a_hop_limit_is_not_relayed_forever(
    mesh_of: MeshBuilder, server_cert: Callable[..., Issued], events: list[LogEvent]
) -> None:
    """Only data from an endpoint gets the relay's hop limit (relay.py adds dataHopping in
    the endpoint-relay mode only). Data a peer relay sends without one - RFC 3342 makes the
    option optional - circles for ever between two relays that trust each other."""
    mesh = await mesh_of(**loop_settings(server_cert, b_trusts_a=True))
    mesh.dns.set(
        "_apex-mesh._tcp.loop.test", srv(0, 0, mesh.relay("b.test").port("mesh"), "b.test.")
    )
    peer = await fake_relay(mesh, "a.test", server_cert("loop.test"), "loop.test")
    await peer.send("x@loop.test", ["y@loop.test"], b"x", options=[])

    count = await hand_overs_within(events, "y@loop.test", 1.0, ceiling=50)

    assert count <= 2 * 4


# -- hostile or hung next hops ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_next_hop_that_never_answers_still_gives_a_final_report(
    mesh_of: MeshBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A next hop that takes the MSG and never replies: a.test waits for ever (PeerPool has
    no deadline for the reply, unlike the endpoint delivery of Relay._answer), so fred never
    hears about betty and a.test stays busy (and its shutdown waits) until the session goes.
    Expected: after delivery_timeout, one final 4xx verdict, outcome unknown."""
    mesh = await mesh_of(**{"a.test": {"delivery_timeout": SHORT_DEADLINE}})
    c = mesh.relay("c.test")
    monkeypatch.setattr(
        APEXChannel, "message_received", hostile_at(c.service.relay, lambda _: defer.Deferred())
    )
    fred = await mesh.attach(FRED)
    try:
        await send(fred, [BETTY], [status(79)])
        try:
            await fred.wait("reports", 1, timeout=SHORT_DEADLINE + 10)
        except defer.CancelledError:
            pass
        assert [code // 100 for code in reported(fred, 79).get(BETTY, [])] == [4]
    finally:
        # Release a.test's link so that the mesh can stop.
        await c.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_next_hop_that_answers_one_data_never_does_not_hold_up_the_rest(
    mesh_of: MeshBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c.test takes one data and never answers it, then answers again. Replies come in
    order on a channel (RFC 3080 §2.6.1): kept, the link would leave every later data to
    c.test waiting behind that one until its deadline, for as long as it stays up."""
    mesh = await mesh_of(**{"a.test": {"delivery_timeout": SHORT_DEADLINE}})
    answers = [defer.Deferred]

    def answer(_: Request) -> Any:
        if answers:
            return answers.pop()()
        raise BEEPError(550, "not here")  # an answer: the point is that there is one

    c = mesh.relay("c.test").service.relay
    monkeypatch.setattr(APEXChannel, "message_received", hostile_at(c, answer))
    fred = await mesh.attach(FRED)

    await send(fred, [BETTY], [status(81)])
    await fred.wait("reports", 1, timeout=SHORT_DEADLINE + 10)
    await send(fred, [BETTY], [status(82)])
    await fred.wait("reports", 2, timeout=SHORT_DEADLINE + 10)

    assert reported(fred, 81) == {BETTY: [451]}
    assert reported(fred, 82) == {BETTY: [550]}
    await mesh.relay("c.test").service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_next_hop_that_never_answers_data_for_two_domains_gets_its_verdict(
    mesh_of: MeshBuilder, monkeypatch: pytest.MonkeyPatch, events: list[LogEvent]
) -> None:
    """Data for b.test and c.test, and c.test never answers. At the deadline the hand-over
    to c.test must be given up as for data to c.test alone: 451, c.test did not answer.
    The deadline's cancel stopped at the list of routes, which had long fired, so the
    data's carrying failed as a whole: an internal error logged, 451 "local error", and
    the hand-over left waiting, its answer-to-be an AlreadyCalledError."""
    mesh = await mesh_of(**{"a.test": {"delivery_timeout": SHORT_DEADLINE}})
    c = mesh.relay("c.test").service.relay
    monkeypatch.setattr(APEXChannel, "message_received", hostile_at(c, lambda _: defer.Deferred()))
    fred = await mesh.attach(FRED)
    await mesh.attach(BARNEY)

    await send(fred, [BARNEY, BETTY], [status(85)])
    await fred.wait("reports", 2, timeout=SHORT_DEADLINE + 10)

    assert reported(fred, 85) == {BARNEY: [250], BETTY: [451]}
    [(_, _, text)] = [
        d for r in fred.reports if r.trans_id == 85 for d in r.destinations if d[0] == BETTY
    ]
    assert text == "c.test did not answer in time; outcome unknown"
    assert named(events, "apex.internal-error") == []
    await mesh.relay("c.test").service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_report_made_as_the_grace_ends_reaches_another_domain(
    mesh_of: MeshBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b.test stops while barney's application, which took fred's data, never answers.
    When the grace is over b.test gives its verdict, and the report must reach fred at
    a.test (README, Stopping) - over a link b.test has yet to make, which the stop
    refused at once ("421 next hop unreachable"), and the report was lost."""
    mesh = await mesh_of(**{"b.test": {"delivery_timeout": 30.0}})
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    silent = barney.channel.handler
    answering = _AppChannel.message_received

    def message_received(self: _AppChannel, request: Request) -> Any:
        return defer.Deferred() if self is silent else answering(self, request)

    monkeypatch.setattr(_AppChannel, "message_received", message_received)
    await send(fred, [BARNEY], [status(84)])
    b = mesh.relay("b.test").service
    while not b.relay.in_flight:
        await sleep(0.02)

    await b.stopService()

    await fred.wait("reports", 1, timeout=3.0)
    assert reported(fred, 84) == {BARNEY: [451]}


class OneToMany:
    """Answers a data with two ANS and a NUL (RFC 3080 §2.6.2), which no data asks for."""


def answer_with(answer: Any, request: Request) -> Any:
    if isinstance(answer, BEEPError):
        raise answer
    if isinstance(answer, OneToMany):
        request.answer(wire.encode(wire.OK()))
        request.answer(wire.encode(wire.OK()))
        request.done()
        return None
    return answer


#: Answers to a data other than ok, and the code each means for its recipient.
NOT_OK = pytest.mark.parametrize(
    ("answer", "code"),
    [
        # An ERR coded 250 took nothing (RFC 3340 §10: refusals are 4xx or 5xx).
        (BEEPError(250, "taken, honestly"), 554),
        # An RPY that carries an error element is a refusal as an ERR is (§4.4.4.1 5.2).
        (Message(b"<error code='550'>no</error>", mgmt.BEEP_XML), 550),
        # An RPY that is no APEX element says nothing of what became of the data.
        (Message(b"HTTP/1.1 200 OK", "text/plain"), 451),
        # Nor do answers, even of ok: one ok is what takes a data (§4.4.4.1 5.2).
        (OneToMany(), 451),
    ],
    ids=["err-250", "rpy-error", "rpy-garbage", "ans-nul"],
)


@NOT_OK
@pytest_twisted.ensureDeferred
async def test_only_an_ok_from_the_next_hop_is_a_hand_over(
    mesh_of: MeshBuilder,
    monkeypatch: pytest.MonkeyPatch,
    events: list[LogEvent],
    answer: Any,
    code: int,
) -> None:
    """Taken for "relayed", such answers left fred without a final report (and an ERR
    250, taken for a passing refusal, had the data sent again seven times; answers, an
    internal error in the relay)."""
    mesh = await mesh_of()
    given: list[object] = []

    def answering(request: Request) -> Any:
        given.append(answer)
        return answer_with(answer, request)

    c = mesh.relay("c.test").service.relay
    monkeypatch.setattr(APEXChannel, "message_received", hostile_at(c, answering))
    fred = await mesh.attach(FRED)

    await send(fred, [BETTY], [status(83)])
    await fred.wait("reports", 1, timeout=3.0)

    assert reported(fred, 83) == {BETTY: [code]}
    assert len(given) == 1
    # A verdict of its own, not an internal error of the relay's.
    assert [e["event"] for e in events if "log_failure" in e] == []


@NOT_OK
@pytest_twisted.ensureDeferred
async def test_only_an_ok_from_the_application_is_a_delivery(
    mesh_of: MeshBuilder, monkeypatch: pytest.MonkeyPatch, answer: Any, code: int
) -> None:
    """§4.4.4.2: the application takes a data with ok or refuses it; any other answer was
    reported to the originator as delivered (250)."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    original = _AppChannel.message_received

    def answering(self: _AppChannel, request: Request) -> Any:
        if self.app is barney:
            return answer_with(answer, request)
        return original(self, request)

    monkeypatch.setattr(_AppChannel, "message_received", answering)
    await send(fred, [BARNEY], [status(85)])
    await fred.wait("reports", 1, timeout=3.0)

    assert reported(fred, 85) == {BARNEY: [code]}


@pytest_twisted.ensureDeferred
async def test_data_reported_undelivered_to_a_stalled_application_never_reaches_it(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """An application that stops reading (a process stopped, a laptop asleep): the data
    its window does not take wait in the relay's queue. At the deadline the originator is
    told 451; those still waiting were delivered all the same once it read again, so a
    sender that tried again had them twice. Its session is dropped instead: what was
    never sent is never delivered, and the report says so."""
    mesh = await mesh_of(**{"a.test": {"delivery_timeout": SHORT_DEADLINE}})
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    wilma.session.transport.pauseProducing()  # it reads nothing more, nor opens its window
    bodies = [bytes([65 + n]) * 40_000 for n in range(3)]
    for n, body in enumerate(bodies):
        await send(fred, [WILMA], [status(90 + n)], body=body)
    await fred.wait("reports", 3, timeout=SHORT_DEADLINE + 10)
    assert reported(fred, 90) == reported(fred, 91) == reported(fred, 92) == {WILMA: [451]}
    assert [e["identity"] for e in named(events, "apex.endpoint-dropped")] == [WILMA]

    wilma.session.transport.resumeProducing()
    await sleep(0.5)
    assert bodies[2] not in [d.content.body for d in wilma.data if d.content is not None]


@pytest_twisted.ensureDeferred
async def test_a_long_diagnostic_from_a_next_hop_does_not_lose_the_report(
    mesh_of: MeshBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A next hop refuses a data for 200 recipients with a 6000-octet diagnostic. a.test
    copies it into the report once per recipient, the report outgrows the 1 MiB message
    limit, fred's session refuses it (554) and fred never hears about any of them."""
    mesh = await mesh_of()

    def refuse(_: Request) -> None:
        raise BEEPError(554, "no " * 2000)

    monkeypatch.setattr(
        APEXChannel, "message_received", hostile_at(mesh.relay("c.test").service.relay, refuse)
    )
    fred = await mesh.attach(FRED)
    recipients = [f"u{n}@c.test" for n in range(200)]

    await send(fred, recipients, [status(80)])
    await mesh.settle()

    assert reported(fred, 80) == {r: [554] for r in recipients}


# -- attach, bind, terminate (§4.4.1-§4.4.3) ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_terminate_zero_ends_every_attachment_of_the_session(
    mesh_of: MeshBuilder,
) -> None:
    """§4.4.3 step 1: transID 0 terminates "all associations established by this
    application over this BEEP session". Today only those of the channel it came on end:
    fred/appl=x, attached on a second APEX channel of the same session, still gets data."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    holder: dict[str, App] = {}
    second = await fred.session.start_channel(
        [
            mgmt.ProfileElement(
                wire.APEX_URI, wire.encode(wire.Attach("fred/appl=x@a.test", 1)).body
            )
        ],
        handler=_AppChannel(holder),
    )
    assert isinstance(wire.decode(Message(second.start_reply or b"", mgmt.BEEP_XML)), wire.OK)
    holder["app"] = fred_x = App("fred/appl=x@a.test", fred.session, second)

    await fred.channel.send(wire.encode(wire.Terminate(0)))
    await send(wilma, [FRED, "fred/appl=x@a.test"], [status(81)])
    await mesh.settle()

    assert fred_x.data == [] and fred.data == []
    assert reported(wilma, 81) == {FRED: [450], "fred/appl=x@a.test": [450]}


@pytest.mark.parametrize(
    ("certified", "bind_as", "originator"),
    [
        ("xn--bcher-kva.test", "b\u00fccher.test", "x@xn--bcher-kva.test"),
        ("b.test", "b.test.", BARNEY),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_binding_holds_for_its_domain_however_it_is_written(
    mesh_of: MeshBuilder,
    server_cert: Callable[..., Issued],
    certified: str,
    bind_as: str,
    originator: str,
) -> None:
    """§2.2.1: a domain is a DNS name (the DTD's DOMAIN, RFC 2821), compared in one form.
    Relay.bind keeps ``bind.relay.lower()``: bound as the U-label bücher.test (which the
    certificate proves), the peer may not relay for x@xn--bcher-kva.test, i.e. for anyone
    of its domain; bound as b.test. (trailing dot) it is not even bound."""
    mesh = await mesh_of()
    betty = await mesh.attach(BETTY)
    peer = await fake_relay(mesh, "c.test", server_cert(certified), bind_as)
    assert peer.answer == wire.OK()

    await peer.send(originator, [BETTY], b"x")
    await mesh.settle()
    assert len(betty.data) == 1


@pytest_twisted.ensureDeferred
async def test_attaching_as_an_endpoint_already_attached_is_554(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """§4.4.1 step 5: another attach as fred@a.test - from another session, or on fred's
    own channel under a new transID - is 554, and the first attachment is unharmed."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)

    with pytest.raises(Exception) as other_session:
        await mesh.attach(FRED)
    assert getattr(other_session.value, "code", None) == 554
    with pytest.raises(BEEPError) as same_channel:
        await fred.channel.send(wire.encode(wire.Attach(FRED, 2)))
    assert same_channel.value.code == 554
    assert [e["code"] for e in named(events, "apex.refused")] == [554, 554]

    await send(wilma, [FRED], [status(82)])
    await mesh.settle()
    assert reported(wilma, 82) == {FRED: [250]}
    assert len(fred.data) == 1


@pytest_twisted.ensureDeferred
async def test_one_session_holds_no_more_than_max_attachments(
    mesh_of: MeshBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application may attach as any subaddress of its endpoint (§2.2, §4.5.1), and the
    relay holds each attachment until it is terminated or the session ends. A session
    attaching as ever more subaddresses, on one APEX channel or several, is refused (550)
    past MAX_ATTACHMENTS, so that the relay holds no more than that for it however long
    it stays; a terminate makes room for another."""
    monkeypatch.setattr(apex_relay, "MAX_ATTACHMENTS", 8, raising=False)
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    relay = mesh.relay("a.test").service.relay
    refused = []
    for n in range(2, 20):
        try:
            await fred.channel.send(wire.encode(wire.Attach(f"fred/appl={n}@a.test", n)))
        except BEEPError as e:
            refused.append(e.code)
    second = await fred.session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, wire.encode(wire.Attach("fred/x@a.test", 1)).body)],
        handler=_AppChannel({}),
    )
    answer = wire.decode(Message(second.start_reply or b"", mgmt.BEEP_XML))

    assert refused == [550] * 11
    assert isinstance(answer, wire.Error) and answer.code == 550
    assert len(relay.attached) == 8

    await fred.channel.send(wire.encode(wire.Terminate(2)))
    await fred.channel.send(wire.encode(wire.Attach("fred/appl=y@a.test", 30)))
    assert "fred/appl=y@a.test" in {str(e) for e in relay.attached}
    assert len(relay.attached) == 8


@pytest_twisted.ensureDeferred
async def test_data_or_bind_on_an_edge_channel_without_attach_is_537(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """§4.4.4.1 step 1, §4.5.1: an authenticated application that has not attached (on
    this channel) originates nothing, even as the endpoint it attached as on another
    channel; and bind is for the relay-relay mode. Each refusal is logged."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    bare = await fred.session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, None)], handler=_AppChannel({})
    )
    data = wire.Data(
        wire.Originator(FRED),
        [wire.Recipient(WILMA)],
        [status(83)],
        content=wire.Content.from_bytes(b"x", "text/plain"),
    )

    with pytest.raises(BEEPError) as unattached:
        await bare.send(wire.encode(data))
    with pytest.raises(BEEPError) as bind:
        await bare.send(wire.encode(wire.Bind("a.test", 1)))
    await mesh.settle()

    assert (unattached.value.code, bind.value.code) == (537, 537)
    assert wilma.data == [] and fred.reports == []
    assert [e["code"] for e in named(events, "apex.refused")] == [537, 537]


# -- the wire ----------------------------------------------------------------------------


def test_a_utf16_control_document_is_refused() -> None:
    """RFC 3080's application/beep+xml is UTF-8 unless a charset parameter says otherwise,
    and wire decodes UTF-8 only (a declared ISO-8859-1 is 500). A UTF-16 byte-order mark
    gets past that check: the data is accepted, and its inline content - kept as the
    UTF-16 octets received - is spliced into the UTF-8 document the relay forwards,
    which no next hop or application can parse."""
    text = (
        "<data content='#C'><originator identity='a@example.com'/>"
        "<recipient identity='b@example.com'/><data-content Name='C'><x/></data-content></data>"
    )
    with pytest.raises(wire.APEXError) as refused:
        wire.decode(Message(text.encode("utf-16"), wire.BEEP_XML))
    assert refused.value.code == 500


# -- a peer that has not logged in (RFC 3080 §3.1, §4.1; RFC 3340 §3) ---------------------


@pytest_twisted.ensureDeferred
async def test_a_peer_that_has_not_logged_in_sends_a_relay_no_long_message(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """Before a peer logs in, a relay takes TLS and SASL from it and nothing else: APEX
    is for those that have (attach after SASL, bind with a certificate that verified). A
    session that has not sends a message far longer than those need, in many frames,
    before TLS and again after it: each gets ERR 554 before it is complete, saying that it
    is the limit before authentication, logged once for the session. The session goes on:
    it logs in, attaches, and its data of nearly max_message_size goes through the mesh;
    the other sessions of the relay never noticed."""
    mesh = await mesh_of()
    wilma = await mesh.attach(WILMA)
    relay = mesh.relays["a.test"]
    config = SessionConfig(window=65536, idle_timeout=None, frame_size=2048)
    where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port("edge"))
    session = await where.connect(SessionFactory(Role.INITIATOR, [], config))
    mesh.peers.append(session)
    await session.greeted()
    long = Message(b"x" * 200_000, "application/octet-stream")

    tuning = await session.start_channel([TLS_URI])  # before TLS, the one profile offered
    with pytest.raises(BEEPError) as before_tls:
        await tuning.send(long)
    await tuning.close()
    await start_tls(session, client_options("a.test", [mesh.ca.certificate]))
    apex = await session.start_channel([wire.APEX_URI], handler=_AppChannel({}))
    with pytest.raises(BEEPError) as before_sasl:
        await apex.send(long)
    for refused in (before_tls.value, before_sasl.value):
        assert refused.code == 554
        assert refused.text.endswith(" octets before authentication"), refused.text
    (logged,) = named(events, "beep.message-too-large-unauthenticated")
    assert logged["peer"] == f"127.0.0.1:{session.transport.getHost().port}"
    await send(wilma, [WILMA], body=b"not disturbed")
    await wilma.wait("data", 1)

    await authenticate(session, ScramSHA256Client("fred", PASSWORD), identity="fred")
    holder: dict[str, App] = {}
    attached = await session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, wire.encode(wire.Attach(FRED, 1, [])).body)],
        handler=_AppChannel(holder),
    )
    assert isinstance(wire.decode(Message(attached.start_reply or b"", mgmt.BEEP_XML)), wire.OK)
    fred = holder["app"] = App(FRED, session, attached)
    barney = await mesh.attach(BARNEY)
    body = b"y" * ((1 << 20) - 16384)  # max_message_size, less room for the markup
    trans_id = await fred.send([BARNEY], body)
    await fred.wait("reports", 1)
    assert codes(fred, trans_id) == {BARNEY: 250}
    assert [data.content.body for data in barney.data if data.content] == [body]
    assert len(named(events, "beep.message-too-large-unauthenticated")) == 1
    assert named(events, "beep.message-too-large") == []


# -- SASL ANONYMOUS (allow_anonymous) ------------------------------------------------------


# As imxp.config.offered_mechanisms makes them for allow_anonymous = true.
ANONYMOUS_TOO = {"allow_anonymous": True, "sasl_mechanisms": ["SCRAM-SHA-256", "ANONYMOUS"]}


async def anonymous_login(mesh: Mesh, domain: str) -> Session:
    """A session to ``domain``'s edge that logs in with ANONYMOUS (RFC 4505)."""
    where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", mesh.relays[domain].port("edge"))
    config = SessionConfig(window=65536, idle_timeout=None)
    session = await where.connect(SessionFactory(Role.INITIATOR, [], config))
    mesh.peers.append(session)
    await start_tls(session, client_options(domain, [mesh.ca.certificate]))
    await authenticate(session, AnonymousClient("guest"))
    return session


async def attach_answer(session: Session, endpoint: str) -> wire.APEXElement:
    """What the relay answers an attach as ``endpoint`` riding on the APEX start."""
    attach = wire.encode(wire.Attach(endpoint, 1, [])).body
    channel = await session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, attach)], handler=_AppChannel({})
    )
    return wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML))


@pytest_twisted.ensureDeferred
async def test_an_anonymous_login_attaches_as_no_account(mesh_of: MeshBuilder) -> None:
    """ANONYMOUS logs in as the placeholder identity ``anonymous``, which names nobody
    (imxp.beep.saslmech.Success). It may attach as anonymous@a.test or a subaddress, but
    not as anyone with an account - not even one called "anonymous", whose data a peer
    without a password would otherwise take."""
    mesh = await mesh_of(**{"a.test": ANONYMOUS_TOO})
    guest = await anonymous_login(mesh, "a.test")

    refused = await attach_answer(guest, FRED)
    assert isinstance(refused, wire.Error)
    assert (refused.code, refused.text) == (537, f"an anonymous login may not attach as {FRED}")
    assert isinstance(await attach_answer(guest, "anonymous/guest@a.test"), wire.OK)

    mesh.relays["a.test"].users.add("anonymous", PASSWORD)
    other = await anonymous_login(mesh, "a.test")
    refused = await attach_answer(other, "anonymous/other@a.test")
    assert isinstance(refused, wire.Error)
    assert refused.code == 537
    # The account's owner logs in with the password and attaches as it.
    owner = await mesh.attach("anonymous@a.test")
    assert owner.endpoint == "anonymous@a.test"


@pytest_twisted.ensureDeferred
async def test_anonymous_logins_count_against_the_per_address_limit(mesh_of: MeshBuilder) -> None:
    """A login says who a session is, so it no longer counts against its address's
    sessions (max_sessions_per_peer). ANONYMOUS says nobody: such sessions could be
    anyone's, many times over, and still count; else with allow_anonymous one address
    could open sessions without end."""
    mesh = await mesh_of(**{"a.test": {**ANONYMOUS_TOO, "max_sessions_per_peer": 2}})
    await anonymous_login(mesh, "a.test")
    await anonymous_login(mesh, "a.test")

    with pytest.raises(BEEPError) as refused:
        await anonymous_login(mesh, "a.test")
    assert refused.value.code == 421
    assert "too many sessions from 127.0.0.1" in refused.value.text


@pytest_twisted.ensureDeferred
async def test_an_anonymous_originator_gets_its_reports(mesh_of: MeshBuilder) -> None:
    """An endpoint attached with no account behind it is attached all the same: the
    statusResponses it asked for reach it (RFC 3340 §5.1, §6.2), and so does data."""
    mesh = await mesh_of(**{"a.test": ANONYMOUS_TOO})
    wilma = await mesh.attach(WILMA)
    guest_session = await anonymous_login(mesh, "a.test")
    holder: dict[str, App] = {}
    attach = wire.encode(wire.Attach("anonymous/guest@a.test", 1, [])).body
    channel = await guest_session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, attach)], handler=_AppChannel(holder)
    )
    assert isinstance(wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML)), wire.OK)
    guest = holder["app"] = App("anonymous/guest@a.test", guest_session, channel)

    await send(guest, [WILMA, "nobody@a.test"], [status(1)])
    await send(wilma, [guest.endpoint, "anonymous/gone@a.test"], [status(2)])
    await mesh.settle()

    assert reported(guest, 1) == {WILMA: [250], "nobody@a.test": [550]}
    assert reported(wilma, 2) == {guest.endpoint: [250], "anonymous/gone@a.test": [550]}
    assert [d.originator.identity for d in guest.data] == [WILMA]


@pytest_twisted.ensureDeferred
async def test_an_originator_sending_as_a_subaddress_gets_its_reports(
    mesh_of: MeshBuilder,
) -> None:
    """fred, attached as fred@a.test, may send as fred/appl=x@a.test (§4.5.1); the
    statusResponses to that subaddress, attached by nobody, reach fred. Other data for
    it does not: no application is attached as it (§4.4.4.1 step 5.3)."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    await mesh.attach(BARNEY)

    as_x = "fred/appl=x@a.test"
    await send(fred, [WILMA, BARNEY], [status(1)], originator=as_x)
    await send(wilma, [as_x], [status(2)])
    await mesh.settle()

    assert reported(fred, 1) == {WILMA: [250], BARNEY: [250]}
    assert reported(wilma, 2) == {as_x: [450]}
    assert fred.data == []


@pytest_twisted.ensureDeferred
async def test_a_refusal_does_not_hold_back_the_reports_on_what_one_sent(
    mesh_of: MeshBuilder,
) -> None:
    """fred refuses data from b.test, yet sends there asking for status: b.test's
    statusResponses are his answers, and reach him (§6.2); b.test's data does not."""
    mesh = await mesh_of(**{"a.test": {"refusals": {FRED: ["@b.test"]}}})
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)

    await send(fred, [BARNEY, "nobody@b.test"], [status(1)])
    await send(barney, [FRED], [status(2)])
    await mesh.settle()

    assert reported(fred, 1) == {BARNEY: [250], "nobody@b.test": [550]}
    assert reported(barney, 2) == {FRED: [537]}
    assert fred.data == []


async def linked(mesh_of: MeshBuilder) -> tuple[Mesh, App, APEXChannel]:
    """A mesh with fred and barney attached, and one data from fred to barney reported:
    the mesh, fred, and the APEX channel on which b.test's relay took a.test's bind."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    await mesh.attach(BARNEY)
    await send(fred, [BARNEY], [status(1)])
    await mesh.settle()
    [b_side] = [
        handler
        for session in mesh.relay("b.test").service.sessions
        for channel in session.channels.values()
        if isinstance(handler := channel.handler, APEXChannel)
        and "a.test" in handler.bindings.values()
    ]
    return mesh, fred, b_side


@pytest_twisted.ensureDeferred
async def test_a_next_hop_ending_our_binding_is_answered_ok_and_bound_anew(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """A relay may end the binding a peer made (RFC 3340 §4.4.3, the third exchange):
    the peer answers ok (step 3) and sends no more data on that link, which would be
    refused; the next data goes on a new link, bound again."""
    mesh, fred, b_side = await linked(mesh_of)
    [trans_id] = b_side.bindings
    b_side.bindings.clear()  # as another implementation's relay would, idle for long
    assert b_side.channel is not None

    answer = await b_side.channel.send(wire.encode(wire.Terminate(trans_id, 421, "idle")))
    await send(fred, [BARNEY], [status(2)])
    await mesh.settle()

    assert wire.decode(answer) == wire.OK()
    assert [e["domain"] for e in named(events, "apex.unbound")] == ["a.test"]
    assert reported(fred, 2) == {BARNEY: [250]}
    assert [e["domain"] for e in named(events, "apex.bound")].count("a.test") == 2


@pytest_twisted.ensureDeferred
async def test_a_next_hop_ending_every_association_is_answered_ok_and_bound_anew(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """RFC 3340 §4.4.3 step 1: a terminate with transID 0 ends every association made
    over the BEEP session, our binding on the link among them. The next hop refuses
    what would still come on that link (537), so the next data goes on a new link,
    bound again, as for a terminate naming the binding's own transID."""
    mesh, fred, b_side = await linked(mesh_of)
    b_side.bindings.clear()  # as another implementation's relay would, going away
    assert b_side.channel is not None

    answer = await b_side.channel.send(wire.encode(wire.Terminate(0, 421, "going away")))
    await send(fred, [BARNEY], [status(2)])
    await mesh.settle()

    assert wire.decode(answer) == wire.OK()
    assert reported(fred, 2) == {BARNEY: [250]}
    assert [e["domain"] for e in named(events, "apex.unbound")] == ["a.test"]
    assert [e["domain"] for e in named(events, "apex.bound")].count("a.test") == 2


@pytest_twisted.ensureDeferred
async def test_a_next_hop_binding_with_the_transid_of_our_binding_is_refused(
    mesh_of: MeshBuilder,
) -> None:
    """RFC 3340 §4.4.2 step 1: a bind whose transID names an operation not yet terminated
    on the channel gets 555, and our own bind on the link we opened is one. Taken, a
    terminate naming that transID would end one binding or the other, as it came first."""
    mesh, fred, b_side = await linked(mesh_of)
    [trans_id] = b_side.bindings
    assert b_side.channel is not None

    with pytest.raises(BEEPError) as refused:
        await b_side.channel.send(wire.encode(wire.Bind("b.test", trans_id, [])))
    await send(fred, [BARNEY], [status(2)])
    await mesh.settle()

    assert refused.value.code == 555
    assert reported(fred, 2) == {BARNEY: [250]}


@pytest_twisted.ensureDeferred
async def test_a_report_for_an_originator_away_for_a_moment_waits_for_it(
    mesh_of: MeshBuilder, events: list[LogEvent]
) -> None:
    """A report from another relay for an endpoint of ours that is not attached is
    refused for now (450), and its relay tries again: taken, it would end in the verdict
    450 and be lost, as no report is made of a report (§6.2). So the originator still gets
    its one final report (§5.1) when its application was away a moment - its relay
    restarting, or its connection lost and made again - as the reports of what it sent
    just before came back."""
    mesh = await mesh_of()
    fred = await mesh.attach(FRED)
    a_relay = mesh.relay("a.test").service.relay
    fred.session.disconnect()
    await until(lambda: Endpoint.parse(FRED) not in a_relay.attached, "fred detached")

    mesh.relay("b.test").service.relay.reports.report(Endpoint.parse(FRED), 77, [(BARNEY, 250, "")])
    await until(lambda: bool(named(events, "apex.report-held-back")), "the report refused")
    again = await mesh.attach(FRED)
    await again.wait("reports", 1)
    await mesh.settle()

    assert again.outcomes() == {(77, BARNEY): [(250, "")]}
    [held] = {(e["recipients"][0], e["text"]) for e in named(events, "apex.report-held-back")}
    assert held == (FRED, "endpoint not attached; try again later")
    # The way reports wait, not a fault: no warning for each attempt.
    assert not named(events, "apex.refused")
