"""Channel-management elements of channel zero (RFC 3080 §2.3 and the DTD of §7.1).

Plain objects for greeting, start, profile, close, ok and error, their
serialisation as ``application/beep+xml`` and a strict parser. Element
content of a ``profile`` (piggybacked initialisation, §2.3.1.2) is carried
as bytes: in a CDATA section when it can be, base64 (``encoding='base64'``)
otherwise.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape, quoteattr

from imxp.beep import xmlsafe

__all__ = [
    "BEEP_XML",
    "Close",
    "Error",
    "Greeting",
    "MgmtError",
    "OK",
    "ProfileElement",
    "Start",
    "encode_error",
    "parse",
    "parse_error",
]

BEEP_XML = "application/beep+xml"
# §2.3.1.2: a profile element's initialisation content is at most 4K octets.
MAX_INIT = 4096
_CODE = re.compile(r"[1-5][0-9][0-9]\Z")
_NMTOKEN = re.compile(r"[\w.:-]+\Z")


class MgmtError(ValueError):
    """A channel-zero element that is poorly formed (500) or invalid (501)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class ProfileElement:
    """A ``profile`` element: a URI and, inside ``start`` or its reply, optional content."""

    uri: str
    content: bytes | None = None

    def to_xml(self) -> str:
        if self.content is None:
            return f"<profile uri={quoteattr(self.uri)} />"
        try:
            text = self.content.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        # CDATA only when the parser gives back the very same octets: it strips the
        # content and XML line-end handling turns CR into LF (XML 1.0 §2.11).
        if text is not None and "]]>" not in text and text == text.strip() and _xml_chars_ok(text):
            return f"<profile uri={quoteattr(self.uri)}><![CDATA[{text}]]></profile>"
        encoded = base64.b64encode(self.content).decode("ascii")
        return f"<profile uri={quoteattr(self.uri)} encoding='base64'>{encoded}</profile>"


@dataclass(frozen=True)
class Greeting:
    """§2.3.1.1: the profiles a peer offers in the server role, features and localize."""

    profiles: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    localize: tuple[str, ...] = ()

    def to_xml(self) -> str:
        attrs = ""
        if self.features:
            attrs += f" features={quoteattr(' '.join(self.features))}"
        if self.localize:
            attrs += f" localize={quoteattr(' '.join(self.localize))}"
        if not self.profiles:
            return f"<greeting{attrs} />"
        inner = "".join(f"<profile uri={quoteattr(uri)} />" for uri in self.profiles)
        return f"<greeting{attrs}>{inner}</greeting>"


@dataclass(frozen=True)
class Start:
    """§2.3.1.2: a request to create channel ``number`` with one of several profiles."""

    number: int
    profiles: tuple[ProfileElement, ...]
    server_name: str | None = None

    def to_xml(self) -> str:
        attrs = f" number='{self.number}'"
        if self.server_name is not None:
            attrs += f" serverName={quoteattr(self.server_name)}"
        inner = "".join(p.to_xml() for p in self.profiles)
        return f"<start{attrs}>{inner}</start>"


@dataclass(frozen=True)
class Close:
    """§2.3.1.3: close channel ``number`` (0 releases the session)."""

    number: int = 0
    code: int = 200
    text: str = ""
    lang: str | None = None

    def to_xml(self) -> str:
        attrs = f" number='{self.number}' code='{self.code}'"
        if self.lang:
            attrs += f" xml:lang={quoteattr(self.lang)}"
        if not self.text:
            return f"<close{attrs} />"
        return f"<close{attrs}>{escape(self.text)}</close>"


@dataclass(frozen=True)
class OK:
    """§2.3.1.4."""

    def to_xml(self) -> str:
        return "<ok />"


@dataclass(frozen=True)
class Error:
    """§2.3.1.5: a reply code (§8) and an optional diagnostic."""

    code: int
    text: str = ""
    lang: str | None = None

    def to_xml(self) -> str:
        attrs = f" code='{self.code}'"
        if self.lang:
            attrs += f" xml:lang={quoteattr(self.lang)}"
        if not self.text:
            return f"<error{attrs} />"
        return f"<error{attrs}>{escape(self.text)}</error>"


Element_ = Greeting | Start | ProfileElement | Close | OK | Error


