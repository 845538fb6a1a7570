"""imxp.tap and the twistd plugin: options, configuration errors, the service maker."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.logger import Logger, LogLevel, capturedLogs, formatEventAsClassicLogText
from twisted.python.usage import UsageError

from imxp import logs
from imxp.apex.relay import Relay
from imxp.apex.service import RelayService
from imxp.config import Config
from imxp.tap import Options, _Reloader, makeService

ROOT = Path(__file__).resolve().parent.parent


def test_options_load_and_prepare_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('domain = "a.test"\n')
    options = Options()
    options.parseOptions(["--config", str(path)])
    assert options.config.domain == "a.test"
    assert options.config.source == str(path)
    assert options.prepared.created == ("state_dir", "ca", "certificate", "users")
    assert (tmp_path / "imxp-state" / "relay.pem").exists()


def test_a_bad_configuration_is_a_usage_error_of_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('max_hops = "ten"\n')
    with pytest.raises(UsageError) as e:
        Options().parseOptions(["-c", str(path)])
    assert str(e.value) == f"{path}: option 'max_hops': expected an integer, got 'ten'"


def test_a_missing_configured_file_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('users_file = "/nonexistent/users"\n')
    with pytest.raises(UsageError, match="option 'users_file': /nonexistent/users does not"):
        Options().parseOptions(["-c", str(path)])


def test_make_service_hands_the_configuration_to_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Config] = []
    service = MultiService()

    def make_relay_service(config: Config, **kwargs: Any) -> MultiService:
        made.append(config)
        return service

    fake = types.ModuleType("imxp.apex.service")
    fake.make_relay_service = make_relay_service  # type: ignore[attr-defined]
    fake.reconfigure = lambda *args: None  # type: ignore[attr-defined]  # what SIGHUP calls
    monkeypatch.setitem(sys.modules, "imxp.apex.service", fake)
    path = tmp_path / "relay.toml"
    path.write_text("")
    options = Options()
    options.parseOptions(["-c", str(path)])
    assert makeService(options) is service
    assert made == [options.config]


def test_twistd_prints_the_error_last_and_exits_1(tmp_path: Path) -> None:
    """The real twistd: finds the plugin, and reports a bad file before doing anything."""
    (tmp_path / "relay.toml").write_text("max_hop = 3\n")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "imxp",
            "--config",
            "relay.toml",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stderr
    last = run.stdout.rstrip("\n").splitlines()[-1]
    assert last.endswith(": relay.toml: unknown option 'max_hop' (did you mean 'max_hops'?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay.toml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_files_made_for_twistd_uid_belong_to_that_user(tmp_path: Path) -> None:
    """`twistd --uid U --gid G imxp`: the relay reads its user file again after dropping to
    U, so what the first start makes is U's, not root's; a uid alone means U's own group."""
    from twisted.scripts.twistd import ServerOptions

    path = tmp_path / "relay.toml"
    path.write_text('state_dir = "state"\n')
    server = ServerOptions()
    server.parseOptions(["--uid", "4321", "--gid", "4322", "imxp", "--config", str(path)])
    state = tmp_path / "state"
    made = [state, *state.iterdir()]
    assert sorted(p.name for p in made) == sorted(
        ["state", "ca.pem", "ca.key", "relay.pem", "relay.key", "users"]
    )
    assert {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(4321, 4322)}

    # --uid alone: twistd runs as that user's primary group, and so do the files.
    nobody = pwd.getpwnam("nobody")
    other = tmp_path / "other"
    other.mkdir()
    (other / "relay.toml").write_text("")
    ServerOptions().parseOptions(
        ["--uid", str(nobody.pw_uid), "imxp", "--config", str(other / "relay.toml")]
    )
    state = other / "imxp-state"
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [state, *state.iterdir()]}
    assert owners == {(nobody.pw_uid, nobody.pw_gid)}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_a_refused_start_for_twistd_uid_leaves_nothing_of_roots_behind(tmp_path: Path) -> None:
    """A first start as root with --uid is refused after the state directory was made (a
    key that is not the certificate's). Left root's, mode 0700, that directory would keep
    every later start, once it has dropped to the relay's user, from its control socket
    and from reading its user file again: it must be the relay user's too."""
    from twisted.scripts.twistd import ServerOptions

    from imxp.certs import create_ca, issue_server

    ca = create_ca("a CA")
    issue_server(ca, ["localhost"]).write(tmp_path / "relay.pem", tmp_path / "other.key")
    issue_server(ca, ["localhost"]).write(tmp_path / "other.pem", tmp_path / "relay.key")
    ca.write(tmp_path / "ca.pem", tmp_path / "ca.key")
    path = tmp_path / "relay.toml"
    path.write_text(
        f'state_dir = "state"\ntls_certificate = "{tmp_path / "relay.pem"}"\n'
        f'tls_key = "{tmp_path / "relay.key"}"\ntls_trust = ["{tmp_path / "ca.pem"}"]\n'
    )
    with pytest.raises(UsageError, match="tls_key"):
        ServerOptions().parseOptions(["--uid", "4321", "--gid", "4322", "imxp", "-c", str(path)])
    state = tmp_path / "state"
    for made in (state, *state.iterdir()):
        assert (made.stat().st_uid, made.stat().st_gid) == (4321, 4322), made


