"""imxp.config: the option table, loading, checking, paths and the generated reference."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from imxp.beep.session import SessionConfig
from imxp.config import (
    OPTIONS,
    Config,
    ConfigError,
    OptionSpec,
    control_socket,
    load,
    offered_mechanisms,
    reference_markdown,
    resolver_addresses,
    session_config,
)

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- config-reference:start -->\n"
END = "<!-- config-reference:end -->"


def write(directory: Path, text: str, name: str = "imxp.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_a_relay_for_localhost_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load()
    assert config.source is None
    assert config.domain == "localhost"
    assert config.edge_listen == ("tcp:9913:interface=127.0.0.1",)
    assert config.mesh_listen == ("tcp:9912:interface=127.0.0.1",)
    assert config.sasl_mechanisms == ("SCRAM-SHA-256", "PLAIN", "EXTERNAL")
    assert config.allow_anonymous is False
    assert config.max_hops == 16
    assert config.window == 131072
    assert config.shutdown_grace == 10.0
    # Without a file, state_dir is relative to the current directory.
    assert config.state_dir == str(tmp_path / "imxp-state")
    assert config.path("tls_certificate") == tmp_path / "imxp-state" / "relay.pem"
    assert config.path("tls_key") == tmp_path / "imxp-state" / "relay.key"
    assert config.path("users_file") == tmp_path / "imxp-state" / "users"
    assert config.paths("tls_trust") == (tmp_path / "imxp-state" / "ca.pem",)


def test_the_table_is_the_dataclass() -> None:
    names = [spec.name for spec in OPTIONS]
    fields = [f.name for f in dataclasses.fields(Config)]
    assert fields == [*names, "source"]
    defaults = Config()
    for spec in OPTIONS:
        if spec.name != "state_dir":  # made absolute
            assert getattr(defaults, spec.name) == spec.default, spec.name


@pytest.mark.parametrize("spec", OPTIONS, ids=lambda spec: spec.name)
def test_every_option_has_a_doc_and_is_in_the_reference(spec: OptionSpec) -> None:
    assert spec.doc and spec.doc.endswith("."), spec.name
    assert spec.type_name
    assert f"- **`{spec.name}`** ({spec.type_name}, default " in reference_markdown()


def test_a_file_overrides_options_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        domain = "Example.ORG"
        edge_listen = ["tcp:913"]
        mesh_listen = ["tcp:912", "tcp6:912:interface=\\\\:\\\\:1"]
        sasl_mechanisms = ["EXTERNAL"]
        allow_anonymous = true
        smart_host = "hub.example.net:912"
        dns_servers = ["192.0.2.53:53", "[2001:db8::53]:5353"]
        trusted_relays = ["Hub.Example.NET"]
        max_hops = 4
        delivery_timeout = 5
        idle_timeout = 1.5

        [routes]
        "partner.example" = "relay.partner.example:9912"
        ".corp.example" = "[2001:db8::1]:912=gw.example"
        """,
    )
    config = load(path)
    assert config.source == str(path)
    assert config.domain == "example.org"  # compared case-insensitively, so kept in one form
    assert config.edge_listen == ("tcp:913",)
    assert config.mesh_listen == ("tcp:912", "tcp6:912:interface=\\:\\:1")
    assert config.sasl_mechanisms == ("EXTERNAL",)
    assert offered_mechanisms(config) == ["EXTERNAL", "ANONYMOUS"]
    assert config.trusted_relays == ("hub.example.net",)
    assert resolver_addresses(config) == [("192.0.2.53", 53), ("2001:db8::53", 5353)]
    assert config.max_hops == 4
    assert config.delivery_timeout == 5.0 and isinstance(config.delivery_timeout, float)
    assert config.routes == {
        "partner.example": "relay.partner.example:9912",
        ".corp.example": "[2001:db8::1]:912=gw.example",
    }
    assert isinstance(config.routes, MappingProxyType)  # a frozen Config stays unchanged
    # Untouched options keep their defaults.
    assert config.window == 131072
    assert config.tls_trust == ()
    assert offered_mechanisms(load()) == ["SCRAM-SHA-256", "PLAIN", "EXTERNAL"]


def test_session_config_carries_the_limits() -> None:
    config = Config(
        window=8192,
        max_message_size=4096,
        max_channels=3,
        greeting_timeout=2.0,
        idle_timeout=9.0,
    )
    assert session_config(config) == SessionConfig(
        window=8192,
        max_message_size=4096,
        max_channels=3,
        greeting_timeout=2.0,
        idle_timeout=9.0,
    )


@pytest.mark.parametrize(
    ("key", "close"),
    [("max_hop", "max_hops"), ("tls_cert", "tls_certificate"), ("routing", "routes")],
)
def test_an_unknown_key_is_named_with_a_suggestion(tmp_path: Path, key: str, close: str) -> None:
    path = write(tmp_path, f"{key} = 1\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: unknown option {key!r} (did you mean {close!r}?)"


def test_an_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, "[logging]\nlevel = 'debug'\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: unknown option 'logging'"


def test_wrong_type_message_names_file_option_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'max_hops = "ten"\n')
    with pytest.raises(ConfigError) as e:
        load("imxp.toml")
    assert str(e.value) == "imxp.toml: option 'max_hops': expected an integer, got 'ten'"
    assert (e.value.source, e.value.option) == ("imxp.toml", "max_hops")


