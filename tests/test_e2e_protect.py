"""Protected instant messages end to end (RFC 3923's model): a whole message/cpim signed,
encrypted or both with OpenPGP or S/MIME, carried as APEX content, opened and judged."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms
from hypothesis import given, settings
from hypothesis import strategies as st
from test_e2e_pgp import gpg, make_keyrings, stop_agents

from imxp.apex import wire
from imxp.beep.message import Message
from imxp.certs import Issued, create_ca
from imxp.e2e import cpim, smime
from imxp.e2e.pgp import OpenPGP
from imxp.e2e.protect import (
    CPIM_ENTITY_HEADER,
    E2EError,
    Keys,
    MIMEError,
    ReplayCache,
    Report,
    content_from_entity,
    open_message,
    protect_cpim,
)

NOW = datetime.now(UTC).replace(microsecond=0)
MODES = ["sign", "encrypt", "sign+encrypt"]
SCHEMES = ["pgp", "smime"]


@pytest.fixture(scope="module")
def keyrings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    people = make_keyrings(
        tmp_path_factory.mktemp("gpg"),
        {
            "fred@a.test": ["barney@b.test"],
            "barney@b.test": ["fred@a.test", "mallory@a.test"],
            "mallory@a.test": ["fred@a.test", "barney@b.test"],
        },
    )
    yield {address: person.home for address, person in people.items()}
    stop_agents(people)


# The messages here are dated NOW, taken when the module is imported, and read as at NOW;
# certificates issued at the first test are valid from a few minutes before then, which
# on a slow run is after NOW. They are valid from the day before instead.
VALID_FROM = NOW - timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return create_ca("imxp e2e test CA", valid_from=VALID_FROM)


@pytest.fixture(scope="module")
def certs(ca: Issued) -> dict[str, Issued]:
    return {
        address: smime.issue_smime(ca, address, rsa_bits=2048, valid_from=VALID_FROM)
        for address in ("fred@a.test", "barney@b.test", "mallory@a.test")
    }


@pytest.fixture(scope="module")
def keys(keyrings: dict[str, Path], certs: dict[str, Issued], ca: Issued) -> dict[str, Keys]:
    """Each person's keys: their keyring, their certificate, the CA as trust anchor."""
    return {
        address: Keys(pgp=OpenPGP(home), smime=certs[address], trust=(ca.certificate,))
        for address, home in keyrings.items()
    }


def message(sender: str = "fred@a.test", date: datetime = NOW, text: str = "Yabba!") -> bytes:
    return cpim.build(cpim.text_message(sender, ["barney@b.test"], text, date=date))


def protect(
    keys: dict[str, Keys],
    certs: dict[str, Issued],
    scheme: str,
    mode: str,
    content: bytes,
    signer: str = "fred@a.test",
) -> tuple[str, bytes]:
    recipients = [certs["barney@b.test"].certificate] if scheme == "smime" else None
    return protect_cpim(
        content,
        mode,  # type: ignore[arg-type]
        scheme,  # type: ignore[arg-type]
        keys[signer],
        recipients=recipients,
        signer=signer if scheme == "pgp" else None,
    )


def over_apex(content_type: str, body: bytes) -> tuple[str, bytes]:
    """What a recipient gets after the content crossed relays: encoded as an APEX data and
    decoded again (RFC 3340 §4.1), its full Content-Type read back from the part."""
    data = wire.Data(
        wire.Originator("fred@a.test"),
        [wire.Recipient("barney@b.test")],
        content=wire.Content.from_bytes(body, content_type),
    )
    decoded = wire.decode(Message.from_payload(wire.encode(data).to_payload()))
    assert isinstance(decoded, wire.Data) and decoded.content is not None
    headers = dict((name.lower(), value) for name, value in decoded.content.headers)
    return headers["content-type"], decoded.content.body


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_mode_round_trips(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str, mode: str
) -> None:
    content = message()
    content_type, body = protect(keys, certs, scheme, mode, content)
    received_type, received = over_apex(content_type, body)
    assert received == body  # relays carry it byte for byte

    report = open_message(received_type, received, keys["barney@b.test"], now=NOW)
    assert report.scheme == scheme
    assert report.presentable, report.problems
    assert report.problems == []
    assert report.encrypted is (mode != "sign")
    if mode == "encrypt":
        assert (report.status, report.signer) == ("encrypted-and-decrypted", None)
    else:
        assert (report.status, report.signer) == ("signed-and-verified", "fred@a.test")
    assert report.cpim is not None
    assert (report.cpim.sender, report.cpim.to, report.cpim.text()) == (
        "fred@a.test",
        ["barney@b.test"],
        "Yabba!",
    )
    assert report.entity == CPIM_ENTITY_HEADER + content
    if mode != "sign":
        # RFC 3923 §3.1: the CPIM headers are protected too, not just the text.
        assert b"Yabba" not in body and b"fred@a.test" not in body


