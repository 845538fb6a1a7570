"""imxp.bootstrap: what a first start creates, what later starts find, and what is refused."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.logger import Logger, LogLevel, formatEvent

from imxp.beep.users import UserStore
from imxp.bootstrap import Prepared, load_tls, prepare
from imxp.certs import Issued, create_ca, issue_server
from imxp.config import Config, ConfigError

Events = list[dict[str, Any]]


@pytest.fixture
def events() -> Events:
    return []


@pytest.fixture
def log(events: Events) -> Logger:
    return Logger(namespace="imxp.bootstrap", observer=events.append)


def config(tmp_path: Path, **options: Any) -> Config:
    """A configuration as if read from ``tmp_path/imxp.toml`` (state in tmp_path/state)."""
    options.setdefault("state_dir", "state")
    return Config(source=str(tmp_path / "imxp.toml"), **options)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verify(prepared: Prepared, subject: x509.DNSName | x509.IPAddress) -> None:
    """Verify the relay certificate as a peer would: chain to the trust roots, name match."""
    verifier = (
        PolicyBuilder().store(Store(list(prepared.trust_roots))).build_server_verifier(subject)
    )
    verifier.verify(prepared.identity.certificate, list(prepared.identity.chain))


def write_issued(issued: Issued, directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    issued.write(cert, key)
    return cert, key


def key_of_another_certificate() -> bytes:
    return issue_server(create_ca("another CA"), ["localhost"]).key_pem()


def replace_with_a_file(directory: Path) -> None:
    directory.rename(directory.with_name("moved"))
    directory.write_text("")


def test_first_start_creates_state_dir_ca_certificate_and_user_file(
    tmp_path: Path, log: Logger, events: Events
) -> None:
    prepared = prepare(config(tmp_path, domain="a.test"), log)
    state = tmp_path / "state"

    assert prepared.state_dir == state
    assert mode(state) == 0o700
    assert prepared.created == ("state_dir", "ca", "certificate", "users")
    assert mode(state / "ca.key") == 0o600
    assert mode(state / "relay.key") == 0o600
    assert prepared.certificate_path == state / "relay.pem"
    assert prepared.key_path == state / "relay.key"
    assert prepared.trust_paths == (state / "ca.pem",)
    assert prepared.users_path == state / "users"

    # The relay certificate names the domain and chains to the development CA, which is
    # what the relay trusts.
    verify(prepared, x509.DNSName("a.test"))
    assert prepared.trust_roots[0].subject.rfc4514_string() == "CN=imxp development CA (a.test)"

    assert isinstance(prepared.users, UserStore)
    assert prepared.users.usernames() == []
    assert mode(state / "users") == 0o600

    assert [e["what"] for e in events] == ["state_dir", "ca", "certificate", "users"]
    for event in events:
        assert event["event"] == "imxp.bootstrap"
        assert event["log_level"] == LogLevel.info
        assert event["path"] in formatEvent(event)
    assert events[1]["path"] == str(state / "ca.pem")
    assert "copy ca.pem to endpoints that should trust this relay" in formatEvent(events[1])


def test_a_relay_for_localhost_is_also_certified_for_127_0_0_1(tmp_path: Path, log: Logger) -> None:
    prepared = prepare(config(tmp_path), log)
    verify(prepared, x509.DNSName("localhost"))
    verify(prepared, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def test_a_second_start_creates_nothing_and_says_nothing(
    tmp_path: Path, log: Logger, events: Events
) -> None:
    first = prepare(config(tmp_path, domain="a.test"), log)
    logged = len(events)
    second = prepare(config(tmp_path, domain="a.test"), log)
    assert second.created == ()
    assert len(events) == logged
    assert second.identity.certificate == first.identity.certificate
    assert second.trust_roots == first.trust_roots


def test_a_deleted_relay_certificate_is_reissued_by_the_same_ca(
    tmp_path: Path, log: Logger, events: Events
) -> None:
    first = prepare(config(tmp_path, domain="a.test"), log)
    first.certificate_path.unlink()
    first.key_path.unlink()
    del events[:]
    second = prepare(config(tmp_path, domain="a.test"), log)
    assert second.created == ("certificate",)
    assert [e["what"] for e in events] == ["certificate"]
    assert second.identity.certificate != first.identity.certificate
    assert second.trust_roots == first.trust_roots
    verify(second, x509.DNSName("a.test"))


def test_configured_files_are_used_and_no_development_ca_is_made(
    tmp_path: Path, log: Logger, test_ca: Issued, server_cert: Callable[..., Issued]
) -> None:
    tls = tmp_path / "tls"
    cert, key = write_issued(server_cert("a.test"), tls, "relay")
    (tls / "ca.pem").write_bytes(test_ca.cert_pem())
    prepared = prepare(
        config(
            tmp_path,
            domain="a.test",
            tls_certificate=str(cert),
            tls_key=str(key),
            tls_trust=[str(tls / "ca.pem")],
        ),
        log,
    )
    assert prepared.created == ("state_dir", "users")
    assert not (tmp_path / "state" / "ca.pem").exists()
    assert prepared.identity.certificate == server_cert("a.test").certificate
    assert prepared.trust_roots == (test_ca.certificate,)
    verify(prepared, x509.DNSName("a.test"))


@pytest.mark.parametrize("option", ["tls_certificate", "tls_key", "users_file", "tls_trust"])
def test_a_configured_file_that_is_missing_is_refused_before_anything_is_made(
    tmp_path: Path, log: Logger, events: Events, option: str
) -> None:
    missing = str(tmp_path / "missing")
    value: str | list[str] = [missing] if option == "tls_trust" else missing
    with pytest.raises(ConfigError) as e:
        prepare(config(tmp_path, **{option: value}), log)
    assert e.value.option == option
    assert str(e.value) == (
        f"{tmp_path / 'imxp.toml'}: option {option!r}: {missing} does not exist"
    )
    assert not (tmp_path / "state").exists()
    assert events == []


def test_half_a_default_certificate_pair_is_refused(tmp_path: Path, log: Logger) -> None:
    prepare(config(tmp_path), log).key_path.unlink()
    with pytest.raises(ConfigError) as e:
        prepare(config(tmp_path), log)
    assert e.value.option == "tls_key"
    assert "relay.key does not exist" in str(e.value)


def test_an_empty_tls_trust_needs_the_development_ca(
    tmp_path: Path, log: Logger, server_cert: Callable[..., Issued]
) -> None:
    cert, key = write_issued(server_cert("a.test"), tmp_path / "tls", "relay")
    with pytest.raises(ConfigError) as e:
        prepare(config(tmp_path, domain="a.test", tls_certificate=str(cert), tls_key=str(key)), log)
    assert e.value.option == "tls_trust"
    assert "no development CA" in str(e.value)


@pytest.mark.parametrize(
    ("option", "damage"),
    [
        ("tls_certificate", lambda p: p.certificate_path.write_text("not PEM\n")),
        ("tls_key", lambda p: p.key_path.write_bytes(key_of_another_certificate())),
        ("tls_trust", lambda p: p.trust_paths[0].write_text("not PEM\n")),
        ("users_file", lambda p: p.users_path.write_text("alice:plaintext\n")),
        ("state_dir", lambda p: replace_with_a_file(p.state_dir)),
    ],
)
def test_unusable_files_are_refused_naming_the_option(
    tmp_path: Path, log: Logger, option: str, damage: Callable[[Prepared], object]
) -> None:
    damage(prepare(config(tmp_path), log))
    with pytest.raises(ConfigError) as e:
        prepare(config(tmp_path), log)
    assert e.value.option == option


def test_a_certificate_not_naming_the_domain_is_warned_about(
    tmp_path: Path, log: Logger, events: Events, server_cert: Callable[..., Issued]
) -> None:
    prepare(config(tmp_path, domain="a.test"), log)
    write_issued(server_cert("other.test"), tmp_path / "state", "relay")
    del events[:]
    prepare(config(tmp_path, domain="a.test"), log)
    [warning] = events
    assert warning["what"] == "certificate-name"
    assert warning["log_level"] == LogLevel.warn
    assert "does not name a.test" in formatEvent(warning)


@pytest.mark.parametrize(
    ("valid_from", "days", "text"),
    [
        (timedelta(days=-1), 11, "expires on"),
        (timedelta(days=-20), 10, "expired on"),
    ],
)
def test_a_certificate_expiring_soon_is_warned_about(
    tmp_path: Path,
    log: Logger,
    events: Events,
    test_ca: Issued,
    valid_from: timedelta,
    days: int,
    text: str,
) -> None:
    prepare(config(tmp_path, domain="a.test"), log)
    short = issue_server(test_ca, ["a.test"], days=days, valid_from=datetime.now(UTC) + valid_from)
    write_issued(short, tmp_path / "state", "relay")
    del events[:]
    prepare(config(tmp_path, domain="a.test"), log)
    [warning] = events
    assert warning["what"] == "certificate-expiry"
    assert warning["log_level"] == LogLevel.warn
    assert text in formatEvent(warning)


def test_a_certificate_not_yet_valid_is_warned_about(
    tmp_path: Path, log: Logger, events: Events, test_ca: Issued
) -> None:
    """Issued for tomorrow (a clock, or a renewal, gone wrong): peers refuse it till then."""
    prepare(config(tmp_path, domain="a.test"), log)
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    write_issued(
        issue_server(test_ca, ["a.test"], valid_from=tomorrow), tmp_path / "state", "relay"
    )
    del events[:]
    prepare(config(tmp_path, domain="a.test"), log)
    [warning] = events
    assert warning["what"] == "certificate-not-yet-valid"
    assert warning["log_level"] == LogLevel.warn
    assert "is not valid until" in formatEvent(warning)


@pytest.mark.parametrize("option", ["tls_certificate", "tls_trust", "users_file", "state_dir"])
def test_a_file_the_relay_may_not_look_for_is_refused_naming_the_option(
    tmp_path: Path, log: Logger, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    """Under a directory the relay's user may not enter (/etc/letsencrypt/live is 0700
    root), looking for a file raises PermissionError: named as the option's trouble, with
    the fix, rather than a traceback. (The tests run as root, who may enter anything, so
    the refusal is the file system's answer played by the test.)"""
    cert, key = prepare(config(tmp_path), log).certificate_path, tmp_path / "state" / "relay.key"
    ca = tmp_path / "state" / "ca.pem"
    settings = {"tls_certificate": str(cert), "tls_key": str(key), "tls_trust": [str(ca)]}
    denied = {
        "tls_certificate": cert,
        "tls_trust": ca,
        "users_file": tmp_path / "state" / "users",
        "state_dir": tmp_path / "state",
    }[option]
    exists = Path.exists

    def refusing(path: Path) -> bool:
        if path == denied:
            raise PermissionError(13, "Permission denied")
        return exists(path)

    monkeypatch.setattr(Path, "exists", refusing)
    with pytest.raises(ConfigError) as e:
        prepare(config(tmp_path, **settings), log)
    assert e.value.option == option
    assert f"cannot look for {denied}: Permission denied" in str(e.value)
    assert "give that user access to the file and the directories above it" in str(e.value)


def test_a_trusted_ca_file_gone_since_the_start_is_said_so(
    tmp_path: Path, log: Logger, test_ca: Issued
) -> None:
    """A SIGHUP reads the files again: a tls_trust file removed meanwhile is missing, not
    an "empty" tls_trust waiting for a development CA."""
    prepared = prepare(config(tmp_path), log)
    trust = tmp_path / "trust.pem"
    trust.write_bytes(test_ca.cert_pem())
    settings = {
        "tls_certificate": str(prepared.certificate_path),
        "tls_key": str(prepared.key_path),
        "tls_trust": [str(trust)],
    }
    load_tls(config(tmp_path, **settings), log)
    trust.unlink()
    with pytest.raises(ConfigError) as e:
        load_tls(config(tmp_path, **settings), log)
    assert str(e.value) == f"{tmp_path / 'imxp.toml'}: option 'tls_trust': {trust} does not exist"
