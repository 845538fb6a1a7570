"""The relay's control socket: how ``imxp status`` and ``imxp reload`` reach a running relay.

A Unix socket (``control_socket``, by default ``control`` in the state directory) made with
mode 0600 in a directory of mode 0700: whoever can use it is the relay's user or root, the
same people who could signal the process. So there is no login; what it offers is what
SIGUSR1 and SIGHUP already do, with the answer coming back to the one who asked, as
Postfix's ``postqueue`` and Prosody's ``prosodyctl`` answer theirs.

The exchange is one line each way: a command (``status`` or ``reload``), then a JSON
object, after which the relay closes the connection. Every answer has ``ok`` (true or
false); one that is not ok has ``error``, the reason in words.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from imxp import logs

__all__ = ["COMMANDS", "ControlError", "ControlFactory", "ask", "listen"]

log = logs.Logger(namespace="imxp.control")

#: The commands, each with what it does.
COMMANDS = {
    "status": "what the relay is doing: sessions, attached endpoints, data in flight, next hops",
    "reload": "read the configuration and the TLS files again, as SIGHUP does",
}

#: Seconds a connection may take to send its command; the answer, made at once, follows.
COMMAND_TIMEOUT = 10.0

#: A command is a short word: a longer line is nobody's command.
MAX_COMMAND = 64

#: An answer with every next hop of a busy relay fits many times over.
MAX_ANSWER = 16 * 1024 * 1024

#: The Unix socket paths the kernel takes: sun_path holds 108 octets with the final NUL.
MAX_PATH = 107
_TOO_LONG = f"the path is longer than {MAX_PATH} octets; set control_socket to a shorter one"

Answer = Mapping[str, Any]


class ControlError(Exception):
    """No answer from the relay's control socket; ``unreachable`` when no relay is there
    (or it took too long), else the socket could not be used (permission, not a socket)."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class _ControlProtocol(LineOnlyReceiver, TimeoutMixin):
    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND
    factory: ControlFactory

    def connectionMade(self) -> None:
        self.setTimeout(COMMAND_TIMEOUT)

    def timeoutConnection(self) -> None:
        self._answer({"ok": False, "error": f"no command within {COMMAND_TIMEOUT:g} s"})

    def lineReceived(self, line: bytes) -> None:
        self.setTimeout(None)
        command = line.strip().decode("ascii", "replace")
        self._answer(self.factory.answer(command))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer({"ok": False, "error": f"a command is at most {MAX_COMMAND} octets"})

    def _answer(self, answer: Answer) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(answer).encode("utf-8") + b"\n")
        self.transport.loseConnection()


class ControlFactory(Factory):
    """Answers the commands of :data:`COMMANDS`: ``status`` from ``status``, ``reload``
    by calling ``reload``, which returns whether the relay reloaded and what it logged."""

    protocol = _ControlProtocol
    noisy = False

    def __init__(
        self, status: Callable[[], Answer], reload: Callable[[str], tuple[bool, str]]
    ) -> None:
        self._status = status
        self._reload = reload

    def answer(self, command: str) -> Answer:
        if command == "status":
            return {"ok": True, "status": self._status()}
        if command == "reload":
            reloaded, said = self._reload("imxp reload")
            return {"ok": reloaded, "said": said} if reloaded else {"ok": False, "error": said}
        log.warn(
            "control socket: unknown command {command!r}",
            command=command[:MAX_COMMAND],
            event="imxp.control-refused",
        )
        return {
            "ok": False,
            "error": f"unknown command {command[:MAX_COMMAND]!r}; known: {', '.join(COMMANDS)}",
        }


async def listen(reactor: Any, path: Path, factory: ControlFactory) -> IListeningPort | None:
    """Listen on the control socket at ``path``, or log why not and return None: the relay
    carries data without it. A lock file beside it (``path``.lock) tells a socket left by a
    relay that died, which is replaced, from one that another relay is using: the lock is
    the kernel's (flock), gone with the process that held it, whatever became of its pid."""
    where = str(path)
    if _too_long(path):
        reason = _TOO_LONG
    else:
        try:
            lock = _lock(path.with_name(path.name + ".lock"))
        except OSError as e:
            reason = f"cannot make its lock file: {e.strerror or e}"
        else:
            if lock is None:
                return _not_listening(where, "another running relay has it (its lock is held)")
            if path.is_socket():
                path.unlink()  # left by a relay that died
            endpoint = endpoints.UNIXServerEndpoint(reactor, where, mode=0o600)
            try:
                port: IListeningPort = await endpoint.listen(factory)
            except Exception as e:  # CannotListenError, with the OSError as reason
                os.close(lock)
                reason = _listen_failure(e)
            else:
                log.info(
                    "control socket for imxp status and imxp reload: {path}",
                    path=where,
                    event="imxp.control-listening",
                )
                return _LockedPort(port, lock)
    return _not_listening(where, reason)


def _too_long(path: Path) -> bool:
    # The octets the kernel gets: a name that is not UTF-8 keeps its own (PEP 383).
    return len(os.fsencode(path)) > MAX_PATH


def _not_listening(where: str, reason: str) -> None:
    log.error(
        "no control socket at {path}: {reason}; imxp status and imxp reload cannot reach "
        "this relay (SIGUSR1 and SIGHUP still work)",
        path=where,
        reason=reason,
        event="imxp.control-failed",
    )
    return None


def _lock(path: Path) -> int | None:
    """An open descriptor of ``path`` locked for this process, or None if another holds
    the lock."""
    if path.is_symlink():
        path.unlink()  # the pid lock (Twisted's FilesystemLock) earlier versions made
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@implementer(IListeningPort)
class _LockedPort:
    """The control socket's port, holding its lock until it stops listening."""

    def __init__(self, port: IListeningPort, lock: int) -> None:
        self._port = port
        self._lock: int | None = lock

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self._port.stopListening).addBoth(self._unlock)

    def getHost(self) -> Any:
        return self._port.getHost()

    def _unlock(self, result: object) -> object:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        return result


def _listen_failure(e: Exception) -> str:
    reason = getattr(e, "socketError", None) or e
    if isinstance(reason, OSError):
        return reason.strerror or str(reason)
    return str(reason)


def ask(path: Path, command: str, timeout: float = 30.0) -> Answer:
    """Send ``command`` to the relay whose control socket is at ``path``; its answer.

    Blocking, for the command line. Raises :class:`ControlError` when there is no answer.
    """
    if _too_long(path):
        # The relay could not have made it either (see listen), and said so in its log.
        raise ControlError(f"no relay answers at {path}: {_TOO_LONG}", unreachable=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(path))
            connection.sendall(command.encode("ascii") + b"\n")
            received = bytearray()
            while chunk := connection.recv(65536):
                received += chunk
                if len(received) > MAX_ANSWER:
                    raise ControlError(f"{path}: the answer is too long", unreachable=False)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"no relay answers at {path}: is it running, with this configuration?",
                unreachable=True,
            ) from None
        except TimeoutError:
            raise ControlError(
                f"the relay at {path} did not answer within {timeout:g} s", unreachable=True
            ) from None
        except PermissionError:
            raise ControlError(
                f"{path}: permission denied; run this as the relay's user or root",
                unreachable=False,
            ) from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}", unreachable=False) from None
    try:
        answer = json.loads(received)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError(f"{path}: the answer is not the relay's", unreachable=False)
    return answer
