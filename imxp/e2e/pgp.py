"""PGP/MIME (RFC 3156) around a MIME entity, with the real ``gpg`` through python-gnupg.

* Signing makes ``multipart/signed; protocol="application/pgp-signature"`` (§5): the
  entity is the first part, octet for octet, and the second is gpg's detached,
  ASCII-armoured signature over exactly those octets; ``micalg`` names the hash gpg
  actually used (RFC 4880 §9.4 text names, prefixed "pgp-").
* Encrypting makes ``multipart/encrypted; protocol="application/pgp-encrypted"`` (§4):
  a "Version: 1" control part, then the armoured OpenPGP message of the whole entity;
  signed and encrypted, it is one OpenPGP message that is both (§6.2).
* Opening verifies or decrypts either form, and also a ``multipart/signed`` inside a
  ``multipart/encrypted`` (§6.1).

The entity is signed as given, without re-canonicalising its line ends: the CPIM builder
writes CRLF, and over APEX, which is 8-bit clean, the octets arrive as they were sent. The
signature is binary (not gpg's text mode), so verification is over the exact octets too.

Keys come from the user's keyring directory, and the keyring is the trust decision: a
key in it is believed for the user ids it carries, and encryption to its keys does not
ask gpg's web of trust (``--trust-model always``). Put only correspondents' keys there.
"""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Literal

import gnupg

from imxp.e2e.protect import (
    E2EError,
    MIMEError,
    Opened,
    build_multipart,
    decoded_body,
    param,
    split_entity,
    split_multipart,
)

__all__ = ["MAX_DECRYPTED", "OpenPGP"]

#: The most octets a decryption may give (gpg's --max-output). OpenPGP compresses
#: (RFC 4880 §5.6), and a message of 1.5 KB can hold half a gigabyte of zeros, all of it
#: in memory here: anyone with the recipient's public key could so bring down a listener.
#: Sixteen times a relay's default largest message (1 MiB) leaves room for what text
#: really compresses to.
MAX_DECRYPTED = 16 * 2**20

# RFC 4880 §9.4 hash algorithm ids -> the micalg values of RFC 3156 §5.
_MICALG = {
    "1": "pgp-md5",
    "2": "pgp-sha1",
    "3": "pgp-ripemd160",
    "8": "pgp-sha256",
    "9": "pgp-sha384",
    "10": "pgp-sha512",
    "11": "pgp-sha224",
}
# What python-gnupg (0.5.1 on, which lists every signature's problem, not just the last
# one's) reports for a signature that is present but does not hold; "no secret key" also
# shows up when a message was encrypted to other recipients as well, and says nothing
# about the signature.
_SIGNATURE_PROBLEMS = frozenset(
    {
        "signature bad",
        "signature error",
        "signature expired",
        "signing key has expired",
        "signing key was revoked",
        "no public key",
    }
)
_NO_KEY = {"signature error", "no public key"}
_COLON_ESCAPE = re.compile(rb"\\x([0-9A-Fa-f]{2})")
# A uid's validity in gpg's colon listing (doc/DETAILS, field 2): revoked, expired, invalid.
_DEAD_UID = (b"r", b"e", b"i")
_BARE_ADDRESS = re.compile(r"[^\s<>@]+@[^\s<>@]+")
_GPG_TIMEOUT = 60  # seconds; a gpg that hangs (e.g. waiting for an agent) must not block us
# What a gpg.conf may ask of gpg as it checks a signature: import the key the signature
# carries (auto-key-import, GnuPG 2.2.22 on) or one a keyserver has (auto-key-retrieve).
# A key so imported is in the keyring without the user having checked it, and believed
# for whatever user ids its maker gave it: a forger's key as "Fred <fred@a.test>".
_NO_KEY_IMPORT = ("--no-auto-key-import", "--no-auto-key-retrieve")