def test_pgp_defaults_to_cpim_from_and_recipients(keys: dict[str, Keys]) -> None:
    content = cpim.build(
        cpim.text_message("fred/appl=im@a.test", ["barney/appl=im@b.test"], "hi", date=NOW)
    )
    content_type, body = protect_cpim(content, "sign+encrypt", "pgp", keys["fred@a.test"])
    report = open_message(content_type, body, keys["barney@b.test"], now=NOW)
    assert (report.status, report.signer, report.presentable) == (
        "signed-and-verified",
        "fred@a.test",
        True,
    )


def test_plain_messages(keys: dict[str, Keys]) -> None:
    report = open_message("message/cpim", message(), keys["barney@b.test"], now=NOW)
    assert (report.status, report.presentable, report.signer) == ("plain", True, None)
    assert report.cpim is not None and report.cpim.text() == "Yabba!"

    report = open_message("text/plain; charset=utf-8", b"hi", keys["barney@b.test"], now=NOW)
    assert (report.status, report.presentable, report.cpim) == ("plain", True, None)

    report = open_message("message/cpim", b"From: nobody\r\n\r\n", Keys(), now=NOW)
    assert not report.presentable
    assert report.problems[0].startswith("malformed message/cpim")


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain; protocol*=undefined''x", "plain"),
        ("multipart/signed; protocol*=undefined''x; boundary=b", "plain"),
        (
            "multipart/signed; protocol*=idna''application%2Fpgp-signature; boundary=b",
            "signed-but-bad",
        ),
    ],
)
def test_a_parameter_in_a_charset_that_is_no_texts_is_read_not_raised(
    content_type: str, status: str
) -> None:
    """RFC 2231 lets a sender name the charset of a parameter's value; one that names no
    text encoding is read as ASCII, as email does for an unknown one: a report, as for
    anything received, never an exception."""
    report = open_message(content_type, b"--b\r\n\r\nhi\r\n--b--\r\n", Keys(), now=NOW)
    assert report.status == status


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sign", "sign+encrypt"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_signer_who_is_not_the_from_is_refused(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str, mode: str
) -> None:
    """Mallory's signature is good, but the message claims to be from Fred."""
    content_type, body = protect(keys, certs, scheme, mode, message(), signer="mallory@a.test")
    report = open_message(content_type, body, keys["barney@b.test"], now=NOW)
    assert (report.status, report.signer) == ("signed-and-verified", "mallory@a.test")
    assert not report.presentable
    assert report.problems == ["signer mallory@a.test is not the From fred@a.test"]


@pytest.mark.parametrize(
    ("uid", "signer", "problems"),
    [
        # gpg finds this key as <mallory@a.test>, never as <fred@a.test>: what comes before
        # the angle brackets is a name, however like an address it looks. RFC 5322's
        # parser took it for the address, and Mallory's message passed for Fred's.
        (
            "fred@a.test <mallory@a.test>",
            "mallory@a.test",
            ["signer mallory@a.test is not the From fred@a.test"],
        ),
        # An IM identity as an im: URI (RFC 3860), as in <im:fred@a.test>, was read as no
        # address at all, and Fred's own message was refused.
        ("Fred <im:fred@a.test>", "fred@a.test", []),
    ],
)
def test_the_address_of_a_pgp_user_id_is_the_one_gpg_reads(
    tmp_path: Path, uid: str, signer: str, problems: list[str]
) -> None:
    signing, reading = tmp_path / "signing", tmp_path / "reading"
    signing.mkdir(mode=0o700)
    reading.mkdir(mode=0o700)
    try:
        gpg(signing, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        gpg(reading, "--import", data=gpg(signing, "--export").stdout)
        content_type, body = protect_cpim(
            message(), "sign", "pgp", Keys(pgp=OpenPGP(signing)), signer=uid
        )
        report = open_message(content_type, body, Keys(pgp=OpenPGP(reading)), now=NOW)
    finally:
        for home in (signing, reading):
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "all"],
                capture_output=True,
                check=False,
            )
    assert (report.status, report.signer) == ("signed-and-verified", signer)
    assert report.problems == problems
    assert report.presentable is (not problems)


