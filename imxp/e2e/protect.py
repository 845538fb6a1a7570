"""End-to-end protection of instant messages: the whole ``message/cpim`` signed, encrypted
or both, with OpenPGP (RFC 3156) or S/MIME (RFC 8551), as RFC 3923 does for XMPP.

RFC 3923 §3.1 is the model: the sender builds the ``message/cpim`` object and protects it
entire, headers included, so that From, To and DateTime are covered by the signature and
hidden by the encryption. Relays carry the result as opaque content (RFC 3340 §4.4.4.1).

On receipt, :func:`open_message` undoes the protection and says what it found as a
:class:`Report`: plain, signed-and-verified (by whom), signed-but-bad,
encrypted-and-decrypted, or cannot-decrypt. It refuses to present a message whose
verified signer is not its CPIM From (RFC 3923 §6.3), a signed message dated outside a
window around now, or an exact replay of one seen lately (RFC 3923 §6.9).

This module also holds what :mod:`imxp.e2e.pgp` and :mod:`imxp.e2e.smime` share: the
:class:`Opened` result and the few MIME routines they need. MIME is written here by hand
with CRLF line ends, and multipart bodies are split here too, because a signature covers
the exact octets of the signed body part (RFC 3156 §5, RFC 8551 §3.1.1) and the ``email``
package re-serialises the parts it parses and generates. Headers are read with
``email``'s parser.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import email.utils
import hashlib
import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import TYPE_CHECKING, Literal

from imxp.apex.address import AddressError, Endpoint

if TYPE_CHECKING:
    from cryptography import x509

    from imxp.certs import Issued
    from imxp.e2e.cpim import CPIMMessage
    from imxp.e2e.pgp import OpenPGP

__all__ = [
    "CPIM_ENTITY_HEADER",
    "E2EError",
    "Keys",
    "MIMEError",
    "Mode",
    "Opened",
    "OpenedStatus",
    "ReplayCache",
    "Report",
    "ReportStatus",
    "Scheme",
    "protect_cpim",
    "open_message",
    "scheme_of",
    "content_from_entity",
    "entity_from_content",
    "split_entity",
    "split_multipart",
    "build_multipart",
    "decoded_body",
    "base64_lines",
    "param",
    "is_one_of",
]

Mode = Literal["sign", "encrypt", "sign+encrypt"]
Scheme = Literal["pgp", "smime"]
OpenedStatus = Literal[
    "plain", "signed", "bad-signature", "encrypted", "signed-encrypted", "cannot-decrypt"
]
ReportStatus = Literal[
    "plain", "signed-and-verified", "signed-but-bad", "encrypted-and-decrypted", "cannot-decrypt"
]

#: The header that makes a ``message/cpim`` content into the MIME entity that is protected.
CPIM_ENTITY_HEADER = b"Content-Type: message/cpim\r\n\r\n"

# RFC 3923 §6.9: "within five minutes of the current time".
_DEFAULT_WINDOW = timedelta(minutes=5)
# RFC 2046 §5.1.1: bcharsnospace / bchars, 1 to 70 of them, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")
# compat32, not the default policy's header registry: it reads the few Content-Type
# parameters needed here (RFC 2231 included) as well, some twenty times faster, and it
# never raises on odd input (the registry's parser has, in some Python versions).
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
# RFC 5322 §2.2.3: unfolding removes a line break that is followed by white space.
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class MIMEError(ValueError):
    """A MIME entity that cannot be read, with the reason."""


class E2EError(Exception):
    """A message could not be protected (a missing key or certificate, a refused recipient).

    Raised on the sending side only; what is received is reported, never raised.
    """


@dataclass(frozen=True)
class Opened:
    """What undoing one layer of protection found (one scheme's ``open``).

    ``entity`` is the inner MIME entity (headers, blank line, body) - the input itself when
    ``status`` is "plain", empty when the signature is bad or nothing could be decrypted
    (so that nothing unverified is shown by mistake). ``signer`` is the identity the
    signature was verified for (an e-mail address or endpoint from the key's user id or
    the certificate), ``identities`` every identity the signing key or certificate
    carries, ``fingerprint`` the key's or certificate's fingerprint, ``signed_at`` the
    time the signer claims to have signed. ``reason`` says why a signature is bad or
    decryption failed, and notes anything else worth knowing; ``unchecked`` that a bad
    signature is one that could not be checked at all (no key or trust anchor for it),
    not one found wrong. ``sent_encrypted`` says it came encrypted whatever came of it:
    also when it could not be decrypted, or was decrypted to a bad signature.
    """

    entity: bytes
    status: OpenedStatus
    signer: str | None = None
    fingerprint: str | None = None
    signed_at: datetime | None = None
    reason: str = ""
    identities: tuple[str, ...] = ()
    sent_encrypted: bool = False
    unchecked: bool = False

    @property
    def verified(self) -> bool:
        """Whether a signature was present and good."""
        return self.status in ("signed", "signed-encrypted")


@dataclass(frozen=True)
class Keys:
    """The keys and certificates one endpoint protects and opens messages with.

    ``pgp`` is the user's OpenPGP keyring (which is also their trust decision: a key in it
    is believed for the user ids it carries); ``smime`` their own S/MIME certificate and
    key (signs and decrypts); ``trust`` the S/MIME trust anchors signers must chain to.
    """

    pgp: OpenPGP | None = None
    pgp_passphrase: str | None = None
    smime: Issued | None = None
    trust: tuple[x509.Certificate, ...] = ()


@dataclass
class Report:
    """What a received content turned out to be, and whether to show it.

    ``status`` is the authenticity verdict: a signed message is "signed-and-verified" or
    "signed-but-bad" whether or not it was also encrypted (``encrypted`` says that).
    ``signer`` is the verified identity, ``cpim`` the inner CPIM message when there is one
    that parses. ``presentable`` is False when the message must not be shown as it is
    (RFC 3923 §6.7-§6.9): then ``problems`` says why.
    """

    status: ReportStatus
    scheme: Scheme | None = None
    encrypted: bool = False
    signer: str | None = None
    fingerprint: str | None = None
    signed_at: datetime | None = None
    cpim: CPIMMessage | None = None
    entity: bytes = b""
    problems: list[str] = field(default_factory=list)
    presentable: bool = True


class ReplayCache:
    """Signed messages received lately, to recognise an exact replay (RFC 3923 §6.9).

    A message is remembered by its signer, DateTime and digest for as long as its DateTime
    is within the window; older ones are refused as stale anyway. At most ``size`` are
    kept: when full, stale entries go first, then the oldest ones, so a flood of distinct
    messages can push a genuine one out before a replay of it arrives.
    """

    def __init__(self, size: int = 10_000) -> None:
        if size < 1:
            raise ValueError("size must be positive")
        self._size = size
        self._seen: OrderedDict[bytes, datetime] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, key: bytes, date: datetime, now: datetime, window: timedelta) -> bool:
        """Whether ``key`` was recorded before; records it if not."""
        if key in self._seen:
            return True
        if len(self._seen) >= self._size:
            for old in [k for k, d in self._seen.items() if d < now - window]:
                del self._seen[old]
            while len(self._seen) >= self._size:
                self._seen.popitem(last=False)
        self._seen[key] = date
        return False


# -- MIME ---------------------------------------------------------------------------------


def split_entity(raw: bytes) -> tuple[Message, bytes]:
    """A MIME entity's headers (parsed) and its body octets, exactly as they are.

    The header section ends at the first empty line (RFC 5322 §2.1, RFC 2045 §3); LF line
    ends are accepted on receipt as well as CRLF. An entity without an empty line is all
    headers and no body. Never raises: the parser keeps what it cannot read as defects,
    and a part without a Content-Type is text/plain (RFC 2045 §5.2).
    """
    crlf, lf = raw.find(b"\r\n\r\n"), raw.find(b"\n\n")
    if raw.startswith((b"\r\n", b"\n")):
        head, body = b"", raw[2:] if raw.startswith(b"\r\n") else raw[1:]
    elif crlf >= 0 and (lf < 0 or crlf < lf):
        head, body = raw[: crlf + 2], raw[crlf + 4 :]
    elif lf >= 0:
        head, body = raw[: lf + 1], raw[lf + 2 :]
    else:
        head, body = raw, b""
    return _HEADERS.parsebytes(head), body


def _field(headers: Message, name: str, default: str) -> str:
    """A header's value as text: for a value with octets outside ASCII, compat32 hands
    back an ``email.header.Header``, which has none of str's methods."""
    value = headers.get(name)
    return default if value is None else str(value)