class _LenientUTF8Reader(codecs.StreamReader):
    def decode(self, data: bytes, errors: str = "strict") -> tuple[str, int]:  # type: ignore[override]
        return codecs.utf_8_decode(data, "replace", False)


def _lenient_utf8(name: str) -> codecs.CodecInfo | None:
    """UTF-8 whose decoding turns what is not UTF-8 into U+FFFD, for python-gnupg.

    python-gnupg reads gpg's stderr (status lines, messages) in a thread of its own,
    through ``codecs.getreader(GPG.encoding)`` with strict errors. gpg echoes octets of
    a crafted armor header there: one that is not UTF-8 ended that thread, gpg then
    blocked on its full stderr pipe, and every later message waited for it (and the
    process, for its thread pool, at exit). Encoding, of passphrases too, is UTF-8's.
    """
    if name != "imxp_utf_8_lenient":  # as codecs normalises "imxp-utf-8-lenient"
        return None
    utf8 = codecs.lookup("utf-8")
    return codecs.CodecInfo(
        utf8.encode,
        lambda data, errors="strict": codecs.utf_8_decode(data, "replace", True),
        streamreader=_LenientUTF8Reader,
        streamwriter=utf8.streamwriter,
        name="imxp-utf-8-lenient",
    )


codecs.register(_lenient_utf8)