def _xml_chars_ok(text: str) -> bool:
    # Control characters other than TAB/LF/CR, U+FFFE and U+FFFF cannot appear in XML 1.0
    # at all (§2.2 Char); CR can but does not survive line-end normalisation.
    return not any((ord(c) < 32 and c not in "\t\n") or c in "\ufffe\uffff" for c in text)


def encode_error(code: int, text: str = "") -> bytes:
    return Error(code, text).to_xml().encode("utf-8")


def _code(element: Element) -> int:
    raw = element.get("code")
    if raw is None:
        raise MgmtError(501, f"{element.tag} element needs a code attribute")
    if not _CODE.match(raw):
        raise MgmtError(501, f"code attribute {raw[:8]!r} is not a three-digit reply code")
    return int(raw)


def _channel_number(raw: str | None, default: int | None = None) -> int:
    if raw is None:
        if default is None:
            raise MgmtError(501, "number attribute is required")
        return default
    # str.isdigit() accepts non-ASCII digits ('\u0661', and '\u00b2' which int() rejects).
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > 2147483647:
        raise MgmtError(501, f"number attribute {raw[:12]!r} is not a channel number")
    return int(raw)


def _tokens(raw: str | None) -> tuple[str, ...]:
    if not raw:
        return ()
    tokens = tuple(raw.split())
    if not all(_NMTOKEN.match(t) for t in tokens):
        raise MgmtError(501, "tokens must be NMTOKENs")
    return tokens


def _no_children(element: Element) -> None:
    if len(element):
        raise MgmtError(501, f"{element.tag} element may not contain elements")


def _profile(element: Element, *, content_allowed: bool) -> ProfileElement:
    uri = element.get("uri")
    if not uri:
        raise MgmtError(501, "profile element needs a uri attribute")
    _no_children(element)
    text = element.text or ""
    encoding = element.get("encoding", "none")
    if encoding not in ("none", "base64"):
        raise MgmtError(501, f"encoding attribute {encoding[:16]!r} is neither none nor base64")
    if not text.strip():
        return ProfileElement(uri)
    if not content_allowed:
        raise MgmtError(501, "profile element in a greeting has no content")
    if encoding == "base64":
        try:
            content = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MgmtError(501, "profile content is not valid base64") from None
    else:
        content = text.strip().encode("utf-8")
    if len(content) > MAX_INIT:
        raise MgmtError(501, f"profile content exceeds {MAX_INIT} octets")
    return ProfileElement(uri, content)


def parse(payload_body: bytes) -> Element_:
    """Parse one channel-zero element, raising :class:`MgmtError` with 500 or 501."""
    try:
        root = xmlsafe.parse(payload_body)
    except xmlsafe.XMLError as e:
        raise MgmtError(500, str(e)) from None
    tag = root.tag
    if tag == "greeting":
        profiles = []
        for child in root:
            if child.tag != "profile":
                raise MgmtError(501, f"unexpected {child.tag[:32]} element in greeting")
            profiles.append(_profile(child, content_allowed=False).uri)
        return Greeting(
            tuple(profiles),
            _tokens(root.get("features")),
            _tokens(root.get("localize")),
        )
    if tag == "start":
        number = _channel_number(root.get("number"))
        if number == 0:
            raise MgmtError(501, "channel zero cannot be started")
        candidates = []
        for child in root:
            if child.tag != "profile":
                raise MgmtError(501, f"unexpected {child.tag[:32]} element in start")
            candidates.append(_profile(child, content_allowed=True))
        if not candidates:
            raise MgmtError(501, "start element needs at least one profile")
        return Start(number, tuple(candidates), root.get("serverName"))
    if tag == "profile":
        return _profile(root, content_allowed=True)
    if tag == "close":
        _no_children(root)
        return Close(
            _channel_number(root.get("number"), default=0),
            _code(root),
            (root.text or "").strip(),
            root.get("xml:lang"),
        )
    if tag == "ok":
        _no_children(root)
        if (root.text or "").strip():
            raise MgmtError(501, "ok element has no content")
        return OK()
    if tag == "error":
        _no_children(root)
        return Error(_code(root), (root.text or "").strip(), root.get("xml:lang"))
    raise MgmtError(501, f"unexpected {tag[:32]} element on channel zero")


def parse_error(payload_body: bytes) -> Error | None:
    """Parse an ``error`` element, or None if the body is not one."""
    try:
        element = parse(payload_body)
    except MgmtError:
        return None
    return element if isinstance(element, Error) else None