def test_log_level_leaves_out_the_relay_events_below_it(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('log_level = "warn"\n')
    try:
        Options().parseOptions(["-c", str(path)])
        # What a relay asks before it builds an event it makes for each data.
        assert not logs.logged(LogLevel.info) and logs.logged(LogLevel.warn)
        with capturedLogs() as events:
            Relay.log.info("a verdict", event="apex.verdict")
            Relay.log.warn("a refusal", event="apex.refused")
            Logger(namespace="elsewhere").info("another program's event", event="other")
            # What an operator reads a quiet log for: the relay's start and stop.
            RelayService.log.info("relay stopped", event="imxp.stopped")
    finally:
        logs.set_level("info")
    assert [e["event"] for e in events] == ["apex.refused", "other", "imxp.stopped"]
    # Named after the class it is declared on, as twisted.logger's own loggers are.
    assert events[0]["log_namespace"] == "imxp.apex.relay.Relay"


def test_text_from_the_other_side_cannot_forge_a_log_line() -> None:
    """A peer's error text or an application's answer goes into the relay's log. A newline
    there would start a log line of the peer's making, an escape sequence would act on the
    terminal of whoever reads the log: each control character is an escape by the time
    any observer sees the event, and other values are left as they are."""
    forged = "no\n2026-11-22T07:00:00+0000 [imxp.apex.relay.Relay#info] ok\x1b[2J \u202egrüße"
    with capturedLogs() as events:
        Relay.log.warn("refused: {code} {text}", code=550, text=forged, event="apex.refused")
    [event] = events
    assert event["code"] == 550
    assert event["text"] == (
        "no\\x0a2026-11-22T07:00:00+0000 [imxp.apex.relay.Relay#info] ok\\x1b[2J \\u202egrüße"
    )
    line = formatEventAsClassicLogText(event)
    assert line is not None and line.count("\n") == 1 and line.endswith("\n")


def test_an_unknown_log_level_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('log_level = "verbose"\n')
    with pytest.raises(UsageError) as e:
        Options().parseOptions(["-c", str(path)])
    assert str(e.value) == (
        f"{path}: option 'log_level': must be one of debug, info, warn, error, critical, "
        "got 'verbose'"
    )


class _Reconfigured:
    """Stands in for imxp.apex.service.reconfigure: what a reload handed the relay."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import imxp.apex.service

        self.configs: list[Config] = []
        monkeypatch.setattr(imxp.apex.service, "reconfigure", self)

    def __call__(self, relay: object, config: Config, identity: object, trust: object) -> None:
        self.configs.append(config)


def test_a_relative_config_is_read_again_after_twistd_changed_to_its_rundir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconfigured = _Reconfigured(monkeypatch)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "relay.toml").write_text('domain = "a.test"\n')
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "etc")
    options = Options()
    options.parseOptions(["-c", "relay.toml"])
    monkeypatch.chdir(tmp_path / "run")  # twistd --rundir

    reloaded, said = _Reloader(options, None)("imxp reload")  # type: ignore[arg-type]

    assert reloaded, said
    assert [c.source for c in reconfigured.configs] == [str(tmp_path / "etc" / "relay.toml")]


def test_a_reload_keeps_the_state_dir_the_relay_started_with_until_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed state_dir takes a restart: the reload says so, and goes on with the files
    of the state directory in use rather than refusing for want of those of the new one."""
    reconfigured = _Reconfigured(monkeypatch)
    path = tmp_path / "relay.toml"
    path.write_text('domain = "a.test"\n')
    options = Options()
    options.parseOptions(["-c", str(path)])
    path.write_text('domain = "a.test"\nstate_dir = "elsewhere"\nmax_hops = 5\n')

    reloaded, said = _Reloader(options, None)("SIGHUP")  # type: ignore[arg-type]

    assert reloaded, said
    assert "changed: max_hops" in said and "state_dir changed in" in said
    [config] = reconfigured.configs
    assert (config.state_dir, config.max_hops) == (options.config.state_dir, 5)


def test_a_reload_tells_who_asked_of_a_certificate_that_does_not_name_the_domain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`imxp reload` after a renewal (a certbot hook) prints the warning the log has."""
    _Reconfigured(monkeypatch)
    for domain in ("a.test", "b.test"):
        (tmp_path / domain).mkdir()
        (tmp_path / domain / "relay.toml").write_text(f'domain = "{domain}"\n')
    options = Options()
    options.parseOptions(["-c", str(tmp_path / "a.test" / "relay.toml")])
    other = Options()
    other.parseOptions(["-c", str(tmp_path / "b.test" / "relay.toml")])
    for name in ("relay.pem", "relay.key"):
        (tmp_path / "a.test" / "imxp-state" / name).write_bytes(
            (tmp_path / "b.test" / "imxp-state" / name).read_bytes()
        )

    reloaded, said = _Reloader(options, None)("imxp reload")  # type: ignore[arg-type]

    assert reloaded
    assert "does not name a.test" in said