@pytest.mark.parametrize("mode", ["sign", "sign+encrypt"])
def test_a_key_the_signature_carries_is_not_imported_and_believed(
    tmp_path: Path, mode: str
) -> None:
    """With auto-key-import in the reader's gpg.conf, gpg took the key Mallory embedded
    in her signature (include-key-block), made by her as "Fred <fred@a.test>", into the
    keyring, and her message From fred@a.test was shown as signed by him. Only keys
    the user imported are believed: hers is one nobody has, and stays so."""
    people = make_keyrings(tmp_path, {"barney@b.test": [], "forger@c.test": ["barney@b.test"]})
    barney, forger = people["barney@b.test"], people["forger@c.test"]
    try:
        (barney.home / "gpg.conf").write_text("auto-key-import\n")
        (forger.home / "gpg.conf").write_text("include-key-block\n")
        gpg(forger.home, "--quick-add-uid", forger.fingerprint, "Fred <fred@a.test>")
        # The key a signature carries has the primary user id only.
        gpg(forger.home, "--quick-set-primary-uid", forger.fingerprint, "Fred <fred@a.test>")
        content_type, body = protect_cpim(
            message(), mode, "pgp", Keys(pgp=OpenPGP(forger.home)), signer=forger.fingerprint
        )
        reader = Keys(pgp=OpenPGP(barney.home))
        for _ in range(2):
            report = open_message(content_type, body, reader, now=NOW)
            assert (report.status, report.presentable) == ("signed-but-bad", False)
            assert report.problems[0].startswith("signature not checked: ")
    finally:
        stop_agents(people)


def countersigned(signed_data: bytes, by: Issued, *, first: bool) -> bytes:
    """The S/MIME SignedData ``signed_data`` with a SignerInfo by ``by`` added, over the
    same content, first or last: what anyone who passes a signed message on can do
    (RFC 5652 §5.1: signerInfos is a SET OF them, each over the content alone)."""
    info = cms.ContentInfo.load(signed_data)
    signed = info["content"]
    content = signed["encap_content_info"]["content"].native
    theirs = cms.ContentInfo.load(content_from_entity(smime.sign(content, by, detached=False))[1])
    ours_signer, added_signer = signed["signer_infos"][0], theirs["content"]["signer_infos"][0]
    signed["certificates"] = [*signed["certificates"], *theirs["content"]["certificates"]]
    signed["signer_infos"] = [ours_signer, added_signer]
    der = info.dump(force=True)
    ours, added = ours_signer.dump(), added_signer.dump()
    # DER sorts a SET OF; whoever adds the SignerInfo writes the order they like.
    wanted = added + ours if first else ours + added
    der = der.replace(added + ours, wanted).replace(ours + added, wanted)
    assert wanted in der
    return der