def param(headers: Message, name: str) -> str | None:
    """The Content-Type parameter ``name``, RFC 2231 continuations and charsets undone."""
    value = headers.get_param(name)
    if value is None or isinstance(value, str):
        return value
    try:
        return email.utils.collapse_rfc2231_value(value)
    except UnicodeError:
        # A charset that is no text's (undefined, idna), chosen by the sender: read as
        # ASCII, as email itself does for one it does not know.
        return email.utils.collapse_rfc2231_value(("us-ascii", value[1], value[2]))


def split_multipart(body: bytes, boundary: str | None) -> list[bytes]:
    """The body parts of a multipart body, each exactly as it stands between delimiters.

    RFC 2046 §5.1.1: a delimiter is "--" and the boundary at the start of a line, followed
    by optional white space and a line end; the line end before it belongs to the
    delimiter, not to the part. The body must end with a close delimiter. Raises
    :class:`MIMEError`.
    """
    if boundary is None or not _BOUNDARY.match(boundary):
        raise MIMEError(f"multipart without a valid boundary ({boundary!r})")
    delimiter = re.compile(
        rb"(?:\A|\r?\n)--" + re.escape(boundary.encode("ascii")) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    parts: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            if start is None:
                raise MIMEError("multipart closes before its first part")
            return parts
        start = match.end()
    raise MIMEError("multipart without a close delimiter (RFC 2046 §5.1.1)")


def build_multipart(subtype: str, params: Sequence[tuple[str, str]], parts: list[bytes]) -> bytes:
    """A ``multipart/subtype`` entity of ``parts`` (RFC 2046 §5.1.1), lines ending in CRLF.

    The boundary is random and checked not to occur in any part, so the parts go in
    untouched.
    """
    while True:
        boundary = f"imxp-{secrets.token_hex(12)}"
        if not any(boundary.encode() in part for part in parts):
            break
    value = "; ".join(
        [f"multipart/{subtype}", f'boundary="{boundary}"']
        + [f'{name}="{val}"' for name, val in params]
    )
    dash = b"--" + boundary.encode("ascii")
    body = b"".join(dash + b"\r\n" + part + b"\r\n" for part in parts) + dash + b"--\r\n"
    return f"Content-Type: {value}\r\n\r\n".encode("ascii") + body


def base64_lines(data: bytes) -> bytes:
    """``data`` in base64 as RFC 2045 §6.8 lays it out: 76-character lines, CRLF."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def decoded_body(headers: Message, body: bytes) -> bytes:
    """``body`` with its Content-Transfer-Encoding undone (base64, or 7bit/8bit/binary).

    Raises :class:`MIMEError` for an encoding this does not read or bad base64.
    """
    cte = _field(headers, "content-transfer-encoding", "binary").strip().lower()
    if cte in ("7bit", "8bit", "binary"):
        return body
    if cte != "base64":
        raise MIMEError(f"unsupported Content-Transfer-Encoding {cte}")
    try:
        # RFC 2045 §6.8: line breaks and other characters outside the alphabet are ignored.
        return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body), validate=True)
    except binascii.Error as e:
        raise MIMEError(f"bad base64: {e}") from None


def content_from_entity(entity: bytes) -> tuple[str, bytes]:
    """An entity made by :mod:`~imxp.e2e.pgp` or :mod:`~imxp.e2e.smime` as APEX content:
    its full Content-Type value and its body, transfer encoding undone.

    APEX content is binary (RFC 3340 §4.1; RFC 3923 §6.4 asks for "binary" too), so a
    base64 ``application/pkcs7-mime`` travels as its DER octets; a multipart body is kept
    as it is, its parts carrying their own encodings.
    """
    headers, body = split_entity(entity)
    content_type = _FOLD.sub("", _field(headers, "content-type", "text/plain"))
    if headers.get_content_maintype() != "multipart":
        body = decoded_body(headers, body)
    return content_type, body


def entity_from_content(content_type: str, body: bytes, transfer_encoding: str = "binary") -> bytes:
    """The MIME entity an APEX content stands for: its Content-Type, and the
    Content-Transfer-Encoding it came with, before its body."""
    head = f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {transfer_encoding}"
    if "\r" in content_type + transfer_encoding or "\n" in content_type + transfer_encoding:
        raise MIMEError("a header value may not contain CR or LF")
    try:
        return head.encode("utf-8") + b"\r\n\r\n" + body
    except UnicodeEncodeError:
        raise MIMEError("a header value that is not text") from None


# -- protecting ---------------------------------------------------------------------------


def protect_cpim(
    cpim: bytes,
    mode: Mode,
    scheme: Scheme,
    keys: Keys,
    *,
    recipients: Sequence[str] | Sequence[x509.Certificate] | None = None,
    signer: str | None = None,
) -> tuple[str, bytes]:
    """Sign and/or encrypt a ``message/cpim`` content whole (RFC 3923 §3.1); return the
    Content-Type value (with its parameters) and body of the APEX content that carries it.

    ``scheme`` "pgp": PGP/MIME (RFC 3156) with ``keys.pgp``; ``signer`` is the user id or
    fingerprint to sign as, the CPIM From by default; ``recipients`` are user ids or
    fingerprints, the CPIM To and cc by default (without subaddresses, both).
    Sign-and-encrypt is one OpenPGP message (RFC 3156 §6.2).

    ``scheme`` "smime": S/MIME 4.0 (RFC 8551) with ``keys.smime``; ``recipients`` are
    certificates and must be given. Sign-and-encrypt signs first, then encrypts (RFC 8551
    §3.7, RFC 3923 §6.5).

    Raises :class:`E2EError` when it cannot be done, ValueError for a bad ``mode`` or
    ``scheme``.
    """
    if mode not in ("sign", "encrypt", "sign+encrypt"):
        raise ValueError(f"unknown protection mode {mode!r}")
    entity = CPIM_ENTITY_HEADER + cpim
    if scheme == "pgp":
        if keys.pgp is None:
            raise E2EError("no OpenPGP keyring to protect with")
        if signer is None or (recipients is None and mode != "sign"):
            from imxp.e2e import cpim as cpim_format

            try:
                message = cpim_format.parse(cpim)
            except cpim_format.CPIMError as e:
                raise E2EError(f"cannot find the sender and recipients: {e}") from None
            # Keys carry users' addresses: a subaddress (RFC 3340 §2.2) names an
            # application of the user, who signs and decrypts for all of them.
            signer = signer or str(Endpoint.parse(message.sender).base)
            if recipients is None:
                recipients = [str(Endpoint.parse(r).base) for r in [*message.to, *message.cc]]
        names = [str(r) for r in recipients or ()]
        passphrase = keys.pgp_passphrase
        if mode == "sign":
            protected = keys.pgp.sign(entity, signer, passphrase)
        else:
            sign_as = signer if mode == "sign+encrypt" else None
            protected = keys.pgp.encrypt(entity, names, sign_as, passphrase)
    elif scheme == "smime":
        from cryptography import x509 as x509_module

        from imxp.e2e import smime

        if mode != "encrypt" and keys.smime is None:
            raise E2EError("no S/MIME certificate to sign with")
        certificates = [r for r in recipients or () if isinstance(r, x509_module.Certificate)]
        if mode != "sign" and (not certificates or len(certificates) != len(recipients or ())):
            raise E2EError("S/MIME encryption needs the recipients' certificates")
        protected = entity
        if mode != "encrypt":
            assert keys.smime is not None
            protected = smime.sign(protected, keys.smime)
        if mode != "sign":
            protected = smime.encrypt(protected, certificates)
    else:
        raise ValueError(f"unknown protection scheme {scheme!r}")
    return content_from_entity(protected)


# -- opening ------------------------------------------------------------------------------


def scheme_of(headers: Message) -> Scheme | None:
    """Which scheme protects an entity with these headers, from its Content-Type alone
    (RFC 3156 §4-§5, RFC 8551 §3.2, §3.5.3); None for an unprotected one."""
    media_type = headers.get_content_type()
    protocol = (param(headers, "protocol") or "").lower()
    if media_type == "multipart/signed":
        if protocol == "application/pgp-signature":
            return "pgp"
        if protocol in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
            return "smime"
    elif media_type == "multipart/encrypted" and protocol == "application/pgp-encrypted":
        return "pgp"
    elif media_type in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        return "smime"
    return None


def open_message(
    content_type: str,
    body: bytes,
    keys: Keys,
    *,
    now: datetime | None = None,
    window: timedelta = _DEFAULT_WINDOW,
    replays: ReplayCache | None = None,
    recipient: str | None = None,
    transfer_encoding: str = "binary",
) -> Report:
    """Undo the protection of a received APEX content and judge it (RFC 3923 §6.7-§6.9).

    ``content_type`` is the content's full Content-Type value, parameters included (a
    multipart needs its boundary). Never raises for what was received: whatever is wrong
    with it is in the report.

    A signed message is presentable only if its signature is good, its content is a
    ``message/cpim`` whose From is the verified signer (or a subaddress of it, as RFC
    3923 §6.3 ignores the resource), its DateTime lies within ``window`` of ``now``
    (RFC 3923 §6.9; ``now`` defaults to the current time), and - given ``replays`` - no
    identical signed message was seen before. Given ``recipient`` (the endpoint that
    received it), the signed To or cc must name it: otherwise someone it was sent to may
    have passed it on, still signed, as if it were meant for this one. A message that
    cannot be decrypted is never
    presentable; one that is encrypted but not signed is, like a plain one, when its
    content reads. Raises ValueError only for a naive ``now``.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        entity = entity_from_content(content_type, body, transfer_encoding)
    except MIMEError as e:
        return Report("plain", problems=[str(e)], presentable=False)
    headers, _ = split_entity(entity)
    scheme = scheme_of(headers)
    if scheme is None:
        return _judge(Opened(entity, "plain"), None, now, window, replays, recipient)
    if scheme == "pgp":
        if keys.pgp is None:
            opened = _unopenable(headers, "no OpenPGP keyring to open it with")
        else:
            opened = keys.pgp.open(entity, keys.pgp_passphrase)
    else:
        from imxp.e2e import smime

        opened = smime.open(entity, trust=keys.trust, key=keys.smime, now=now)
    return _judge(opened, scheme, now, window, replays, recipient)


