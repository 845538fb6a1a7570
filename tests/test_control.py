"""The relay's control socket (imxp.control): one command in, one JSON answer out, and every
wrong command answered with its reason and logged, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from imxp import control
from imxp.cli import main


class _Relay:
    def __init__(self, reloads: bool = True) -> None:
        self.reloads = reloads
        self.asked: list[str] = []

    def status(self) -> dict[str, Any]:
        self.asked.append("status")
        return {"domain": "a.test", "in_flight": 3}

    def reload(self, trigger: str) -> tuple[bool, str]:
        self.asked.append(trigger)
        if self.reloads:
            return True, f"{trigger}: reloaded"
        return False, f"{trigger}: not reloaded, the relay goes on as it was: bad file"


def _exchange(
    sent: bytes, relay: _Relay | None = None, clock: task.Clock | None = None
) -> tuple[dict[str, Any] | None, StringTransport]:
    relay = relay or _Relay()
    protocol = control.ControlFactory(relay.status, relay.reload).buildProtocol(None)
    assert protocol is not None
    if clock is not None:
        protocol.callLater = clock.callLater  # type: ignore[attr-defined]
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(sent)
    written = transport.value()
    return (json.loads(written) if written else None), transport


def test_status_is_answered_with_the_relays_status_and_the_connection_closed() -> None:
    answer, transport = _exchange(b"status\n")
    assert answer == {"ok": True, "status": {"domain": "a.test", "in_flight": 3}}
    assert transport.disconnecting


def test_reload_answers_what_the_reload_said_or_why_it_was_refused() -> None:
    relay = _Relay()
    answer, _ = _exchange(b"reload\r\n", relay)
    assert answer == {"ok": True, "said": "imxp reload: reloaded"}
    assert relay.asked == ["imxp reload"]
    answer, _ = _exchange(b"reload\n", _Relay(reloads=False))
    assert answer is not None and answer["ok"] is False
    assert answer["error"].endswith("not reloaded, the relay goes on as it was: bad file")


@pytest.mark.parametrize("sent", [b"stop\n", b"\xff\xfe\n", b"\n"])
def test_an_unknown_command_is_refused_with_the_known_ones_and_logged(sent: bytes) -> None:
    relay = _Relay()
    with capturedLogs() as events:
        answer, transport = _exchange(sent, relay)
    assert answer is not None and answer["ok"] is False
    assert "unknown command" in answer["error"] and "known: status, reload" in answer["error"]
    assert transport.disconnecting and relay.asked == []
    assert [e["event"] for e in events] == ["imxp.control-refused"]


def test_an_overlong_line_is_refused_without_being_acted_on() -> None:
    relay = _Relay()
    answer, transport = _exchange(b"status" * 100 + b"\n", relay)
    assert answer == {"ok": False, "error": f"a command is at most {control.MAX_COMMAND} octets"}
    assert transport.disconnecting and relay.asked == []


def test_a_connection_that_sends_no_command_is_closed() -> None:
    clock = task.Clock()
    answer, transport = _exchange(b"sta", clock=clock)
    assert answer is None and not transport.disconnecting
    clock.advance(control.COMMAND_TIMEOUT)
    assert json.loads(transport.value())["ok"] is False
    assert transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_a_path_too_long_for_a_unix_socket_is_logged_and_the_relay_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / ("x" * 120)
    relay = _Relay()
    with capturedLogs() as events:
        port = await control.listen(
            reactor, path, control.ControlFactory(relay.status, relay.reload)
        )
    assert port is None and not path.exists()
    (event,) = [e for e in events if e.get("event") == "imxp.control-failed"]
    assert "longer than 107 octets" in event["reason"]


@pytest_twisted.ensureDeferred
async def test_ask_gets_the_answer_over_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "control"
    relay = _Relay()
    port = await control.listen(reactor, path, control.ControlFactory(relay.status, relay.reload))
    assert port is not None
    try:
        answer = await threads.deferToThread(control.ask, path, "status")
        assert answer == {"ok": True, "status": {"domain": "a.test", "in_flight": 3}}
    finally:
        await port.stopListening()
    assert not path.exists()


def test_ask_says_when_no_relay_answers_or_the_answer_is_not_a_relays(tmp_path: Path) -> None:
    with pytest.raises(control.ControlError, match="no relay answers at") as raised:
        control.ask(tmp_path / "control", "status")
    assert raised.value.unreachable
    # A path no Unix socket can have: the relay could not listen there either, and the
    # operator is told what to change rather than the socket module's "path too long".
    deep = tmp_path / ("d" * 110) / "control"
    with pytest.raises(control.ControlError) as raised:
        control.ask(deep, "status")
    assert str(raised.value) == (
        f"no relay answers at {deep}: the path is longer than 107 octets; set "
        "control_socket to a shorter one"
    )
    assert raised.value.unreachable
    # A directory name that is not UTF-8 (PEP 383 keeps its octets): measured as the
    # kernel gets it, not a UnicodeEncodeError.
    strange = tmp_path / "\udcff" / "control"
    with pytest.raises(control.ControlError, match="no relay answers at") as raised:
        control.ask(strange, "status")
    assert raised.value.unreachable
    # Something else listens there and answers nonsense.
    path = tmp_path / "other"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()

        def nonsense() -> None:
            connection, _ = other.accept()
            with connection:
                connection.recv(100)
                connection.sendall(b"220 hello\r\n")

        answering = threading.Thread(target=nonsense)
        answering.start()
        with pytest.raises(control.ControlError, match="not the relay's") as raised:
            control.ask(path, "status", timeout=5)
        answering.join()
    assert not raised.value.unreachable


def test_imxp_status_shows_a_next_hops_failure_without_its_control_characters(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The failure's text can be a next hop's own error text: an escape sequence in it must
    # not act on the operator's terminal, nor a newline make a line of the peer's making.
    hop = {
        "peer": "evil.test",
        "where": "192.0.2.7:912",
        "state": "backing off",
        "queued": 667,
        "failure": "550 no\x1b[2J\nnext hop c.test at 192.0.2.8:912: linked",
        "retry_in": 3.2,
    }
    status = {
        "domain": "a.test",
        "sessions": 2,
        "logged_in": 1,
        "attached": 1,
        "to_endpoints": 0,
        "in_flight": 1,
        "up": 3725.0,
        "expires": "2027-02-19T08:00:00+00:00",
        "accepting": True,
        "next_hops": [hop],
    }
    asked: list[tuple[Path, str]] = []

    def ask(path: Path, command: str) -> dict[str, Any]:
        asked.append((path, command))
        return {"ok": True, "status": status}

    monkeypatch.setattr(control, "ask", ask)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert asked == [(Path.cwd() / "imxp-state" / "control", "status")]
    assert out.startswith("relay for a.test: up 1 h 2 min, accepting data\n")
    assert "data in flight: 1\n" in out and "next hops: 1\n" in out
    assert "\x1b" not in out and "550 no\\x1b[2J\\x0anext hop c.test" in out
    assert out.count("\n") == 6


@pytest_twisted.ensureDeferred
async def test_a_socket_left_by_a_relay_that_died_is_replaced_and_a_live_ones_kept(
    tmp_path: Path,
) -> None:
    """Whatever pid an earlier lock names (a relay killed, its pid since reused, or pid
    1 again in a container), only a running relay's lock keeps the socket from the next."""
    path = tmp_path / "control"
    os.symlink("1", tmp_path / "control.lock")  # the pid lock earlier versions made
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # and the socket, with nobody listening on it
    relay = _Relay()
    port = await control.listen(reactor, path, control.ControlFactory(relay.status, relay.reload))
    assert port is not None
    try:
        answer = await threads.deferToThread(control.ask, path, "status")
        assert answer["ok"]
        with capturedLogs() as events:
            second = await control.listen(
                reactor, path, control.ControlFactory(relay.status, relay.reload)
            )
        assert second is None
        (event,) = [e for e in events if e.get("event") == "imxp.control-failed"]
        assert event["reason"] == "another running relay has it (its lock is held)"
    finally:
        await port.stopListening()
    again = await control.listen(reactor, path, control.ControlFactory(relay.status, relay.reload))
    assert again is not None
    await again.stopListening()