@pytest.mark.parametrize("first", [True, False])
def test_a_signature_added_by_someone_else_vouches_for_nobody(
    keys: dict[str, Keys], certs: dict[str, Issued], ca: Issued, first: bool
) -> None:
    """Mallory adds her own SignerInfo to the SignedData of Fred's signed message. Both
    signatures hold, but her certificate does not name the From (RFC 3923 §6.3): the
    message is not shown. Put first, hers was the one reported, so Fred's message was
    shown as "signed by mallory@a.test" without a warning - and, remembered as Fred's by
    the replay cache, shown again when it was replayed so. Signatures by two
    certificates of Fred's are his message still."""
    signed = smime.sign(CPIM_ENTITY_HEADER + message(), certs["fred@a.test"], detached=False)
    content_type, body = content_from_entity(signed)
    replays = ReplayCache()
    barney = keys["barney@b.test"]
    assert open_message(content_type, body, barney, now=NOW, replays=replays).presentable

    forged = countersigned(body, certs["mallory@a.test"], first=first)
    for cache in (None, replays):
        report = open_message(content_type, forged, barney, now=NOW, replays=cache)
        assert (report.status, report.signer, report.presentable) == (
            "signed-but-bad",
            None,
            False,
        )
        assert report.problems == [
            "bad signature: its signers' certificates name no identity in common ("
            + ("mallory@a.test; fred@a.test)" if first else "fred@a.test; mallory@a.test)")
        ]

    another_of_freds = smime.issue_smime(ca, "fred@a.test", rsa_bits=None, valid_from=VALID_FROM)
    twice = countersigned(body, another_of_freds, first=first)
    report = open_message(content_type, twice, barney, now=NOW)
    assert (report.signer, report.presentable) == ("fred@a.test", True), report.problems


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signed_message_passed_on_to_another_recipient_is_refused(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str
) -> None:
    """Fred signed it for Barney; Barney re-encrypts it, still signed, to Mallory."""
    content_type, body = protect(keys, certs, scheme, "sign", message())
    report = open_message(
        content_type, body, keys["mallory@a.test"], now=NOW, recipient="mallory@a.test"
    )
    assert (report.status, report.signer, report.presentable) == (
        "signed-and-verified",
        "fred@a.test",
        False,
    )
    assert report.problems[0].startswith("not addressed to mallory@a.test (To/cc: barney@b.test)")
    to_barney = open_message(
        content_type, body, keys["barney@b.test"], now=NOW, recipient="barney/appl=im@b.test"
    )
    assert to_barney.presentable, to_barney.problems


