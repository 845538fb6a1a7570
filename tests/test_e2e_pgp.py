"""PGP/MIME (RFC 3156) with the real gpg: imxp.e2e.pgp against itself and against gpg."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imxp.e2e import pgp
from imxp.e2e.pgp import OpenPGP
from imxp.e2e.protect import E2EError, split_entity, split_multipart

ENTITY = (
    b"Content-Type: message/cpim\r\n\r\n"
    b"From: <im:fred@a.test>\r\nTo: <im:barney@b.test>\r\nDateTime: 2024-05-01T12:00:00Z\r\n"
    b'\r\nContent-Type: text/plain; charset="utf-8"\r\n\r\nYabba dabba doo! \xc3\xa9\r\n'
)


@dataclass(frozen=True)
class Person:
    name: str
    email: str
    home: Path
    fingerprint: str

    @property
    def pgp(self) -> OpenPGP:
        return OpenPGP(self.home)


def gpg(home: Path, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run the gpg command line in ``home``; raise if it fails."""
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--yes", "--no-tty", *args],
        input=data,
        capture_output=True,
        check=True,
        timeout=60,
    )


def make_keyrings(base: Path, knows: dict[str, list[str]]) -> dict[str, Person]:
    """One GNUPGHOME per ``name@domain`` key of ``knows``, each with its own Ed25519 signing
    key and Curve25519 encryption subkey (no passphrase), and the public keys of those it
    knows."""
    people: dict[str, Person] = {}
    for address in knows:
        name = address.split("@")[0]
        home = base / name
        home.mkdir(mode=0o700)
        uid = f"{name.title()} <{address}>"
        gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        listing = gpg(home, "--with-colons", "--list-keys", f"<{address}>").stdout.decode()
        fingerprint = re.search(r"^fpr:+([0-9A-F]{40}):", listing, re.MULTILINE).group(1)
        gpg(home, "--passphrase", "", "--quick-add-key", fingerprint, "cv25519", "encr", "never")
        people[address] = Person(name, address, home, fingerprint)
    for address, known in knows.items():
        for other in known:
            exported = gpg(people[other].home, "--export", people[other].fingerprint).stdout
            gpg(people[address].home, "--import", data=exported)
    return people


def stop_agents(people: dict[str, Person]) -> None:
    for person in people.values():
        subprocess.run(
            ["gpgconf", "--homedir", str(person.home), "--kill", "all"],
            capture_output=True,
            check=False,
        )


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Person]]:
    people = make_keyrings(
        tmp_path_factory.mktemp("gpg"),
        {
            "fred@a.test": ["barney@b.test", "mallory@a.test"],
            "barney@b.test": ["fred@a.test", "mallory@a.test"],
            "mallory@a.test": ["fred@a.test", "barney@b.test"],
            "stranger@c.test": [],  # known to nobody, knows nobody
            "alfred@a.test": [],  # "fred@a.test" is a substring of its address
        },
    )
    yield people
    stop_agents(people)


@pytest.fixture(scope="module")
def fred(people: dict[str, Person]) -> Person:
    return people["fred@a.test"]


@pytest.fixture(scope="module")
def barney(people: dict[str, Person]) -> Person:
    return people["barney@b.test"]


def parts_of(protected: bytes) -> tuple[str, list[bytes]]:
    headers, body = split_entity(protected)
    return headers.get_content_type(), split_multipart(body, headers.get_param("boundary"))


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# -- round trips ----------------------------------------------------------------------------