@pytest.mark.parametrize(
    ("line", "option", "expected"),
    [
        ("allow_anonymous = 1", "allow_anonymous", "expected true or false, got 1"),
        ("window = true", "window", "expected an integer, got True"),
        ("max_hops = 2.5", "max_hops", "expected an integer, got 2.5"),
        ('delivery_timeout = "5"', "delivery_timeout", "expected a number, got '5'"),
        ("delivery_timeout = inf", "delivery_timeout", "expected a number, got inf"),
        ('edge_listen = "tcp:913"', "edge_listen", "expected a list of strings, got 'tcp:913'"),
        ("sasl_mechanisms = [1]", "sasl_mechanisms", "expected a list of strings, got [1]"),
        ("domain = []", "domain", "expected a string, got []"),
        ("tls_certificate = 5", "tls_certificate", "expected a string, got 5"),
        ('routes = "a"', "routes", "expected a table of strings, got 'a'"),
        ("routes = {x = 1}", "routes", "expected a table of strings, got {'x': 1}"),
        (
            'routes = {b.test = "h:1"}',
            "routes",
            "expected a table of strings, got {'b': {'test': 'h:1'}} "
            '(quote keys that contain dots, as in "b.test" = "...")',
        ),
    ],
)
def test_wrong_types(tmp_path: Path, line: str, option: str, expected: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: option {option!r}: {expected}"


@pytest.mark.parametrize(
    ("line", "option", "fragment"),
    [
        ('domain = "exa mple.org"', "domain", "exa mple"),
        ('domain = ""', "domain", "empty"),
        ('domain = "192.0.2.1"', "domain", "is an IP address"),
        ('domain = "[192.0.2.1]"', "domain", "address literal"),
        ('trusted_relays = ["ok.example", "-bad.example"]', "trusted_relays", "-bad"),
        ('edge_listen = ["foo:1"]', "edge_listen", "not a server endpoint string"),
        # The README's production form, its IPv6 colons unescaped: said how to write it.
        ('edge_listen = ["tcp6:913:interface=::"]', "edge_listen", "as in interface=\\:\\:"),
        ('edge_listen = [""]', "edge_listen", "not a server endpoint string"),
        ('mesh_listen = ["tcp:port"]', "mesh_listen", "'tcp:port'"),
        ('mesh_listen = ["tcp:70000"]', "mesh_listen", "port 70000 out of range"),
        ('edge_listen = ["ssl:913:privateKey=k.pem"]', "edge_listen", "listen with tcp:"),
        ('mesh_listen = ["SSL:912"]', "mesh_listen", "TLS inside the session"),
        ('sasl_mechanisms = ["DIGEST-MD5"]', "sasl_mechanisms", "unknown mechanism"),
        ('sasl_mechanisms = ["ANONYMOUS"]', "sasl_mechanisms", "allow_anonymous"),
        ('sasl_mechanisms = ["PLAIN", "PLAIN"]', "sasl_mechanisms", "twice"),
        ('routes = {"b.test" = "h:99999"}', "routes", "out of range"),
        ('routes = {"b.test" = "h:"}', "routes", "port '' is not a number"),
        ('routes = {"b.test" = "h: 912"}', "routes", "port ' 912' is not a number"),
        ('routes = {"b.test" = "h:+912"}', "routes", "port '+912' is not a number"),
        ('routes = {"b.test" = "[::1]:"}', "routes", "port '' is not a number"),
        ('routes = {"b.test" = "[relay]:912"}', "routes", "'relay' is not an IPv6 address"),
        ('routes = {"[192.0.2.1]" = "h:1"}', "routes", "literal"),
        ('smart_host = "hub:x"', "smart_host", "port 'x' is not a number"),
        ('dns_servers = ["ns.example:53"]', "dns_servers", "not an IP address"),
        ('dns_servers = ["192.0.2.53"]', "dns_servers", "address:port"),
        ('dns_servers = ["192.0.2.53:0"]', "dns_servers", "bad port"),
        ("max_hops = 0", "max_hops", "must be positive"),
        ("max_hops = 257", "max_hops", "must be at most 255"),
        ("max_sessions_per_peer = -1", "max_sessions_per_peer", "must be positive"),
        ("connect_timeout = 0.0", "connect_timeout", "must be positive"),
        ("window = 1024", "window", "between 4096 and"),
        ("window = 2147483648", "window", "between 4096 and"),
        ("max_message_size = 10", "max_message_size", "must be at least 4096, got 10"),
        ('state_dir = ""', "state_dir", "empty"),
        ('users_file = ""', "users_file", "empty"),
        ('tls_trust = ["ca.pem", ""]', "tls_trust", "empty"),
        ('state_dir = "a\\u0000b"', "state_dir", "NUL"),
        ('tls_trust = ["ca\\u0000.pem"]', "tls_trust", "NUL"),
    ],
)
def test_invalid_values(tmp_path: Path, line: str, option: str, fragment: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.option == option
    assert str(e.value).startswith(f"{path}: option {option!r}: ")
    assert fragment in str(e.value)


def test_a_relay_that_would_listen_on_nothing_is_refused(tmp_path: Path) -> None:
    """Both lists empty started a relay nobody could reach, and `imxp check` said all good."""
    path = write(tmp_path, "edge_listen = []\nmesh_listen = []\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == (
        f"{path}: options 'edge_listen' and 'mesh_listen' are both empty: the relay would "
        "listen for neither endpoints nor relays"
    )
    # Either alone is a relay of one kind: for endpoints only, or a hub for relays.
    assert load(write(tmp_path, "edge_listen = []\n")).mesh_listen
    assert load(write(tmp_path, "mesh_listen = []\n")).edge_listen


def test_a_config_made_directly_is_checked_too() -> None:
    with pytest.raises(ConfigError) as e:
        Config(max_hops=0)
    assert str(e.value) == "built-in defaults: option 'max_hops': must be positive, got 0"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file"):
        load(missing)
    bad = write(tmp_path, "domain = \n")
    with pytest.raises(ConfigError, match=r"imxp\.toml: not valid TOML: .*line 1"):
        load(bad)
    # A comment saved by an editor in Latin-1: named, not a UnicodeDecodeError traceback.
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('domain = "example.org"\n# relais de l\'équipe\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load(latin1)
    assert str(e.value) == f"{latin1}: not UTF-8 (TOML files are): octet 0xe9 on line 2"


def test_paths_are_relative_to_the_file_then_to_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    write(
        etc,
        """
        state_dir = "state/relay"
        tls_certificate = "/srv/tls/fullchain.pem"
        tls_key = "tls/relay.key"
        tls_trust = ["../ca.pem", "/etc/ssl/certs/ca-certificates.crt"]
        """,
        name="relay.toml",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(Path("..") / "etc" / "relay.toml")
    state = etc / "state" / "relay"
    assert config.state_dir == str(state)
    assert config.path("state_dir") == state
    assert config.path("tls_certificate") == Path("/srv/tls/fullchain.pem")
    assert config.path("tls_key") == state / "tls" / "relay.key"
    assert config.path("users_file") == state / "users"
    assert config.paths("tls_trust") == (
        etc / "state" / "ca.pem",
        Path("/etc/ssl/certs/ca-certificates.crt"),
    )
    with pytest.raises(ValueError):
        config.path("tls_trust")
    with pytest.raises(ValueError):
        config.paths("tls_key")
    with pytest.raises(ValueError):
        config.path("domain")


def test_the_control_socket_is_found_whatever_else_the_file_gets_wrong(tmp_path: Path) -> None:
    """What `imxp status` and `imxp reload` read: the file's state_dir and control_socket,
    so that a mistake being edited elsewhere leaves the relay reachable."""
    editing = 'state_dir = "state"\nwindow = "big"\ndelivry_timeout = 3\n'
    assert control_socket(write(tmp_path, editing)) == tmp_path / "state" / "control"
    named = write(tmp_path, 'control_socket = "/run/imxp/control"\nwindow = "big"\n')
    assert control_socket(named) == Path("/run/imxp/control")
    assert control_socket(None) == Path.cwd() / "imxp-state" / "control"
    with pytest.raises(ConfigError, match=r"imxp\.toml: option 'state_dir'"):
        control_socket(write(tmp_path, "state_dir = 7\n"))
    with pytest.raises(ConfigError, match=r"imxp\.toml: not valid TOML"):
        control_socket(write(tmp_path, "window = \n"))


def test_an_absolute_state_dir_stays(tmp_path: Path) -> None:
    config = load(write(tmp_path, f'state_dir = "{tmp_path / "abs"}"\n'))
    assert config.path("state_dir") == tmp_path / "abs"


@pytest.mark.parametrize(
    "name", ["imxp.toml", "mesh/a.test.toml", "mesh/b.test.toml"], ids=lambda n: n
)
def test_the_example_configurations_load(name: str) -> None:
    config = load(ROOT / "etc" / name)
    assert config.domain in {"example.org", "a.test", "b.test"}


def test_the_two_mesh_relays_route_to_each_other() -> None:
    a = load(ROOT / "etc" / "mesh" / "a.test.toml")
    b = load(ROOT / "etc" / "mesh" / "b.test.toml")
    assert a.routes["b.test"] == "127.0.0.1:" + b.mesh_listen[0].split(":")[1]
    assert b.routes["a.test"] == "127.0.0.1:" + a.mesh_listen[0].split(":")[1]
    assert a.paths("tls_trust") == b.paths("tls_trust")
    assert a.state_dir != b.state_dir


def test_the_readme_carries_the_current_reference() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(START) == 1 and readme.count(END) == 1
    section = readme.split(START, 1)[1].split(END, 1)[0]
    assert section == reference_markdown(), (
        "README.md's configuration reference is out of date: replace the text between the "
        "config-reference markers with the output of `python -m imxp.config`"
    )


def test_python_m_imxp_config_prints_the_reference() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "imxp.config"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert out.stdout == reference_markdown()
