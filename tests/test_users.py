"""The user store, the cred checkers and the failure throttle."""

from __future__ import annotations

import base64
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from scramp import ScramMechanism
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure as TwistedFailure

from imxp.beep import users as users_module
from imxp.beep.saslmech import ExternalIdentity, SCRAMCredentials
from imxp.beep.users import (
    RECHECK_SECONDS,
    ExternalChecker,
    FailureThrottle,
    Throttled,
    UserStore,
    UserStoreError,
    derive_keys,
    prepare_username,
)

PASSWORD = "correct horse battery"
LINE = re.compile(
    r"[^:\n]+:SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{44}"
)


def outcome(d: Deferred) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def avatar(store, username, password) -> object:
    return outcome(store.requestAvatarId(UsernamePassword(username, password)))


def refused(value: object) -> bool:
    return isinstance(value, TwistedFailure) and value.check(UnauthorizedLogin) is not None


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "users"


# ----------------------------------------------------------------------------------- file


def test_round_trip(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    store.add("bob", "hunter2")
    again = UserStore(path)
    assert again.usernames() == ["alice", "bob"]
    assert avatar(again, b"alice", PASSWORD.encode()) == "alice"
    assert avatar(again, "bob", "hunter2") == "bob"
    assert refused(avatar(again, "bob", PASSWORD))
    assert outcome(again.scram_keys("alice")) == outcome(store.scram_keys("alice"))


def test_file_format_and_no_cleartext(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    data = path.read_bytes()
    assert PASSWORD.encode() not in data
    assert base64.b64encode(PASSWORD.encode()) not in data
    users = [line for line in data.decode().splitlines() if not line.startswith("#")]
    assert len(users) == 1 and LINE.fullmatch(users[0])
    assert users[0].startswith("alice:SCRAM-SHA-256$4096:")


def test_mode_0600_after_every_change(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o644)
    store.set_password("alice", "new password")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store.remove("alice")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["users"]  # no temporary files left


def test_rfc7677_keys_match_scramp(path):
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    store = UserStore(path)
    store.add("user", "pencil", salt=salt)
    keys = outcome(store.scram_keys("user"))
    ref_salt, stored_key, server_key, iterations = ScramMechanism().make_auth_info(
        "pencil", iteration_count=4096, salt=salt
    )
    assert (keys.salt, keys.stored_key, keys.server_key, keys.iterations) == (
        ref_salt,
        stored_key,
        server_key,
        iterations,
    )


def test_iterations_configurable_with_minimum(path):
    with pytest.raises(ValueError):
        UserStore(path, iterations=4095)
    store = UserStore(path, iterations=5000)
    store.add("alice", PASSWORD)
    assert "$5000:" in path.read_text()
    assert outcome(store.scram_keys("alice")).iterations == 5000
    assert avatar(store, "alice", PASSWORD) == "alice"


def test_remove_and_list(path):
    store = UserStore(path)
    for name in ("carol", "alice", "bob"):
        store.add(name, PASSWORD)
    store.remove("bob")
    assert store.usernames() == ["alice", "carol"]
    assert UserStore(path).usernames() == ["alice", "carol"]
    assert "bob" not in store and "alice" in store
    with pytest.raises(KeyError):
        store.remove("bob")
    assert refused(avatar(store, "bob", PASSWORD))


def test_add_existing_and_set_password_missing(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    with pytest.raises(UserStoreError):
        store.add("alice", "other")
    with pytest.raises(KeyError):
        store.set_password("bob", "other")
    assert avatar(store, "alice", PASSWORD) == "alice"


def test_set_password(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    old_salt = outcome(store.scram_keys("alice")).salt
    store.set_password("alice", "new password")
    assert refused(avatar(store, "alice", PASSWORD))
    assert avatar(store, "alice", "new password") == "alice"
    assert outcome(store.scram_keys("alice")).salt != old_salt


def test_watchers_hear_of_users_removed_or_given_a_new_password(path):
    """What a relay logs out: changes another process made, found by a re-read, and
    changes made through this store alike; a file that cannot be read changes nothing."""
    relay = UserStore(path)
    for name in ("alice", "bob", "carol", "dave"):
        relay.add(name, PASSWORD)
    heard: list[frozenset[str]] = []
    relay.watch(heard.append)
    admin = UserStore(path)  # `imxp users` in another process

    admin.remove("bob")
    admin.set_password("carol", "new password")
    admin.add("erin", PASSWORD)
    relay.refresh()
    relay.remove("dave")
    relay.refresh()  # nothing new
    path.write_text("not a user file\n")
    relay.refresh()
    # Moved away for a while (a restore, a hand edit): not "no users", which would log
    # everyone out and refuse every login, which applications take as final.
    path.rename(path.with_name("users.moved"))
    relay.refresh()
    assert "alice" in relay
    path.with_name("users.moved").rename(path)

    assert heard == [frozenset({"bob", "carol"}), frozenset({"dave"})]
    assert "alice" in relay and "erin" in relay


@pytest.mark.parametrize(
    "name", ["", "a:b", "a\nb", "a\x00b", "a\rb", "#alice", "x" * 256, "\u00ad", "a\u0007"]
)
def test_bad_usernames(path, name):
    with pytest.raises(UserStoreError):
        prepare_username(name)
    with pytest.raises(UserStoreError):
        UserStore(path).add(name, PASSWORD)
    assert not path.exists()


def test_empty_or_prohibited_password(path):
    store = UserStore(path)
    for password in ("", "\u00ad", "bell\x07"):
        with pytest.raises(UserStoreError):
            store.add("alice", password)
    assert store.usernames() == []


def test_saslprep_normalisation(path):
    """RFC 4013 §3 examples: soft hyphen maps to nothing; U+2168 is NFKC "IX"."""
    store = UserStore(path)
    store.add("I\u00adX", "I\u00adX")
    assert store.usernames() == ["IX"]
    assert avatar(store, "IX", "IX") == "IX"
    assert avatar(store, "\u2168", "\u2168") == "IX"
    # A SCRAM client prepares the password the same way.
    keys = outcome(store.scram_keys("IX"))
    assert derive_keys("\u2168", keys.salt, keys.iterations) == keys


def test_plain_checks_refuse_garbage(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    assert refused(avatar(store, b"\xff", PASSWORD))
    assert refused(avatar(store, "alice", b"\xff"))
    assert refused(avatar(store, "alice", ""))
    assert refused(avatar(store, "mallory", PASSWORD))
    assert refused(outcome(store.requestAvatarId(ExternalIdentity("alice"))))


def test_scram_credentials_against_store(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    assert refused(outcome(store.requestAvatarId(SCRAMCredentials("alice", b"m", bytes(32)))))
    assert refused(outcome(store.requestAvatarId(SCRAMCredentials("nobody", b"m", bytes(32)))))


SALT = "QUFBQUFBQUFBQUFBQUFBQQ=="
KEY = "A" * 43 + "="


@pytest.mark.parametrize(
    "content",
    [
        "alice\n",
        "alice:SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\n",
        f"alice:SCRAM-SHA-256$100:{SALT}${KEY}:{KEY}\n",
        f"alice:SCRAM-SHA-1$4096:{SALT}${KEY}:{KEY}\n",
        "#decoy-secret:!!!\n",
        f"I\u00adX:SCRAM-SHA-256$4096:{SALT}${KEY}:{KEY}\n",
        f"alice:SCRAM-SHA-256$4096:c2FsdA==${KEY}:{KEY}\n",
        f"alice:SCRAM-SHA-256$4096:{SALT}$AAAA:{KEY}\n",
    ],
)
def test_malformed_file(path, content):
    path.write_text(f"alice:SCRAM-SHA-256$4096:{SALT}${KEY}:{KEY}\n")
    assert UserStore(path).usernames() == ["alice"]  # the well-formed line the cases bend
    path.write_text(content)
    with pytest.raises(UserStoreError):
        UserStore(path)


def test_duplicate_user_in_file(path):
    UserStore(path).add("alice", PASSWORD)
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("alice:"))
    path.write_text(f"{line}\n{line}\n")
    with pytest.raises(UserStoreError):
        UserStore(path)


def test_comments_and_blank_lines_ignored(path):
    UserStore(path).add("alice", PASSWORD)
    path.write_text("# users of a.test\n\n" + path.read_text())
    assert UserStore(path).usernames() == ["alice"]


def test_reload_and_malformed_reload_keeps_old_data(path):
    relay = UserStore(path)
    UserStore(path).add("alice", PASSWORD)
    relay.reload()
    assert relay.usernames() == ["alice"]
    good = path.read_text()
    path.write_text("garbage\n")
    with pytest.raises(UserStoreError):
        relay.reload()
    assert relay.usernames() == ["alice"]
    path.write_text(good)


def test_a_file_that_cannot_be_read_keeps_the_users(path, monkeypatch, events):
    """A user file the relay may no longer read (replaced by another user's change) is
    an error logged once per change, not a failed login: the relay keeps its users."""
    relay = UserStore(path)
    UserStore(path).add("alice", PASSWORD)
    assert relay.usernames() == ["alice"]
    real_read_text = Path.read_text

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        if self == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    UserStore(path).add("bob", PASSWORD)
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UserStoreError, match="cannot read: Permission denied"):
        relay.reload()
    assert "alice" in relay  # looked up through _fresh: no exception escapes
    assert relay.usernames() == ["alice"]
    unreadable = [e for e in events if e["event"] == "imxp.users-unreadable"]
    assert len(unreadable) == 1
    assert "Permission denied" in unreadable[0]["error"]


def test_a_directory_that_cannot_be_entered_keeps_the_users(path, monkeypatch, events):
    """The user file's directory made one the relay may not enter (a chmod, a state
    directory left root's): even the look at the file's time fails. That too is logged,
    not an exception out of a login or a delivery: the relay keeps its users."""
    relay = UserStore(path)
    UserStore(path).add("alice", PASSWORD)
    assert relay.usernames() == ["alice"]
    real_stat = Path.stat

    def denied(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        if self == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", denied)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: denied(self))
    assert "alice" in relay
    assert relay.usernames() == ["alice"]
    assert refused(avatar(relay, "alice", "wrong")) and avatar(relay, "alice", PASSWORD) == "alice"
    unreadable = [e for e in events if e["event"] == "imxp.users-unreadable"]
    assert len(unreadable) == 1 and "Permission denied" in unreadable[0]["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_change_keeps_the_file_owner(path):
    """`sudo imxp users add` on a relay's file leaves it the relay user's, not root's."""
    UserStore(path).add("alice", PASSWORD)
    os.chown(path, 4321, 4322)
    UserStore(path).add("bob", PASSWORD)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert UserStore(path).usernames() == ["alice", "bob"]


def test_changes_start_from_the_file(path):
    """A long-lived store must not undo what another process wrote meanwhile."""
    relay = UserStore(path)
    UserStore(path).add("alice", PASSWORD)
    UserStore(path).add("carol", PASSWORD)
    relay.add("bob", PASSWORD)
    assert UserStore(path).usernames() == ["alice", "bob", "carol"]
    UserStore(path).remove("carol")
    relay.remove("bob")
    assert UserStore(path).usernames() == ["alice"]
    assert relay.usernames() == ["alice"]


def test_changes_made_at_once_by_two_processes_are_both_kept(path, monkeypatch):
    """A provisioning script runs `imxp users add` for several users at once: each says
    "added", so each user must be in the file, not only the one written last. Here barney
    is added (in a thread, as another process would) while alice's change is between
    reading the file and writing it."""
    path.touch(mode=0o600)  # the empty file a relay's first start makes
    alice, barney = UserStore(path), UserStore(path)
    write = alice._write

    def write_late(users: Any) -> None:
        other = threading.Thread(target=barney.add, args=("barney", PASSWORD))
        other.start()
        # Without a lock barney's add ends here; with one it waits for alice's to end.
        other.join(timeout=5)
        write(users)
        monkeypatch.setattr(alice, "_write", write)
        threads.append(other)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(alice, "_write", write_late)
    alice.add("alice", PASSWORD)
    threads[0].join()
    assert UserStore(path).usernames() == ["alice", "barney"]


# ---------------------------------------------------------------------------------- decoys


def test_decoys(path):
    store = UserStore(path)
    store.add("alice", PASSWORD)
    decoy = store.decoy_keys("mallory")
    assert decoy == store.decoy_keys("mallory")
    assert decoy.salt != store.decoy_keys("trudy").salt
    real = outcome(store.scram_keys("alice"))
    assert len(decoy.salt) == len(real.salt) and decoy.iterations == real.iterations
    # The secret is kept with the file, so a restart keeps the decoys.
    assert UserStore(path).decoy_keys("mallory") == decoy
    # A different store has a different secret.
    other = UserStore(path.parent / "other")
    assert other.decoy_keys("mallory").salt != decoy.salt


def test_configured_decoy_secret(path):
    a = UserStore(path, decoy_secret=b"k" * 32)
    b = UserStore(path.parent / "b", decoy_secret=b"k" * 32)
    assert a.decoy_keys("mallory") == b.decoy_keys("mallory")
    a.add("alice", PASSWORD)
    assert base64.b64encode(b"k" * 32).decode() not in path.read_text()


# ------------------------------------------------------------------------- ExternalChecker


@pytest_twisted.ensureDeferred
async def test_password_hashing_can_leave_the_reactor_thread(path, monkeypatch):
    """A relay's store runs the PBKDF2 of a PLAIN login in the reactor's threads: in the
    reactor thread, a flood of guesses held up every session. The outcome is the same."""
    from twisted.internet import reactor

    store = UserStore(path)
    store.add("alice", PASSWORD)
    threads: list[int] = []
    real = users_module.derive_keys

    def derive(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(users_module, "derive_keys", derive)
    store.hash_in_threads(reactor)
    d = store.requestAvatarId(UsernamePassword(b"alice", PASSWORD.encode()))
    assert not d.called  # answered from the thread in a later turn of the reactor
    assert await d == "alice"
    with pytest.raises(UnauthorizedLogin):
        await store.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
    with pytest.raises(UnauthorizedLogin):  # SASLprep refuses the password, in the thread
        await store.requestAvatarId(UsernamePassword(b"alice", "pass\u0007word".encode()))
    assert len(threads) == 3 and threading.get_ident() not in threads


def test_external_checker_policies():
    assert outcome(ExternalChecker().requestAvatarId(ExternalIdentity("a.test"))) == "a.test"
    allowed = ExternalChecker({"a.test"})
    assert outcome(allowed.requestAvatarId(ExternalIdentity("a.test"))) == "a.test"
    assert refused(outcome(allowed.requestAvatarId(ExternalIdentity("b.test"))))
    policy = ExternalChecker(lambda identity: identity.endswith(".test"))
    assert outcome(policy.requestAvatarId(ExternalIdentity("b.test"))) == "b.test"
    assert refused(outcome(policy.requestAvatarId(ExternalIdentity("b.example"))))
    assert refused(outcome(ExternalChecker().requestAvatarId(ExternalIdentity(""))))


# -------------------------------------------------------------------------------- throttle


def test_throttle_growth_and_cap():
    clock = Clock()
    throttle = FailureThrottle(clock, base=1.0, cap=30.0)
    assert throttle.delay_for("192.0.2.1") == 0.0
    delays = []
    for _ in range(8):
        throttle.failed("192.0.2.1")
        delays.append(throttle.delay_for("192.0.2.1"))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert throttle.delay_for("192.0.2.2") == 0.0


def test_throttle_many_failures_do_not_overflow():
    throttle = FailureThrottle(Clock(), cap=30.0)
    for _ in range(5000):
        throttle.failed("192.0.2.1")
    assert throttle.delay_for("192.0.2.1") == 30.0


def test_throttle_success_resets():
    throttle = FailureThrottle(Clock())
    throttle.failed("192.0.2.1")
    throttle.failed("192.0.2.1")
    throttle.succeeded("192.0.2.1")
    assert throttle.delay_for("192.0.2.1") == 0.0
    throttle.failed("192.0.2.1")
    assert throttle.delay_for("192.0.2.1") == 1.0
    throttle.succeeded("192.0.2.99")  # unknown addresses are fine


def test_throttle_forgets_one_failure_per_quiet_period():
    clock = Clock()
    throttle = FailureThrottle(clock, forget_after=60)
    throttle.failed("192.0.2.1")
    throttle.failed("192.0.2.1")
    clock.advance(59)
    assert throttle.delay_for("192.0.2.1") == 2.0
    throttle.failed("192.0.2.1")  # the period restarts at each failure
    clock.advance(59)
    assert throttle.delay_for("192.0.2.1") == 4.0
    clock.advance(1)
    assert throttle.delay_for("192.0.2.1") == 2.0
    clock.advance(60)
    assert throttle.delay_for("192.0.2.1") == 1.0
    throttle.failed("192.0.2.1")  # counted from what is left: 1 + 1
    assert throttle.delay_for("192.0.2.1") == 2.0
    clock.advance(120)
    assert throttle.delay_for("192.0.2.1") == 0.0
    assert len(throttle) == 0


def test_throttle_counts_failures_only_up_to_the_cap():
    """So that a guesser who stops is forgotten within cap-many periods."""
    clock = Clock()
    throttle = FailureThrottle(clock, base=1.0, cap=30.0, forget_after=60)
    for _ in range(100):
        throttle.failed("192.0.2.1")
    assert throttle.delay_for("192.0.2.1") == 30.0
    clock.advance(60)
    assert throttle.delay_for("192.0.2.1") == 16.0
    clock.advance(5 * 60)
    assert throttle.delay_for("192.0.2.1") == 0.0


def turn_of(throttle: FailureThrottle, address: str) -> tuple[Deferred, list[Any]]:
    """The turn asked for, and a list that holds its outcome once there is one."""
    d = throttle.turn(address)
    box: list[Any] = []
    d.addBoth(box.append)
    return d, box


def test_throttle_turns_come_one_at_a_time_and_after_the_delay():
    clock = Clock()
    throttle = FailureThrottle(clock, base=1.0, cap=30.0)
    _, first = turn_of(throttle, "192.0.2.1")
    _, second = turn_of(throttle, "192.0.2.1")
    _, elsewhere = turn_of(throttle, "192.0.2.2")
    # A clean address goes at once, but one attempt at a time; other addresses meanwhile.
    assert len(first) == 1 and second == [] and len(elsewhere) == 1
    first[0](False)
    clock.advance(0.999)
    assert second == []
    clock.advance(0.001)
    assert len(second) == 1
    second[0](None)  # no verdict (a challenge): the next need not wait
    _, third = turn_of(throttle, "192.0.2.1")
    assert len(third) == 1
    third[0](True)  # success forgets the failures
    elsewhere[0](None)
    assert len(throttle) == 0


def test_throttle_turns_refuse_beyond_the_waiting_room_and_can_be_given_up():
    clock = Clock()
    throttle = FailureThrottle(clock, max_waiting=2)
    throttle.failed("192.0.2.1")
    waiting = [turn_of(throttle, "192.0.2.1") for _ in range(4)]
    assert [box for _, box in waiting[:2]] == [[], []]
    refused = [box[0] for _, box in waiting[2:]]
    assert all(isinstance(f, TwistedFailure) and f.check(Throttled) for f in refused)
    # Counted so that a flood is logged once: the first refusal of a burst is 1.
    assert [f.value.burst for f in refused] == [1, 2]
    waiting[0][0].cancel()  # the session went: its place is given up
    clock.advance(1)
    assert waiting[0][1][0].check(CancelledError)
    assert len(waiting[1][1]) == 1 and callable(waiting[1][1][0])


def test_throttle_memory_is_bounded():
    clock = Clock()
    throttle = FailureThrottle(clock, max_addresses=3)
    for i in range(1, 6):
        throttle.failed(f"192.0.2.{i}")
        clock.advance(1)
    assert len(throttle) == 3
    assert throttle.delay_for("192.0.2.1") == 0.0  # the oldest were evicted
    assert throttle.delay_for("192.0.2.2") == 0.0
    assert throttle.delay_for("192.0.2.5") == 1.0
    # A repeat offender counts as recent again and survives eviction.
    throttle.failed("192.0.2.3")
    throttle.failed("192.0.2.6")
    assert throttle.delay_for("192.0.2.3") == 2.0
    assert throttle.delay_for("192.0.2.4") == 0.0
    assert len(throttle) == 3


def test_throttle_expiry_frees_memory():
    clock = Clock()
    throttle = FailureThrottle(clock, forget_after=10)
    for i in range(100):
        throttle.failed(f"198.51.100.{i}")
    clock.advance(10)
    throttle.failed("203.0.113.1")
    assert len(throttle) == 1


def test_throttle_rejects_bad_parameters():
    with pytest.raises(ValueError):
        FailureThrottle(Clock(), max_addresses=0)
    with pytest.raises(ValueError):
        FailureThrottle(Clock(), forget_after=0)
    with pytest.raises(ValueError):
        FailureThrottle(Clock(), max_waiting=0)


def test_a_running_store_sees_users_another_process_adds(tmp_path):
    """`imxp users add` while the relay runs: the relay's store picks it up, within
    RECHECK_SECONDS when asked whether a user exists."""
    clock = Clock()
    running = UserStore(tmp_path / "users", clock=clock)
    assert "carol" not in running
    UserStore(tmp_path / "users").add("carol", "her password")
    clock.advance(RECHECK_SECONDS / 2)
    assert "carol" not in running  # the file was looked at just now
    clock.advance(RECHECK_SECONDS / 2)
    assert "carol" in running
    UserStore(tmp_path / "users").remove("carol")
    assert "carol" in running
    assert running.usernames() == []  # listing looks at once
    assert "carol" not in running


def test_a_login_sees_a_user_added_a_moment_ago(tmp_path):
    """Logins look at the file every time: a new user can log in at once."""
    clock = Clock()
    running = UserStore(tmp_path / "users", clock=clock)
    assert "carol" not in running
    UserStore(tmp_path / "users").add("carol", "her password")
    assert outcome(running.requestAvatarId(UsernamePassword(b"carol", b"her password"))) == (
        "carol"
    )
    assert outcome(running.scram_keys("carol")) is not None
    assert "carol" in running


def test_usernames_are_prepared_once(monkeypatch, tmp_path):
    """SASLprep results are remembered; refusals are not."""
    calls = []
    real = users_module.saslprep
    monkeypatch.setattr(users_module, "saslprep", lambda s: calls.append(s) or real(s))
    prepare_username.cache_clear()
    assert prepare_username("I\u00adX") == prepare_username("I\u00adX") == "IX"
    assert calls == ["I\u00adX"]
    for _ in range(2):
        with pytest.raises(UserStoreError):
            prepare_username("a:b")
    assert calls == ["I\u00adX", "a:b", "a:b"]


def test_a_broken_edit_keeps_the_users_the_store_had(tmp_path):
    running = UserStore(tmp_path / "users")
    running.add("carol", "her password")
    (tmp_path / "users").write_text("this is not a SCRAM record\n")
    assert "carol" in running


@pytest.mark.parametrize("change", ["remove", "set_password"])
def test_a_password_checked_while_the_user_is_removed_or_given_a_new_one_is_refused(
    path, monkeypatch, change
):
    """`imxp users remove` (or a new password) while a PLAIN login's hashing runs: once
    the relay has seen the change, and so logged the user's sessions out, the old password
    must not log in a new one."""
    store = UserStore(path)
    store.add("alice", PASSWORD)
    real = users_module.derive_keys

    def derive(*args: Any) -> Any:
        monkeypatch.setattr(users_module, "derive_keys", real)  # the change hashes too
        other = UserStore(path)
        if change == "remove":
            other.remove("alice")
        else:
            other.set_password("alice", "a new password")
        store.refresh()
        return real(*args)

    monkeypatch.setattr(users_module, "derive_keys", derive)
    assert refused(avatar(store, "alice", PASSWORD))