def test_sign_round_trip(fred: Person, barney: Person) -> None:
    protected = fred.pgp.sign(ENTITY, "fred@a.test")
    headers, _ = split_entity(protected)
    assert headers.get_content_type() == "multipart/signed"
    assert headers.get_param("protocol") == "application/pgp-signature"
    assert headers.get_param("micalg") == "pgp-sha256"  # what gpg used for Ed25519
    _, parts = parts_of(protected)
    assert parts[0] == ENTITY  # the signed part is the entity, octet for octet (§5)
    assert parts[1].startswith(b"Content-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP")

    opened = barney.pgp.open(protected)
    assert opened.status == "signed"
    assert opened.entity == ENTITY
    assert opened.signer == "fred@a.test"
    assert opened.identities == ("fred@a.test",)
    assert opened.fingerprint == fred.fingerprint
    assert opened.signed_at is not None
    assert abs(opened.signed_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_encrypt_round_trip(fred: Person, barney: Person) -> None:
    protected = fred.pgp.encrypt(ENTITY, ["barney@b.test"])
    media_type, parts = parts_of(protected)
    assert media_type == "multipart/encrypted"
    assert parts[0] == b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
    assert b"-----BEGIN PGP MESSAGE-----" in parts[1]
    assert b"Yabba" not in protected

    opened = barney.pgp.open(protected)
    assert (opened.status, opened.entity, opened.signer) == ("encrypted", ENTITY, None)
    # Fred encrypted to Barney only: his own key cannot read it.
    assert fred.pgp.open(protected).status == "cannot-decrypt"


def test_sign_and_encrypt_is_one_openpgp_message(fred: Person, barney: Person) -> None:
    protected = fred.pgp.encrypt(ENTITY, ["barney@b.test"], sign_as="fred@a.test")
    opened = barney.pgp.open(protected)
    assert opened.status == "signed-encrypted"
    assert (opened.entity, opened.signer, opened.fingerprint) == (
        ENTITY,
        "fred@a.test",
        fred.fingerprint,
    )
    # §6.2: what is encrypted is the entity itself, signed inside the OpenPGP message; no
    # multipart/signed within.
    _, parts = parts_of(protected)
    _, armoured = split_entity(parts[1])
    assert gpg(barney.home, "--decrypt", data=armoured).stdout == ENTITY


def test_signed_then_encrypted_multipart_is_opened(fred: Person, barney: Person) -> None:
    """RFC 3156 §6.1: multipart/signed inside multipart/encrypted."""
    signed = fred.pgp.sign(ENTITY, "fred@a.test")
    opened = barney.pgp.open(fred.pgp.encrypt(signed, ["barney@b.test"]))
    assert (opened.status, opened.entity, opened.signer) == (
        "signed-encrypted",
        ENTITY,
        "fred@a.test",
    )


def test_identities_are_the_live_user_ids(fred: Person) -> None:
    """Every user id of the signing key vouches for its address, until it is revoked."""
    home = fred.home.parent / "fred-uids"
    home.mkdir(mode=0o700)
    uid = "Fred <fred@a.test>"
    gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    gpg(home, "--quick-add-uid", "fred@a.test", "Fred <fred@work.test>")
    gpg(home, "--quick-add-uid", "fred@a.test", "Fred <fred@old.test>")
    keyring = OpenPGP(home)
    try:
        signed = keyring.sign(ENTITY, "fred@a.test")
        assert set(keyring.open(signed).identities) == {
            "fred@a.test",
            "fred@work.test",
            "fred@old.test",
        }
        gpg(home, "--quick-revoke-uid", "fred@a.test", "Fred <fred@old.test>")
        opened = keyring.open(signed)  # the same keyring object: nothing stale is kept
    finally:
        stop_agents({"x": Person("x", "x", home, "")})
    assert opened.status == "signed"
    assert set(opened.identities) == {"fred@a.test", "fred@work.test"}


# -- what goes wrong --------------------------------------------------------------------------


def test_one_flipped_byte_in_signed_content_is_detected(fred: Person, barney: Person) -> None:
    protected = fred.pgp.sign(ENTITY, "fred@a.test")
    at = protected.index(b"Yabba")
    opened = barney.pgp.open(flip(protected, at))
    assert opened.status == "bad-signature"
    assert "bad" in opened.reason
    assert opened.entity == b""


def test_one_flipped_byte_in_ciphertext_is_detected(fred: Person, barney: Person) -> None:
    protected = fred.pgp.encrypt(ENTITY, ["barney@b.test"], sign_as="fred@a.test")
    armour = protected.index(b"-----BEGIN PGP MESSAGE-----")
    # A character well inside the base64 of the encrypted data.
    at = protected.index(b"\r\n\r\n", armour) + 200
    tampered = (
        protected[:at] + (b"A" if protected[at : at + 1] != b"A" else b"B") + protected[at + 1 :]
    )
    opened = barney.pgp.open(tampered)
    assert opened.status in ("cannot-decrypt", "bad-signature")
    assert opened.entity == b""


def test_wrong_key_cannot_decrypt_cleanly(fred: Person, people: dict[str, Person]) -> None:
    protected = fred.pgp.encrypt(ENTITY, ["barney@b.test"])
    opened = people["stranger@c.test"].pgp.open(protected)
    assert opened.status == "cannot-decrypt"
    assert opened.reason.startswith("gpg: ")
    assert opened.entity == b""


def test_what_decrypts_to_more_than_the_limit_is_not_opened(
    fred: Person, barney: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenPGP compresses: a message of 1.5 KB can hold half a gigabyte of zeros, which
    the recipient would hold in memory in whole. gpg stops at MAX_DECRYPTED octets, and
    what it gave up to there, a part of a message, is not taken for the message."""
    monkeypatch.setattr(pgp, "MAX_DECRYPTED", 100_000)
    head = b"Content-Type: text/plain\r\n\r\n"
    bomb = fred.pgp.encrypt(head + bytes(200_000), ["barney@b.test"])
    assert len(bomb) < 5_000

    opened = barney.pgp.open(bomb)
    assert (opened.status, opened.entity) == ("cannot-decrypt", b"")
    assert opened.reason == "it decrypts to more than 100,000 octets (a compression bomb?)"
    within = head + bytes(90_000)
    assert barney.pgp.open(fred.pgp.encrypt(within, ["barney@b.test"])).entity == within


def test_unknown_signer_is_not_verified(people: dict[str, Person], barney: Person) -> None:
    """Not shown, as a bad signature is not; but said to be unchecked, for want of the
    key, which is no sign of tampering."""
    stranger = people["stranger@c.test"]
    opened = barney.pgp.open(stranger.pgp.sign(ENTITY, "stranger@c.test"))
    assert (opened.status, opened.unchecked) == ("bad-signature", True)
    assert opened.reason.startswith("the signer's key (key ")
    assert "is not in this keyring" in opened.reason


@pytest.mark.parametrize("nested", [False, True])
def test_signed_and_encrypted_by_unknown_signer_is_not_verified(
    people: dict[str, Person], barney: Person, nested: bool
) -> None:
    """Unchecked, not bad, whether signed and encrypted as one OpenPGP message (§6.2) or
    as a multipart/signed encrypted (§6.1): the latter was "bad signature", as if someone
    had changed it on the way, where the signer's key was only missing."""
    stranger = people["stranger@c.test"]
    exported = gpg(barney.home, "--export", barney.fingerprint).stdout
    gpg(stranger.home, "--import", data=exported)
    if nested:
        signed = stranger.pgp.sign(ENTITY, "stranger@c.test")
        protected = stranger.pgp.encrypt(signed, ["barney@b.test"])
    else:
        protected = stranger.pgp.encrypt(ENTITY, ["barney@b.test"], sign_as="stranger@c.test")
    opened = barney.pgp.open(protected)
    assert (opened.status, opened.unchecked) == ("bad-signature", True)
    assert "is not in this keyring" in opened.reason


@pytest.mark.parametrize("kind", ["signed", "encrypted"])
def test_octets_that_are_not_utf8_in_the_armor_give_a_verdict_not_a_hang(
    fred: Person, barney: Person, kind: str
) -> None:
    """Lines of 0xff after the armor line, written by any sender or relay: gpg echoes them
    on stderr, which python-gnupg's reader thread decoded as strict UTF-8 and died of;
    gpg then blocked on the full pipe, and the listener with it, for good."""
    protected = (
        fred.pgp.sign(ENTITY, "fred@a.test")
        if kind == "signed"
        else fred.pgp.encrypt(ENTITY, ["barney@b.test"])
    )
    armor = (
        b"-----BEGIN PGP SIGNATURE-----\r\n"
        if kind == "signed"
        else b"-----BEGIN PGP MESSAGE-----\r\n"
    )
    assert armor in protected
    crafted = protected.replace(armor, armor + b"\xff\r\n" * 2000)
    opened: list[object] = []
    opening = threading.Thread(target=lambda: opened.append(barney.pgp.open(crafted)), daemon=True)
    opening.start()
    opening.join(30)
    assert opened, "gpg is still running: the message hangs whoever opens it"
    # gpg passes over junk among the armor's header lines: the rest is intact.
    assert opened[0].status == kind


def test_a_key_with_a_passphrase_and_none_given_says_so(tmp_path: Path, fred: Person) -> None:
    """No pinentry is started (on a terminal it would take it over, and the messages after
    wait behind it): the message cannot be decrypted, and the reason says what is needed."""
    home = tmp_path / "locked"
    home.mkdir(mode=0o700)
    gpg(
        home,
        "--passphrase",
        "sekrit",
        "--quick-gen-key",
        "<locked@b.test>",
        "future-default",
        "default",
        "never",
    )
    gpg(fred.home, "--import", data=gpg(home, "--export", "locked@b.test").stdout)
    try:
        protected = fred.pgp.encrypt(ENTITY, ["locked@b.test"])
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
        opened = OpenPGP(home).open(protected)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
    assert opened.status == "cannot-decrypt"
    assert opened.reason == "the secret key needs its passphrase (--passphrase-file)"


def test_signature_part_must_be_detached(fred: Person, barney: Person) -> None:
    """A message Fred signed inline, put where the detached signature goes, vouches for
    its own text only: gpg refuses it, and so the content beside it is not verified."""
    for how in ("--sign", "--clearsign"):
        inline = gpg(fred.home, "--armor", how, "--local-user", fred.fingerprint, data=ENTITY)
        forged = ENTITY.replace(b"Yabba", b"Pay me")
        opened = barney.pgp.open(assemble_signed(forged, inline.stdout))
        assert opened.status == "bad-signature"


def test_signer_address_matches_exactly(people: dict[str, Person]) -> None:
    """gpg would take "fred@a.test" as a substring of alfred@a.test's user id."""
    alfred = people["alfred@a.test"]
    with pytest.raises(E2EError, match=r"cannot sign as fred@a\.test"):
        alfred.pgp.sign(ENTITY, "fred@a.test")
    with pytest.raises(E2EError, match="cannot encrypt"):
        alfred.pgp.encrypt(ENTITY, ["alfred@a.test"], sign_as="fred@a.test")


def test_sender_errors_raise(fred: Person) -> None:
    with pytest.raises(E2EError, match=r"cannot encrypt to nobody@x\.test"):
        fred.pgp.encrypt(ENTITY, ["nobody@x.test"])
    with pytest.raises(E2EError, match="at least one recipient"):
        fred.pgp.encrypt(ENTITY, [])
    with pytest.raises(E2EError):
        fred.pgp.sign(ENTITY, "nobody@x.test")


JUNK = [
    b"",
    b"\xff\xfe\x00garbage",
    b"Content-Type: text/plain\r\n\r\nhello",
    b"Content-Type: multipart/signed\r\n\r\nno boundary",
    b'Content-Type: multipart/signed; protocol="application/pgp-signature"\r\n\r\nx',
    b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=b\r\n'
    b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n",
    b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=b\r\n'
    b"\r\n--b\r\nhi\r\n--b\r\nContent-Type: text/plain\r\n\r\nnot a signature\r\n--b--\r\n",
    b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=b\r\n'
    b"\r\n--b\r\nhi\r\n--b\r\nContent-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP "
    b"SIGNATURE-----\r\n\r\nAAAA\r\n-----END PGP SIGNATURE-----\r\n--b--\r\n",
    b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=b\r\n'
    b"\r\n--b\r\nhi\r\n--b\r\nContent-Type: application/pgp-signature\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!\r\n--b--\r\n",
    b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=b\r\n\r\n',
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=b\r\n'
    b"\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 2\r\n--b\r\n"
    b"Content-Type: application/octet-stream\r\n\r\nx\r\n--b--\r\n",
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=b\r\n'
    b"\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--b\r\n"
    b"Content-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\n"
    b"hQEMA5Z\r\n-----END PGP MESSAGE-----\r\n--b--\r\n",
    b'Content-Type: multipart/encrypted; protocol="x"; boundary=b\r\n\r\n--b--\r\n',
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=b\r\n',
]


@pytest.mark.parametrize("junk", JUNK)
def test_junk_gives_a_verdict_never_an_exception(barney: Person, junk: bytes) -> None:
    opened = barney.pgp.open(junk)
    assert opened.status in ("plain", "bad-signature", "cannot-decrypt")
    if opened.status != "plain":
        assert opened.reason and opened.entity == b""


@pytest.fixture(scope="module")
def samples(fred: Person) -> list[bytes]:
    return [
        fred.pgp.sign(ENTITY, "fred@a.test"),
        fred.pgp.encrypt(ENTITY, ["barney@b.test"], sign_as="fred@a.test"),
    ]


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_mutated_messages_never_raise(
    barney: Person, samples: list[bytes], data: st.DataObject
) -> None:
    protected = data.draw(st.sampled_from(samples))
    at = data.draw(st.integers(0, len(protected) - 1))
    cut = data.draw(st.booleans())
    mutated = protected[:at] if cut else flip(protected, at)
    opened = barney.pgp.open(mutated)
    assert opened.status in (
        "plain",
        "signed",
        "bad-signature",
        "encrypted",
        "signed-encrypted",
        "cannot-decrypt",
    )
    if opened.status in ("signed", "signed-encrypted"):
        # Only a change outside what is signed (headers, boundary padding) may still verify.
        assert opened.entity == ENTITY


# -- interoperability with gpg itself --------------------------------------------------------


def assemble_signed(content: bytes, signature: bytes) -> bytes:
    """RFC 3156 §5 by hand, around gpg's own detached signature."""
    return (
        b'Content-Type: multipart/signed; boundary="by-hand"; micalg=pgp-sha256;\r\n'
        b' protocol="application/pgp-signature"\r\n\r\n'
        b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)\r\n"
        b"--by-hand\r\n" + content + b"\r\n--by-hand\r\n"
        b'Content-Type: application/pgp-signature; name="signature.asc"\r\n\r\n'
        + signature.replace(b"\n", b"\r\n")
        + b"\r\n--by-hand--\r\n"
    )


def assemble_encrypted(message: bytes) -> bytes:
    """RFC 3156 §4 by hand, around gpg's own armoured message."""
    return (
        b'Content-Type: multipart/encrypted; boundary="by-hand";\r\n'
        b' protocol="application/pgp-encrypted"\r\n\r\n'
        b"--by-hand\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        b"--by-hand\r\nContent-Type: application/octet-stream\r\n\r\n"
        + message.replace(b"\n", b"\r\n")
        + b"\r\n--by-hand--\r\n"
    )


def test_gpg_detached_signature_verified_by_imxp(fred: Person, barney: Person) -> None:
    signature = gpg(
        fred.home, "--armor", "--detach-sign", "--local-user", fred.fingerprint, data=ENTITY
    ).stdout
    opened = barney.pgp.open(assemble_signed(ENTITY, signature))
    assert (opened.status, opened.entity, opened.signer) == ("signed", ENTITY, "fred@a.test")


def test_gpg_encrypted_and_signed_opened_by_imxp(fred: Person, barney: Person) -> None:
    message = gpg(
        fred.home, "--armor", "--trust-model", "always", "--encrypt", "--sign",
        "--local-user", fred.fingerprint, "--recipient", barney.fingerprint,
        data=ENTITY,
    ).stdout  # fmt: skip
    opened = barney.pgp.open(assemble_encrypted(message))
    assert (opened.status, opened.entity, opened.signer) == (
        "signed-encrypted",
        ENTITY,
        "fred@a.test",
    )
    message = gpg(
        fred.home, "--armor", "--trust-model", "always", "--encrypt",
        "--recipient", barney.fingerprint, data=ENTITY,
    ).stdout  # fmt: skip
    assert barney.pgp.open(assemble_encrypted(message)).status == "encrypted"


def test_imxp_signature_verified_by_gpg(fred: Person, barney: Person, tmp_path: Path) -> None:
    _, (content, signature_part) = parts_of(fred.pgp.sign(ENTITY, "fred@a.test"))
    _, signature = split_entity(signature_part)
    (tmp_path / "content").write_bytes(content)
    (tmp_path / "content.asc").write_bytes(signature)
    result = gpg(
        barney.home, "--status-fd", "1", "--verify",
        str(tmp_path / "content.asc"), str(tmp_path / "content"),
    )  # fmt: skip
    assert f"VALIDSIG {fred.fingerprint}".encode() in result.stdout
    assert b"GOODSIG" in result.stdout


def test_imxp_encryption_decrypted_by_gpg(fred: Person, barney: Person) -> None:
    _, (_, data) = parts_of(fred.pgp.encrypt(ENTITY, ["barney@b.test"], "fred@a.test"))
    _, message = split_entity(data)
    result = gpg(barney.home, "--status-fd", "2", "--decrypt", data=message)
    assert result.stdout == ENTITY
    assert f"VALIDSIG {fred.fingerprint}".encode() in result.stderr
