"""Benchmark of end-to-end protection (imxp.e2e), each figure beside the bare tool's rate.

For a 1 KiB instant message (a ``message/cpim`` whose text makes the protected entity
1 KiB), in each scheme:

(a) sign+encrypt: messages/s through ``protect_cpim(..., "sign+encrypt", ...)``, which
    builds the MIME, runs the crypto and returns the APEX content.
(b) decrypt+verify: messages/s through ``open_message``, which also parses the inner
    CPIM and checks signer, From and DateTime.

Beside each, the same cryptographic operation with the underlying tool and no MIME work:

* OpenPGP: python-gnupg's ``encrypt(sign=...)`` / ``decrypt`` on the bare entity, and the
  ``gpg`` command line in a loop (one process per message, as python-gnupg runs it).
* S/MIME: ``cryptography``'s PKCS7SignatureBuilder then PKCS7EnvelopeBuilder (AES-256-CBC:
  the builder has no GCM), and ``pkcs7_decrypt_der`` plus one signature check with the
  signer's public key (``cryptography`` cannot verify CMS, so that is the least a verifier
  does).

Keys: gpg Ed25519 signing and Curve25519 encryption subkeys in temporary homes; S/MIME
RSA-3072 certificates (what :func:`imxp.e2e.smime.issue_smime` makes by default) from a
test CA. Each rate is the best of 3 timed repeats after a warm-up.

Run by hand from the repository root (this is not a test)::

    python bench/e2e.py
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from imxp.certs import create_ca
from imxp.e2e import cpim, smime
from imxp.e2e.pgp import OpenPGP
from imxp.e2e.protect import CPIM_ENTITY_HEADER, Keys, open_message, protect_cpim

SIZE = 1024
PGP_MESSAGES = 40
SMIME_MESSAGES = 200
REPEATS = 3


def best_of(run: Callable[[], None], count: int) -> float:
    """Best operations/s over REPEATS runs of ``count`` operations, after a warm-up."""
    run()
    best = 0.0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(count):
            run()
        best = max(best, count / (time.perf_counter() - t0))
    return best


def gpg(home: Path, *args: str, data: bytes = b"") -> bytes:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--yes", "--no-tty", *args],
        input=data,
        capture_output=True,
        check=True,
    ).stdout


def keyring(base: Path, address: str) -> tuple[Path, str]:
    home = base / address.split("@")[0]
    home.mkdir(mode=0o700)
    uid = f"{address.split('@')[0].title()} <{address}>"
    gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = gpg(home, "--with-colons", "--list-keys", f"<{address}>").decode()
    match = re.search(r"^fpr:+([0-9A-F]{40}):", listing, re.MULTILINE)
    assert match is not None
    fingerprint = match.group(1)
    gpg(home, "--passphrase", "", "--quick-add-key", fingerprint, "cv25519", "encr", "never")
    return home, fingerprint


def message() -> bytes:
    """A CPIM message whose protected entity is SIZE octets."""
    date = datetime.now(UTC).replace(microsecond=0)
    base = cpim.build(cpim.text_message("fred@a.test", ["barney@b.test"], "", date=date))
    text = "x" * (SIZE - len(CPIM_ENTITY_HEADER) - len(base))
    built = cpim.build(cpim.text_message("fred@a.test", ["barney@b.test"], text, date=date))
    assert len(CPIM_ENTITY_HEADER + built) == SIZE
    return built


def bench_pgp(base: Path, content: bytes) -> list[tuple[str, float, str, float]]:
    entity = CPIM_ENTITY_HEADER + content
    fred_home, fred_fpr = keyring(base, "fred@a.test")
    barney_home, barney_fpr = keyring(base, "barney@b.test")
    gpg(barney_home, "--import", data=gpg(fred_home, "--export", fred_fpr))
    gpg(fred_home, "--import", data=gpg(barney_home, "--export", barney_fpr))
    fred, barney = Keys(pgp=OpenPGP(fred_home)), Keys(pgp=OpenPGP(barney_home))
    content_type, body = protect_cpim(content, "sign+encrypt", "pgp", fred)

    def ours_protect() -> None:
        protect_cpim(content, "sign+encrypt", "pgp", fred)

    def ours_open() -> None:
        report = open_message(content_type, body, barney)
        assert report.presentable, report.problems

    import gnupg

    fred_gpg, barney_gpg = (
        gnupg.GPG(gnupghome=str(fred_home)),
        gnupg.GPG(gnupghome=str(barney_home)),
    )
    local_user = ["--local-user", fred_fpr]
    armoured = fred_gpg.encrypt(
        entity, [barney_fpr], sign=True, always_trust=True, armor=True, extra_args=local_user
    ).data

    def raw_protect() -> None:
        assert fred_gpg.encrypt(
            entity, [barney_fpr], sign=True, always_trust=True, armor=True, extra_args=local_user
        ).ok

    def raw_open() -> None:
        assert barney_gpg.decrypt(armoured).valid

    encrypt_args = ["--armor", "--trust-model", "always", "--encrypt", "--sign"]
    encrypt_args += ["--local-user", fred_fpr, "--recipient", barney_fpr]

    def cli_protect() -> None:
        gpg(fred_home, *encrypt_args, data=entity)

    def cli_open() -> None:
        gpg(barney_home, "--decrypt", data=armoured)

    try:
        n = PGP_MESSAGES
        protect_rate, open_rate = best_of(ours_protect, n), best_of(ours_open, n)
        return [
            ("sign+encrypt", protect_rate, "python-gnupg encrypt(sign)", best_of(raw_protect, n)),
            ("", protect_rate, "gpg -se (command line)", best_of(cli_protect, n)),
            ("decrypt+verify", open_rate, "python-gnupg decrypt", best_of(raw_open, n)),
            ("", open_rate, "gpg -d (command line)", best_of(cli_open, n)),
        ]
    finally:
        for home in (fred_home, barney_home):
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


def bench_smime(content: bytes) -> list[tuple[str, float, str, float]]:
    entity = CPIM_ENTITY_HEADER + content
    ca = create_ca("bench CA")
    fred_cert = smime.issue_smime(ca, "fred@a.test")
    barney_cert = smime.issue_smime(ca, "barney@b.test")
    fred = Keys(smime=fred_cert, trust=(ca.certificate,))
    barney = Keys(smime=barney_cert, trust=(ca.certificate,))
    recipients = [barney_cert.certificate]
    content_type, body = protect_cpim(content, "sign+encrypt", "smime", fred, recipients=recipients)

    def ours_protect() -> None:
        protect_cpim(content, "sign+encrypt", "smime", fred, recipients=recipients)

    def ours_open() -> None:
        report = open_message(content_type, body, barney)
        assert report.presentable, report.problems

    def raw_sign_encrypt() -> bytes:
        signature = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(entity)
            .add_signer(fred_cert.certificate, fred_cert.key, hashes.SHA256())
            .sign(
                serialization.Encoding.DER,
                [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
            )
        )
        return (
            pkcs7.PKCS7EnvelopeBuilder()
            .set_data(entity + signature)
            .add_recipient(barney_cert.certificate)
            .set_content_encryption_algorithm(algorithms.AES256)
            .encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
        )

    enveloped = raw_sign_encrypt()
    signer_key = fred_cert.certificate.public_key()
    signature = fred_cert.key.sign(entity, padding.PKCS1v15(), hashes.SHA256())

    def raw_protect() -> None:
        raw_sign_encrypt()

    def raw_open() -> None:
        pkcs7.pkcs7_decrypt_der(enveloped, barney_cert.certificate, barney_cert.key, [])
        signer_key.verify(signature, entity, padding.PKCS1v15(), hashes.SHA256())

    n = SMIME_MESSAGES
    return [
        (
            "sign+encrypt",
            best_of(ours_protect, n),
            "PKCS7 sign + envelope",
            best_of(raw_protect, n),
        ),
        ("decrypt+verify", best_of(ours_open, n), "decrypt_der + RSA verify", best_of(raw_open, n)),
    ]


def main() -> None:
    content = message()
    version = subprocess.run(["gpg", "--version"], capture_output=True, check=True).stdout
    print(
        f"imxp e2e bench: {SIZE}-octet protected entity; python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; "
        f"{version.splitlines()[0].decode()}"
    )
    with tempfile.TemporaryDirectory(prefix="imxp-bench-") as scratch:
        rows = [("OpenPGP", *row) for row in bench_pgp(Path(scratch), content)]
    rows += [("S/MIME", *row) for row in bench_smime(content)]
    header = (
        f"{'scheme':8} {'operation':15} {'imxp msg/s':>11}   {'bare tool':28} {'ops/s':>9} "
        f"{'imxp/bare':>9}"
    )
    print(header)
    print("-" * len(header))
    for scheme, operation, ours, tool, raw in rows:
        print(
            f"{scheme if operation else '':8} {operation:15} {ours:11.1f}   {tool:28} "
            f"{raw:9.1f} {ours / raw:9.2f}"
        )


if __name__ == "__main__":
    main()