class OpenPGP:
    """A user's OpenPGP keyring (``homedir``, a GNUPGHOME) and what RFC 3156 does with it.

    ``gpgbinary`` is the gpg command to run.
    """

    def __init__(self, homedir: str | os.PathLike[str], *, gpgbinary: str = "gpg") -> None:
        self.homedir = Path(homedir)
        self._gpg = gnupg.GPG(gnupghome=str(self.homedir), gpgbinary=gpgbinary)
        self._gpg.encoding = "imxp-utf-8-lenient"
        self._no_key_import = _supported(self._gpg.gpgbinary, _NO_KEY_IMPORT)
        # fingerprint -> (keyring state when listed, identities): see _identities.
        self._identity_cache: dict[str, tuple[tuple[object, ...], tuple[str, ...]]] = {}

    # -- sending --------------------------------------------------------------------------

    def sign(self, entity: bytes, signer: str, passphrase: str | None = None) -> bytes:
        """``multipart/signed`` (RFC 3156 §5) of ``entity`` and a detached signature by the
        key of ``signer``: a fingerprint, an e-mail address (matched exactly, as
        ``<fred@a.test>``), or any user id specification gpg understands.

        Raises :class:`~imxp.e2e.protect.E2EError` when gpg cannot sign.
        """
        # --local-user, not python-gnupg's keyid (--default-key): gpg falls back to another
        # secret key when the default key is missing, and would sign as someone else.
        result = self._gpg.sign(
            entity, passphrase=passphrase, detach=True, extra_args=["--local-user", _spec(signer)]
        )
        if not result.data:
            raise E2EError(f"gpg cannot sign as {signer}: {result.status or _last(result)}")
        micalg = _MICALG.get(str(result.hash_algo))
        if micalg is None:
            raise E2EError(f"gpg signed with unknown hash algorithm {result.hash_algo}")
        signature = b"Content-Type: application/pgp-signature\r\n\r\n" + _crlf(result.data)
        return build_multipart(
            "signed",
            [("micalg", micalg), ("protocol", "application/pgp-signature")],
            [entity, signature],
        )

    def encrypt(
        self,
        entity: bytes,
        recipients: list[str],
        sign_as: str | None = None,
        passphrase: str | None = None,
    ) -> bytes:
        """``multipart/encrypted`` (RFC 3156 §4) of ``entity`` for ``recipients``; signed
        too by ``sign_as``, as one OpenPGP message (§6.2), when that is given. Keys are
        named as for :meth:`sign`.

        Raises :class:`~imxp.e2e.protect.E2EError` when gpg cannot do it (no recipients, a
        recipient without a key in the keyring, no secret key for ``sign_as``).
        """
        if not recipients:
            raise E2EError("OpenPGP encryption needs at least one recipient")
        result = self._gpg.encrypt(
            entity,
            [_spec(r) for r in recipients],
            sign=sign_as is not None,
            passphrase=passphrase,
            always_trust=True,
            armor=True,
            extra_args=["--local-user", _spec(sign_as)] if sign_as is not None else None,
        )
        if not result.ok or not result.data:
            raise E2EError(
                f"gpg cannot encrypt to {', '.join(recipients)}"
                f"{f' signed by {sign_as}' if sign_as else ''}: {result.status or _last(result)}"
            )
        return build_multipart(
            "encrypted",
            [("protocol", "application/pgp-encrypted")],
            [
                b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n",
                b"Content-Type: application/octet-stream\r\n\r\n" + _crlf(result.data),
            ],
        )

    # -- receiving ------------------------------------------------------------------------

    def open(self, raw: bytes, passphrase: str | None = None) -> Opened:
        """Verify and/or decrypt the PGP/MIME entity ``raw``; never raises for what it
        contains. An entity that is neither ``multipart/signed`` nor
        ``multipart/encrypted`` is "plain"."""
        headers, body = split_entity(raw)
        media_type = headers.get_content_type()
        protocol = (param(headers, "protocol") or "").lower()
        if media_type == "multipart/signed":
            if protocol != "application/pgp-signature":
                return _bad(f"{protocol or 'no'} protocol, not PGP/MIME")
            try:
                parts = split_multipart(body, param(headers, "boundary"))
            except MIMEError as e:
                return _bad(str(e))
            return self._verify(parts)
        if media_type == "multipart/encrypted":
            # Whatever comes of opening it, it came encrypted (Report.encrypted).
            opened = self._open_encrypted(headers, body, protocol, passphrase)
            return replace(opened, sent_encrypted=True)
        return Opened(raw, "plain")

    def _open_encrypted(
        self, headers: Message, body: bytes, protocol: str, passphrase: str | None
    ) -> Opened:
        if protocol != "application/pgp-encrypted":
            return Opened(b"", "cannot-decrypt", reason=f"{protocol or 'no'} protocol")
        try:
            parts = split_multipart(body, param(headers, "boundary"))
        except MIMEError as e:
            return Opened(b"", "cannot-decrypt", reason=str(e))
        return self._decrypt(parts, passphrase)

    def _verify(self, parts: list[bytes]) -> Opened:
        """RFC 3156 §5: two parts, the signed entity and an application/pgp-signature."""
        if len(parts) != 2:
            return _bad(f"multipart/signed has {len(parts)} parts, not 2 (RFC 1847 §2.1)")
        signed, signature_part = parts
        headers, body = split_entity(signature_part)
        try:
            signature = decoded_body(headers, body)
        except MIMEError as e:
            return _bad(f"signature part: {e}")
        if headers.get_content_type() != "application/pgp-signature":
            return _bad(f"the signature part is {headers.get_content_type()}")
        # gpg verifies a detached signature only from a file; the data goes through stdin.
        with tempfile.TemporaryDirectory(prefix="imxp-pgp-") as scratch:
            path = Path(scratch, "signature.asc")
            path.write_bytes(signature)
            result = self._gpg.verify_data(str(path), signed, extra_args=self._no_key_import)
        return self._signature(result, signed, "signed")

    def _decrypt(self, parts: list[bytes], passphrase: str | None) -> Opened:
        """RFC 3156 §4: a "Version: 1" application/pgp-encrypted part, then the message."""
        if len(parts) != 2:
            return Opened(b"", "cannot-decrypt", reason=f"{len(parts)} parts, not 2 (§4)")
        control_headers, control = split_entity(parts[0])
        data_headers, data_body = split_entity(parts[1])
        try:
            data = decoded_body(data_headers, data_body)
        except MIMEError as e:
            return Opened(b"", "cannot-decrypt", reason=str(e))
        if control_headers.get_content_type() != "application/pgp-encrypted" or not re.search(
            rb"^Version:[ \t]*1[ \t]*\r?$", control, re.MULTILINE
        ):
            return Opened(b"", "cannot-decrypt", reason="no 'Version: 1' control part (§4)")
        # Without a passphrase, no pinentry: on a terminal one would take it over, and
        # every later message would wait behind a prompt nobody expects.
        extra = [] if passphrase is not None else ["--pinentry-mode", "error"]
        extra += ["--max-output", str(MAX_DECRYPTED), *self._no_key_import]
        result = self._gpg.decrypt(data, passphrase=passphrase, extra_args=extra)
        if "--max-output" in (result.stderr or ""):
            # gpg stopped writing there, yet says DECRYPTION_OKAY: what it gave is cut short.
            reason = f"it decrypts to more than {MAX_DECRYPTED:,} octets (a compression bomb?)"
            return Opened(b"", "cannot-decrypt", reason=reason)
        if not result.ok:
            if "No pinentry" in (result.stderr or ""):
                reason = "the secret key needs its passphrase (--passphrase-file)"
            else:
                reason = f"gpg: {result.status or _last(result)}"
            return Opened(b"", "cannot-decrypt", reason=reason)
        plain = result.data
        if result.valid or _problems(result) or result.fingerprint:
            return self._signature(result, plain, "signed-encrypted")  # §6.2
        inner = self.open(plain) if _is_pgp_signed(plain) else None  # §6.1
        if inner is None:
            return Opened(plain, "encrypted")
        if inner.status == "signed":
            return Opened(
                inner.entity,
                "signed-encrypted",
                signer=inner.signer,
                fingerprint=inner.fingerprint,
                signed_at=inner.signed_at,
                identities=inner.identities,
            )
        # A key that is not here leaves the signature unchecked, as without the encryption.
        return replace(_bad(f"decrypted, but {inner.reason}"), unchecked=inner.unchecked)

    def _signature(
        self, result: gnupg.Verify, entity: bytes, status: Literal["signed", "signed-encrypted"]
    ) -> Opened:
        """The verdict on what gpg said of a signature: good only if gpg said VALIDSIG
        and GOODSIG and nothing bad about any signature."""
        problems = _problems(result)
        if not result.valid or problems or not result.fingerprint:
            key = f" (key {result.key_id})" if result.key_id else ""
            if set(problems) == _NO_KEY:
                # gpg says ERRSIG and NO_PUBKEY: there is no key here to check it with.
                return Opened(
                    b"",
                    "bad-signature",
                    reason=f"the signer's key{key} is not in this keyring "
                    "(import it, if you trust it, to check such signatures)",
                    unchecked=True,
                )
            why = "; ".join(problems) or result.status or "no valid signature"
            return _bad(f"gpg: {why}{key}")
        primary = result.pubkey_fingerprint or result.fingerprint
        identities = self._identities(primary)
        signer = _address(result.username or "") or (identities[0] if identities else None)
        return Opened(
            entity,
            status,
            signer=signer or result.username,
            fingerprint=primary,
            signed_at=_timestamp(result.sig_timestamp),
            identities=identities,
        )

    def _identities(self, fingerprint: str) -> tuple[str, ...]:
        """The addresses in the live user ids of the key ``fingerprint``.

        Read from gpg's colon listing because python-gnupg does not say which user ids
        are revoked or expired, and a revoked one must not vouch for a From. The answer
        is kept until the keyring's files change (an import, a revocation), since running
        gpg once more for every message would halve the rate of opening them.
        """
        state = self._keyring_state()
        cached = self._identity_cache.get(fingerprint)
        if cached is not None and cached[0] == state:
            return cached[1]
        identities = self._list_identities(fingerprint)
        self._identity_cache[fingerprint] = (state, identities)
        return identities

    def _keyring_state(self) -> tuple[object, ...]:
        """What changes when gpg changes the public keyring (keybox or legacy file)."""
        state: list[object] = []
        for name in ("pubring.kbx", "pubring.gpg"):
            try:
                stat = (self.homedir / name).stat()
            except OSError:
                continue
            state.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(state)

    def _list_identities(self, fingerprint: str) -> tuple[str, ...]:
        try:
            listing = subprocess.run(
                [
                    self._gpg.gpgbinary,
                    "--homedir",
                    str(self.homedir),
                    "--batch",
                    "--no-tty",
                    "--with-colons",
                    "--fixed-list-mode",
                    "--list-keys",
                    "--",
                    fingerprint,
                ],
                capture_output=True,
                timeout=_GPG_TIMEOUT,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ()
        found: list[str] = []
        for line in listing.splitlines():
            fields = line.split(b":")
            if fields[0] != b"uid" or len(fields) < 10 or fields[1] in _DEAD_UID:
                continue
            uid = _COLON_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), fields[9])
            address = _address(uid.decode("utf-8", "replace"))
            if address and address not in found:
                found.append(address)
        return tuple(found)