def _unopenable(headers: Message, reason: str) -> Opened:
    if headers.get_content_type() == "multipart/signed":
        return Opened(b"", "bad-signature", reason=reason, unchecked=True)
    return Opened(b"", "cannot-decrypt", reason=reason, sent_encrypted=True)


def _judge(
    opened: Opened,
    scheme: Scheme | None,
    now: datetime,
    window: timedelta,
    replays: ReplayCache | None,
    recipient: str | None,
) -> Report:
    status: ReportStatus = {
        "plain": "plain",
        "signed": "signed-and-verified",
        "signed-encrypted": "signed-and-verified",
        "bad-signature": "signed-but-bad",
        "encrypted": "encrypted-and-decrypted",
        "cannot-decrypt": "cannot-decrypt",
    }[opened.status]
    report = Report(
        status,
        scheme=scheme,
        encrypted=opened.sent_encrypted or opened.status in ("encrypted", "signed-encrypted"),
        signer=opened.signer if opened.verified else None,
        fingerprint=opened.fingerprint,
        signed_at=opened.signed_at,
        entity=opened.entity,
    )
    # RFC 3923 §6.7-§6.8: neither is presented; there is nothing inside to read either.
    if opened.status == "cannot-decrypt":
        report.problems.append(f"cannot decrypt: {opened.reason}")
        report.presentable = False
        return report
    if opened.status == "bad-signature":
        # Not shown either way (it may be anyone's), but a missing key is no tampering.
        what = "signature not checked" if opened.unchecked else "bad signature"
        report.problems.append(f"{what}: {opened.reason}")
        report.presentable = False
        return report
    if opened.reason:
        report.problems.append(opened.reason)
    _read_cpim(report, opened, scheme is not None)
    if opened.verified and report.cpim is not None:
        _check_signed(report, opened, now, window, replays, recipient)
    return report