@pytest.mark.parametrize("scheme", SCHEMES)
def test_subaddress_of_the_signer_may_send(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str
) -> None:
    """RFC 3923 §6.3 ignores the resource; an APEX subaddress is its kin."""
    content = message(sender="fred/appl=im@a.test")
    content_type, body = protect(keys, certs, scheme, "sign", content)
    report = open_message(content_type, body, keys["barney@b.test"], now=NOW)
    assert report.presentable, report.problems
    assert report.cpim is not None and report.cpim.sender == "fred/appl=im@a.test"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_old_and_future_datetimes_are_refused(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str
) -> None:
    old = message(date=NOW - timedelta(minutes=6))  # RFC 3923 §6.9: within five minutes
    content_type, body = protect(keys, certs, scheme, "sign", old)
    report = open_message(content_type, body, keys["barney@b.test"], now=NOW)
    assert report.status == "signed-and-verified"
    assert not report.presentable
    assert report.problems[0].startswith("stale or replayed: DateTime ")

    # The same message is fine within a wider window, e.g. after a relay held it.
    wide = open_message(
        content_type, body, keys["barney@b.test"], now=NOW, window=timedelta(hours=1)
    )
    assert wide.presentable

    future = message(date=NOW + timedelta(minutes=6))
    content_type, body = protect(keys, certs, scheme, "sign", future)
    report = open_message(content_type, body, keys["barney@b.test"], now=NOW)
    assert not report.presentable
    assert "in the future" in report.problems[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_exact_replay_within_the_window_is_refused(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str
) -> None:
    content_type, body = protect(keys, certs, scheme, "sign+encrypt", message())
    replays = ReplayCache()
    first = open_message(content_type, body, keys["barney@b.test"], now=NOW, replays=replays)
    assert first.presentable
    again = open_message(content_type, body, keys["barney@b.test"], now=NOW, replays=replays)
    assert not again.presentable
    assert again.problems[0].startswith("replayed: the same message from fred@a.test")
    # A new message from the same sender in the same second is not a replay.
    other_type, other = protect(keys, certs, scheme, "sign", message(text="again"))
    assert open_message(
        other_type, other, keys["barney@b.test"], now=NOW, replays=replays
    ).presentable


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_same_text_sent_twice_within_a_second_is_no_replay(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines pasted into ``imxp chat --sign`` go out within a second, and some repeat
    ("ok", "}"). Dated in whole seconds, the second was the first octet for octet, and
    its reader was told it was a replay instead of being shown it."""
    sent_at = iter([NOW + timedelta(milliseconds=100), NOW + timedelta(milliseconds=600)])

    class Clock(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return next(sent_at, NOW)  # parse() takes one for a default it replaces

    monkeypatch.setattr(cpim, "datetime", Clock)
    replays = ReplayCache()
    for _ in range(2):
        content = cpim.build(cpim.text_message("fred@a.test", ["barney@b.test"], "ok"))
        content_type, body = protect(keys, certs, scheme, "sign", content)
        report = open_message(content_type, body, keys["barney@b.test"], now=NOW, replays=replays)
        assert report.presentable, report.problems


def test_replay_cache_is_bounded() -> None:
    cache = ReplayCache(size=2)
    window = timedelta(minutes=5)
    assert not cache.seen(b"stale", NOW - timedelta(minutes=10), NOW, window)
    assert not cache.seen(b"a", NOW, NOW, window)
    assert not cache.seen(b"b", NOW, NOW, window)  # full: the stale entry makes room
    assert len(cache) == 2
    assert cache.seen(b"a", NOW, NOW, window)
    assert not cache.seen(b"c", NOW, NOW, window)  # full: the oldest goes
    assert len(cache) == 2
    assert not cache.seen(b"a", NOW, NOW, window)
    with pytest.raises(ValueError):
        ReplayCache(size=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_flipped_byte_on_the_wire_is_detected(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str, mode: str
) -> None:
    content_type, body = protect(keys, certs, scheme, mode, message())
    # In the signed text itself, or in the middle of the ciphertext.
    at = body.index(b"Yabba") if mode == "sign" else len(body) // 2
    report = open_message(content_type, flip(body, at), keys["barney@b.test"], now=NOW)
    assert report.status in ("signed-but-bad", "cannot-decrypt")
    assert not report.presentable
    assert len(report.problems) == 1
    assert report.cpim is None and report.entity == b""
    # It was sent encrypted all the same: not to be taken for one sent in clear.
    assert report.encrypted is (mode != "sign")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_key_fails_cleanly(
    keys: dict[str, Keys], certs: dict[str, Issued], scheme: str
) -> None:
    content_type, body = protect(keys, certs, scheme, "encrypt", message())
    report = open_message(content_type, body, keys["mallory@a.test"], now=NOW)
    assert (report.status, report.presentable, report.cpim) == ("cannot-decrypt", False, None)
    assert report.problems[0].startswith("cannot decrypt: ")
    assert report.encrypted
    if scheme == "smime":
        # Without its smime-type parameter (RFC 8551 §3.2.2 only says SHOULD) the CMS
        # content itself still says it was sent encrypted.
        bare = re.sub(r";\s*smime-type=[^;]*", "", content_type)
        assert bare != content_type
        assert open_message(bare, body, keys["mallory@a.test"], now=NOW).encrypted
    # And without any key at all.
    report = open_message(content_type, body, Keys(), now=NOW)
    assert (report.status, report.presentable) == ("cannot-decrypt", False)


def test_a_signature_by_a_key_not_in_the_keyring_is_unchecked_not_bad(
    keys: dict[str, Keys], certs: dict[str, Issued]
) -> None:
    """Fred's keyring has no key of mallory's: her message is not shown, and the reason
    says the signature could not be checked and how to check it, not that it is bad,
    which would say someone changed it on the way."""
    content_type, body = protect(
        keys, certs, "pgp", "sign", message("mallory@a.test"), signer="mallory@a.test"
    )
    report = open_message(content_type, body, keys["fred@a.test"], now=NOW)
    assert (report.status, report.presentable) == ("signed-but-bad", False)
    [problem] = report.problems
    assert re.fullmatch(
        r"signature not checked: the signer's key \(key [0-9A-F]{16}\) is not in this keyring "
        r"\(import it, if you trust it, to check such signatures\)",
        problem,
    ), problem


def test_missing_keys_on_receipt(keys: dict[str, Keys], certs: dict[str, Issued]) -> None:
    content_type, body = protect(keys, certs, "pgp", "sign", message())
    report = open_message(content_type, body, Keys(), now=NOW)
    assert (report.status, report.presentable) == ("signed-but-bad", False)
    # Not shown, but nothing says it was tampered with: there was nothing to check it by.
    assert report.problems == [
        "signature not checked: no OpenPGP keyring to open it with",
    ]
    content_type, body = protect(keys, certs, "smime", "sign", message())
    report = open_message(content_type, body, Keys(), now=NOW)
    assert (report.status, report.presentable) == ("signed-but-bad", False)
    assert report.problems == [
        "signature not checked: no S/MIME trust anchors to verify against (trust the "
        "signer's certificate authority to check such signatures)"
    ]


def test_protected_content_must_be_cpim(certs: dict[str, Issued], ca: Issued) -> None:
    """A signature over a bare text protects no sender and no date."""
    signed = smime.sign(
        b"Content-Type: text/plain\r\n\r\nI am Fred, trust me", certs["fred@a.test"]
    )
    head, _, body = signed.partition(b"\r\n\r\n")
    content_type = head.decode().removeprefix("Content-Type: ")
    report = open_message(content_type, body, Keys(trust=(ca.certificate,)), now=NOW)
    assert report.status == "signed-and-verified"
    assert not report.presentable
    assert "not message/cpim" in report.problems[0]


def test_sender_errors(keys: dict[str, Keys], certs: dict[str, Issued]) -> None:
    fred = keys["fred@a.test"]
    with pytest.raises(ValueError, match="mode"):
        protect_cpim(message(), "shout", "pgp", fred)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheme"):
        protect_cpim(message(), "sign", "rot13", fred)  # type: ignore[arg-type]
    with pytest.raises(E2EError, match="keyring"):
        protect_cpim(message(), "sign", "pgp", Keys())
    with pytest.raises(E2EError, match="recipients' certificates"):
        protect_cpim(message(), "encrypt", "smime", fred)
    with pytest.raises(E2EError, match="recipients' certificates"):
        protect_cpim(message(), "encrypt", "smime", fred, recipients=["barney@b.test"])
    with pytest.raises(E2EError, match="S/MIME certificate"):
        protect_cpim(message(), "sign", "smime", Keys())
    with pytest.raises(E2EError, match="sender and recipients"):
        protect_cpim(b"not cpim", "encrypt", "pgp", fred)


def test_now_must_be_timezone_aware(keys: dict[str, Keys]) -> None:
    with pytest.raises(ValueError, match="timezone"):
        open_message("message/cpim", message(), keys["barney@b.test"], now=datetime.now())


JUNK_TYPES = [
    "multipart/signed",
    'multipart/signed; protocol="application/pgp-signature"; boundary=x',
    'multipart/signed; protocol="application/pkcs7-signature"; boundary=x',
    'multipart/encrypted; protocol="application/pgp-encrypted"; boundary=x',
    "application/pkcs7-mime; smime-type=enveloped-data",
    "message/cpim",
    "text/plain",
    "bad\r\ninjected: header",
    ";;;",
]


@settings(max_examples=40, deadline=None)
@given(content_type=st.sampled_from(JUNK_TYPES), body=st.binary(max_size=200))
def test_junk_is_reported_never_raised(
    keys: dict[str, Keys], content_type: str, body: bytes
) -> None:
    report = open_message(content_type, body, keys["barney@b.test"], now=NOW)
    assert isinstance(report, Report)
    if report.status != "plain":
        assert not report.presentable and report.problems


def test_a_transfer_encoding_with_octets_outside_ascii_is_a_mime_error() -> None:
    # compat32 gives such a value as an email.header.Header, not a str (found by the
    # mutation property test of test_e2e_smime.py).
    with pytest.raises(MIMEError, match="unsupported Content-Transfer-Encoding"):
        content_from_entity(b"Content-Transfer-Encoding: b\x80\r\n\r\nx")


def test_a_content_type_with_octets_outside_ascii_is_read_as_text() -> None:
    content_type, body = content_from_entity(b"Content-Type: text/pl\xe9in\r\n\r\nx")
    assert isinstance(content_type, str) and content_type.startswith("text/pl")
    assert body == b"x"