def _supported(gpgbinary: str, options: tuple[str, ...]) -> list[str]:
    """Those of ``options`` this gpg knows: an older one refuses to run given another."""
    try:
        known = subprocess.run(
            [gpgbinary, "--dump-options"],
            capture_output=True,
            timeout=_GPG_TIMEOUT,
            check=False,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [option for option in options if option.encode() in known]


def _spec(name: str) -> str:
    """A bare e-mail address as gpg's exact-match form ``<fred@a.test>``: on its own it
    matches as a substring, so ``fred@a.test`` would also find ``alfred@a.test``."""
    if _BARE_ADDRESS.fullmatch(name):
        return f"<{name}>"
    return name


def _bad(reason: str) -> Opened:
    return Opened(b"", "bad-signature", reason=reason)


def _problems(result: gnupg.Verify) -> list[str]:
    return [p["status"] for p in result.problems if p.get("status") in _SIGNATURE_PROBLEMS]


def _is_pgp_signed(entity: bytes) -> bool:
    headers, _ = split_entity(entity)
    return headers.get_content_type() == "multipart/signed" and (
        (param(headers, "protocol") or "").lower() == "application/pgp-signature"
    )


def _address(uid: str) -> str | None:
    """The address in a user id such as ``Fred <fred@a.test>`` or ``<im:fred@a.test>``.

    Read as gpg reads it (``mailbox_from_userid`` in GnuPG's common/mbox-util.c), since
    that is the address gpg finds the key by and the one its owner was checked for:
    what stands between the first "<" and the ">" after it, else the whole user id if
    it is an address. RFC 5322's parser would take ``fred@a.test <mallory@a.test>``,
    Mallory's key to gpg, for fred@a.test's, and ``<im:fred@a.test>`` for no address.
    """
    start = uid.find("<")
    if start >= 0:
        end = uid.find(">", start + 1)
        address = uid[start + 1 : end] if end > start else ""
    else:
        address = uid
    if address[:3].lower() == "im:":
        address = address[3:]
    return address if _BARE_ADDRESS.fullmatch(address) else None


def _timestamp(value: str | None) -> datetime | None:
    """A gpg status timestamp: seconds since the epoch, or ISO 8601 basic when it has a
    "T" (gpg doc/DETAILS, "Format of the --status-fd output")."""
    if not value:
        return None
    try:
        if "T" in value:
            return datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        return datetime.fromtimestamp(int(value), UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _crlf(text: bytes) -> bytes:
    """gpg's armour with CRLF line ends, as MIME parts have (RFC 3156 §3)."""
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _last(result: object) -> str:
    """The last line gpg wrote to stderr, for an error message."""
    lines = (getattr(result, "stderr", "") or "").strip().splitlines()
    return lines[-1].removeprefix("gpg: ") if lines else "unknown error"