def _read_cpim(report: Report, opened: Opened, protected: bool) -> None:
    """Parse the inner ``message/cpim``; a protected content must be one (RFC 3923 §3.1),
    since only then are its sender and date covered by the protection."""
    from imxp.e2e import cpim as cpim_format

    headers, body = split_entity(opened.entity)
    if headers.get_content_type() != cpim_format.MEDIA_TYPE:
        if protected:
            report.problems.append(
                f"the protected content is {headers.get_content_type()}, not message/cpim: "
                "its sender and date are not protected"
            )
            report.presentable = False
        return
    try:
        report.cpim = cpim_format.parse(decoded_body(headers, body))
    except (cpim_format.CPIMError, MIMEError) as e:
        report.problems.append(f"malformed message/cpim: {e}")
        report.presentable = False


def _check_signed(
    report: Report,
    opened: Opened,
    now: datetime,
    window: timedelta,
    replays: ReplayCache | None,
    recipient: str | None,
) -> None:
    message = report.cpim
    assert message is not None
    if not is_one_of(message.sender, opened.identities or (opened.signer or "",)):
        report.problems.append(f"signer {opened.signer} is not the From {message.sender}")
        report.presentable = False
    if recipient is not None and not any(
        is_one_of(recipient, [addressee]) for addressee in [*message.to, *message.cc]
    ):
        report.problems.append(
            f"not addressed to {recipient} (To/cc: {', '.join([*message.to, *message.cc])}): "
            "passed on by someone it was sent to?"
        )
        report.presentable = False
    date = message.date
    if date < now - window:
        report.problems.append(
            f"stale or replayed: DateTime {date.isoformat()} is more than {window} before "
            f"{now.isoformat(timespec='seconds')}"
        )
        report.presentable = False
    elif date > now + window:
        report.problems.append(
            f"DateTime {date.isoformat()} is more than {window} in the future "
            f"(now {now.isoformat(timespec='seconds')})"
        )
        report.presentable = False
    elif replays is not None:
        key = hashlib.sha256(
            b"\0".join([(opened.signer or "").encode(), date.isoformat().encode(), opened.entity])
        ).digest()
        if replays.seen(key, date, now, window):
            report.problems.append(
                f"replayed: the same message from {opened.signer} dated {date.isoformat()} "
                "was received before"
            )
            report.presentable = False


def is_one_of(address: str, identities: Sequence[str]) -> bool:
    """Whether ``address`` is one of ``identities``, or a subaddress of one (RFC 3340
    §2.2): the CPIM From one of the signer's identities (RFC 3923 §6.3 ignores the
    resource part; subaddresses are its kin), a recipient an addressee, an endpoint
    one a certificate names. What does not parse as an endpoint is none of them."""
    try:
        endpoint = Endpoint.parse(address)
    except AddressError:
        return False
    for identity in identities:
        try:
            if endpoint.within(Endpoint.parse(identity)):
                return True
        except AddressError:
            continue
    return False
