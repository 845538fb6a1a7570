"""APEX elements as plain objects, and the two BEEP payload forms that carry them.

RFC 3340 §4.1: a payload is either an ``application/beep+xml`` control
document alone, or a ``multipart/related`` whose start part is the control
document and whose other part is the data's content, referenced from the
``data`` element by a ``cid:`` URL. Content that is itself XML may instead sit
inside the control document as a ``data-content`` element referenced as
``#Name``.

Relays never modify content (§4.4.4.1), so content is kept as the exact
octets received: the ``data-content`` element as it appeared in the control
document (its byte range is taken from expat's ``CurrentByteIndex``), or the
MIME body part as it appeared between the boundaries. Re-encoding a ``data``
element with other recipients or options writes a fresh control document and
splices those octets back in verbatim; a relay handing a data on changed only in
its per-data options (the hop count) sends the payload it received with just the
option elements written anew (:func:`decode_received`, :func:`encode_onward`).

Decoding validates against the core DTD (§9.1) and the rules of §4.4 and
raises :class:`APEXError` carrying the reply code of §10 that a relay should
answer: 500 for a payload that cannot be parsed, 501 for one that is not valid,
553 for an invalid parameter (a bad endpoint, too many of something), 504 for
a transfer encoding we do not implement. Encoding objects that could never be
valid raises :class:`ValueError`: that is a bug in the caller, not the peer.
"""

from __future__ import annotations

import email.message
import email.utils
import functools
import itertools
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from urllib.parse import quote, unquote
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape, quoteattr

from imxp.apex.address import AddressError, Endpoint, normalise_domain, report_endpoint
from imxp.beep import xmlsafe
from imxp.beep.message import (
    MAX_HEADER_BLOCK,
    Message,
    MessageError,
    entity_headers,
    media_type,
)

__all__ = [
    "APEX_URI",
    "BEEP_XML",
    "MULTIPART_RELATED",
    "APEXError",
    "Option",
    "Attach",
    "Bind",
    "Terminate",
    "Originator",
    "Recipient",
    "Content",
    "Data",
    "OK",
    "Error",
    "APEXElement",
    "StatusResponse",
    "Received",
    "check_media_type",
    "decode",
    "decode_received",
    "encode",
    "encode_onward",
    "encode_status_response",
    "decode_status_response",
    "status_response_data",
]

APEX_URI = "http://iana.org/beep/APEX"
BEEP_XML = "application/beep+xml"
MULTIPART_RELATED = "multipart/related"
# The entity headers of a payload that is a control document alone (§4.1).
_BEEP_XML_HEADERS = (("Content-Type", BEEP_XML),)

# Bounds a peer cannot exceed; each refusal names the code a relay answers.
MAX_XML = 1 << 20  # control document, including any inline data-content
MAX_DEPTH = 64
MAX_PARTS = 8
MAX_RECIPIENTS = 1000
MAX_OPTIONS = 64  # per containing element
MAX_TRANS_ID = 2147483647  # UNIQID / UNIZID of the §9.1 DTD

# RFC 2045 §5.1 token (any CHAR but SPACE, CTLs and tspecials); an attribute also
# leaves out the "*" of RFC 2231's encoded and continued parameters.
_MIME_TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
_MIME_ATTRIBUTE = r"[!#$%&'+\-.0-9A-Z^_`a-z{|}~]+"
# A quoted-string (RFC 822 §3.3) of printable ASCII without backslash, so without quoted-pairs.
_PLAIN_PARAM = re.compile(
    rf'[ \t]*;[ \t]*({_MIME_ATTRIBUTE})[ \t]*=[ \t]*(?:({_MIME_TOKEN})|"([ !#-\[\]-~]*)")'
)
_PLAIN_CONTENT_TYPE = re.compile(
    rf"[ \t]*{_MIME_TOKEN}/{_MIME_TOKEN}"
    rf'((?:[ \t]*;[ \t]*{_MIME_ATTRIBUTE}[ \t]*=[ \t]*(?:{_MIME_TOKEN}|"[ !#-\[\]-~]*"))*)[ \t]*'
)
_MEDIA_TYPE = re.compile(rf"{_MIME_TOKEN}/{_MIME_TOKEN}(?:[ \t]*;.*)?\Z", re.DOTALL)
_MULTIPART_PARAMS = ("boundary", "start", "type")
# Transfer encodings that leave the octets as they are (RFC 2045 §6.1); §4.1
# says transformative ones should not be used, and we do not decode them.
_IDENTITY_ENCODINGS = frozenset({"binary", "8bit", "7bit"})
_CODE = re.compile(r"[1-5][0-9][0-9]\Z")
_NMTOKEN = re.compile(r"[\w.:-]+\Z")
_NAME = re.compile(r"[^\W\d][\w.-]*\Z")  # an XML Name without ':' (data-content's ID)
# The attributes of an element that its children inherit: see Data.in_scope.
_INHERITED = re.compile(r"(?:xmlns(?::[^\W\d][\w.-]*)?|xml:[^\W\d][\w.-]*)\Z")
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S*\Z")  # RFC 3986 §4.3, loosely
# Content-IDs and boundaries need to be unique, not secret (RFC 2045 §7, RFC 2046
# §5.1.1): 128 random bits per process and a counter, rather than a getrandom()
# system call and 32 hex digits for each data a relay forwards.
_UNIQUE_PREFIX = secrets.token_hex(16)
_unique_serial = itertools.count()


def _unique() -> str:
    """A token no other ever made, here or elsewhere (as far as 128 random bits go)."""
    return f"{_UNIQUE_PREFIX}.{next(_unique_serial)}"


# RFC 2046 §5.1.1 boundary := 0*69<bchars> bcharsnospace
_BOUNDARY_CHARS = r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]"
_BOUNDARY = re.compile(_BOUNDARY_CHARS + r"\Z")
# What quoteattr escapes in an attribute value: markup, its own quote, and the white
# space that attribute-value normalisation would turn into spaces (XML 1.0 §3.3.3).
_ATTR_SPECIAL = re.compile('[&<>"\n\r\t]')
# Characters XML 1.0 cannot carry at all (§2.2 Char), replaced in diagnostics.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# Elements whose inner octets are kept verbatim: option content is ANY and is
# forwarded to the next relay as it came; data-content is the data's content.
_VERBATIM = frozenset({"option", "data-content"})
# The end of a control document that ends with data's end tag (white space may follow).
_DATA_END = re.compile(rb"</data[ \t\r\n]*>[ \t\r\n]*\Z")
# Payloads of data as imxp writes them, read by :func:`_as_written` and
# :func:`_report_as_written`.
# An attribute value here is printable ASCII without the characters that would need a
# reference or end it (XML 1.0 §3.1): the octets are then the value as expat gives it.
# The start parameter leaves out a backslash too: email reads a quoted-pair in it (RFC 822 §3.3).
_WRITTEN_TYPE = re.compile(
    rf'{MULTIPART_RELATED}; boundary="({_BOUNDARY_CHARS})";'
    rf' start="<([!#-;=?-\[\]-~]+)>"; type="application/beep\+xml"'
)
_WRITTEN_VALUE = rb"[ !#-%'-;=?-~]*"
_WRITTEN_RECIPIENT = re.compile(rb'<recipient identity="(' + _WRITTEN_VALUE + rb')" />')
_WRITTEN_PARTIES = (
    rb'(?P<parties><originator identity="(?P<originator>' + _WRITTEN_VALUE + rb')" />'
    rb"(?P<recipients>(?:" + _WRITTEN_RECIPIENT.pattern + rb")+))"
)
_PARTIES = re.compile(_WRITTEN_PARTIES)
# content="cid:..." without "%" escapes or a fragment: the Content-ID as it is.
_WRITTEN_DATA = re.compile(rb'<data content="cid:(?P<cid>[!$\'-;=?-~]+)">' + _WRITTEN_PARTIES)
# The headers of a content body part as Content.from_bytes writes them: Content-Type, then
# Content-ID, then any others; each a line that Message reads as it is (printable ASCII).
_WRITTEN_PART_HEADERS = re.compile(
    rb"Content-Type: [ -~]*\r\nContent-ID: <([!-;=?-~]+)>\r\n(?:[!-9;-~]+:[ -~]*\r\n)*\r\n"
)
_WRITTEN_OPTION = re.compile(rb"<option [^<>]*/>|<option [^<>]*>.*?</option>", re.DOTALL)
# A report as the report service writes it (status_response_data), to its end. Text is
# character data without markup, references or "]]>" (XML 1.0 §2.4).
_WRITTEN_REPORT = re.compile(rb'<data content="#Content">' + _WRITTEN_PARTIES)
_WRITTEN_ID = rb"'[0-9]{1,10}'"
_WRITTEN_STATUS_RESPONSE = re.compile(
    rb"<data-content Name=\"Content\"><statusResponse transID=" + _WRITTEN_ID + rb">(?:"
    rb'<destination identity="' + _WRITTEN_VALUE + rb'">'
    rb"<reply code='[0-9]{3}' transID=" + _WRITTEN_ID + rb"(?: />|>[ -%'-;=?-~]*</reply>)"
    rb"</destination>)+</statusResponse></data-content></data>"
)
_DATA_END_TAG = b"</data>"
_TARGET_HOPS = ("this", "final", "all")
_T = TypeVar("_T")
_K = TypeVar("_K", str, bytes)
# XML's white space (XML 1.0 §2.3 S); str.strip() would also take U+00A0 and friends.
_S = " \t\r\n"
_S_OCTETS = _S.encode("ascii")


class APEXError(Exception):
    """A payload a relay must refuse, with the §10 reply ``code`` and diagnostic ``text``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


# --------------------------------------------------------------------------- elements


@dataclass
class Option:
    """An ``option`` element (§5).

    ``name`` is the ``internal`` attribute (an IANA-registered NMTOKEN) or,
    when ``external`` is true, the ``external`` attribute (an absolute URI).
    ``trans_id`` 0 means the attribute is absent: the DTD requires it, yet
    RFC 3342 §3 shows ``<option internal='hold4Endpoint' />``. ``body`` is the
    option's content exactly as received (outer whitespace stripped): options
    a relay does not understand are forwarded unchanged.

    ``in_scope`` holds what the body inherits from below ``data`` (whose own are
    :attr:`Data.in_scope`): the namespace declarations and ``xml:`` attributes of the
    option element and of the originator or recipient holding it, the option's own
    winning. A relay writes the option again as it counts the hop limit down, and
    writes the parties again as it splits the recipients; written on the option,
    these keep a body's prefixes bound, or a namespace-aware next hop refuses the
    data (§4.4.4.1: relays change nothing of what it means).
    """

    name: str
    external: bool = False
    target_hop: str = "final"
    must_understand: bool = False
    trans_id: int = 0
    localize: str | None = None
    body: str = ""
    in_scope: tuple[tuple[str, str], ...] = ()


@dataclass
class Attach:
    """§4.4.1: attach as ``endpoint``."""

    endpoint: str
    trans_id: int
    options: list[Option] = field(default_factory=list)


@dataclass
class Bind:
    """§4.4.2: serve as a relay for the administrative domain ``relay``."""

    relay: str
    trans_id: int
    options: list[Option] = field(default_factory=list)


@dataclass
class Terminate:
    """§4.4.3: release the attachment or binding ``trans_id`` (0: all of them)."""

    trans_id: int = 0
    code: int = 250
    text: str = ""
    lang: str | None = None


@dataclass
class Originator:
    """§4.4.4: the sending endpoint and its per-originator options."""

    identity: str
    options: list[Option] = field(default_factory=list)


@dataclass
class Recipient:
    """§4.4.4: one destination endpoint and its per-recipient options."""

    identity: str
    options: list[Option] = field(default_factory=list)


def check_media_type(media_type: str) -> None:
    """Raise ValueError unless ``media_type`` is ``type/subtype``, parameters allowed
    (RFC 2045 §5.1): what :meth:`Content.from_bytes` takes."""
    if not _MEDIA_TYPE.match(media_type):
        raise ValueError(f"media type {media_type!r} is not type/subtype (RFC 2045 §5.1)")


@dataclass(frozen=True, slots=True)
class Content:
    """The content of a ``data`` element, as the exact octets that carry it (§4.1, §4.4.4.1).

    ``kind`` is ``"inline"``: ``raw`` is the whole ``data-content`` element as
    it appeared in the control document and ``name`` its ``Name``; or
    ``"part"``: ``raw`` is a MIME body part (headers, blank line, body) as it
    appeared between two boundaries and ``name`` its Content-ID without the
    angle brackets. ``boundary`` remembers the delimiter of the multipart a
    part arrived in: it is known not to occur in ``raw``, so re-encoding can
    reuse it. Content referenced by an absolute URI outside the payload is
    not carried at all (:attr:`Data.content` is None).
    """

    kind: Literal["inline", "part"]
    raw: bytes = field(repr=False)
    name: str
    boundary: bytes | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_bytes(
        cls,
        body: bytes,
        media_type: str,
        headers: Iterable[tuple[str, str]] = (),
        content_id: str | None = None,
    ) -> Content:
        """New content for an originator: a body part with ``Content-Type: media_type``.

        A globally unique Content-ID is made unless given (RFC 2045 §7 requires
        uniqueness); ``headers`` adds further part headers. The transfer encoding
        defaults to ``binary``: BEEP is 8-bit clean and §4.1 advises against
        transformative encodings.
        """
        if isinstance(body, str):
            raise TypeError("content is bytes: encode the text (an instant message: send_message)")
        check_media_type(media_type)
        cid = content_id or f"{_unique()}@apex.invalid"
        extra = list(headers)
        names = {name.lower() for name, _ in extra}
        if names & {"content-type", "content-id"}:
            raise ValueError("Content-Type and Content-ID are set from media_type and content_id")
        lines = [("Content-Type", media_type), ("Content-ID", f"<{cid}>"), *extra]
        if "content-transfer-encoding" not in names:
            lines.append(("Content-Transfer-Encoding", "binary"))
        for name, value in lines:
            if not name or not name.isprintable() or ":" in name or " " in name:
                raise ValueError(f"invalid header name {name!r}")
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} may not contain CR or LF")
        if "<" in cid or ">" in cid or " " in cid:
            raise ValueError(f"invalid Content-ID {cid!r}")
        return cls("part", Message(body, headers=lines).to_payload(), cid)

    @classmethod
    def inline_xml(cls, xml_text: str, name: str = "Content") -> Content:
        """New inline content: ``xml_text`` inside ``<data-content Name='name'>`` (§4.1)."""
        if not _NAME.match(name):
            raise ValueError(f"data-content Name {name!r} is not an XML name")
        raw = _inline(xml_text, name)
        try:
            _parse(raw)
        except APEXError as e:
            raise ValueError(f"inline content is not well-formed XML: {e.text}") from None
        return cls("inline", raw, name)

    @property
    def ref(self) -> str:
        """The URI-reference a ``data`` element's ``content`` attribute uses for this (§4.1)."""
        if self.kind == "inline":
            return f"#{self.name}"
        # RFC 2392: a cid URL is the Content-ID with URL-reserved characters escaped.
        return "cid:" + quote(self.name, safe="@!$&'()*+,;=:.-_~")

    @property
    def headers(self) -> list[tuple[str, str]]:
        """A part's MIME headers; inline content has none."""
        if self.kind == "inline":
            return []
        return _body_part(self.raw).headers

    @property
    def media_type(self) -> str:
        """The content's media type, lower-cased, without parameters.

        A part without Content-Type is ``text/plain`` (RFC 2045 §5.2). Inline
        content is an element in the XML vocabulary of the control document,
        so it is reported as ``application/beep+xml``.
        """
        if self.kind == "inline":
            return BEEP_XML
        part = _body_part(self.raw)
        return part.content_type if part.header("Content-Type") is not None else "text/plain"

    @property
    def body(self) -> bytes:
        """What the application reads: a part's body after its headers (not transfer-decoded),
        or the octets inside the ``data-content`` element."""
        if self.kind == "part":
            return _body_part(self.raw).body
        start_tag = xmlsafe.TAG.match(self.raw)
        assert start_tag is not None  # raw was parsed when the Content was made
        if start_tag.end() == len(self.raw):  # <data-content Name='x' />
            return b""
        return self.raw[start_tag.end() : self.raw.rfind(b"</")]


@dataclass
class Data:
    """§4.4.4: a datagram from ``originator`` to ``recipients``.

    ``content_ref`` is the ``content`` attribute as received; when left empty
    it is taken from ``content`` (:attr:`Content.ref`). ``content`` is None only
    when the reference is an absolute URI outside the payload.

    ``in_scope`` holds the attributes of the ``data`` element that its content and
    options inherit - namespace declarations (``xmlns``, ``xmlns:p``: Namespaces in XML
    §6.1) and ``xml:`` attributes such as ``xml:lang`` (XML §2.12) - as (name, value)
    in the order received. An inline ``data-content`` or an option body may use a
    prefix declared there: writing the data anew (a relay splitting its recipients
    between next hops) writes them again, or the content would arrive meaning
    something else, or nothing (§4.4.4.1).
    """

    originator: Originator
    recipients: list[Recipient]
    options: list[Option] = field(default_factory=list)
    content_ref: str = ""
    content: Content | None = None
    in_scope: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.content_ref and self.content is not None:
            self.content_ref = self.content.ref


@dataclass(slots=True)
class Received:
    """A data as it arrived, kept to hand it on with other per-data options without
    writing it again: its payload, and where in the payload's body the ``option``
    children of ``data`` lie (or, with none, where they would go)."""

    data: Data
    message: Message
    options_at: int
    options_end: int


@dataclass(frozen=True)
class OK:
    """The positive reply (§9.1)."""


@dataclass(frozen=True)
class Error:
    """The negative reply: a §10 code and an optional diagnostic."""

    code: int
    text: str = ""
    lang: str | None = None


@dataclass
class StatusResponse:
    """The report service's ``statusResponse`` (§6.2, DTD §9.2).

    ``destinations`` are ``(identity, code, text)``: one recipient reported on
    and the code and diagnostic of its ``reply`` element.
    """

    trans_id: int
    destinations: list[tuple[str, int, str]]


APEXElement = Attach | Bind | Terminate | Data | OK | Error


# --------------------------------------------------------------------------- XML parsing

_Spans = dict[Element, xmlsafe.Span]


@dataclass(frozen=True)
class _Parts:
    """The body parts other than the control document, by Content-ID."""

    by_id: dict[str, bytes]
    boundary: bytes | None


_NO_PARTS = _Parts({}, None)


def _parse(xml: bytes) -> tuple[Element, _Spans]:
    """Parse a control document with :func:`imxp.beep.xmlsafe.parse`, noting where
    each ``option`` and ``data-content`` element lies in ``xml``.

    Only UTF-8, the default of ``application/beep+xml`` (RFC 3080 §6.4): those places
    are octets a relay splices the payload it received at, and a control document in
    another charset would be carried by them as the octets of another text.
    """
    spans: _Spans = {}
    try:
        root = xmlsafe.parse(
            xml,
            max_size=MAX_XML,
            max_depth=MAX_DEPTH,
            utf8_only=True,
            spans_of=_VERBATIM,
            spans=spans,
        )
    except xmlsafe.XMLError as e:
        raise APEXError(500, str(e)) from None
    return root, spans


# --------------------------------------------------------------------------- validation


def _required(element: Element, name: str) -> str:
    value = element.get(name)
    if value is None:
        raise APEXError(501, f"{element.tag} element needs a {name} attribute")
    return value


def _trans_id(element: Element, *, default: int | None = None, zero: bool = False) -> int:
    """A UNIQID (1..2147483647) or, with ``zero``, a UNIZID (0..2147483647) of §9.1."""
    raw = element.get("transID")
    if raw is None:
        if default is None:
            raise APEXError(501, f"{element.tag} element needs a transID attribute")
        return default
    # str.isdigit() alone accepts non-ASCII digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
        raise APEXError(501, f"transID {raw[:16]!r} of {element.tag} is not a number")
    value = int(raw)
    if value > MAX_TRANS_ID or (value == 0 and not zero):
        raise APEXError(501, f"transID {value} of {element.tag} is out of range")
    return value


def _code(element: Element, default: int | None = None) -> int:
    raw = element.get("code")
    if raw is None:
        if default is None:
            raise APEXError(501, f"{element.tag} element needs a code attribute")
        return default
    if not _CODE.match(raw):
        raise APEXError(501, f"code {raw[:8]!r} of {element.tag} is not a three-digit code")
    return int(raw)


def _identity(element: Element, name: str = "identity") -> str:
    """An ENDPOINT attribute, kept as written once it parses (§2.2); 553 if it does not."""
    value = _required(element, name)
    try:
        Endpoint.parse(value)
    except AddressError as e:
        raise APEXError(553, f"{element.tag} {name}: {e}") from None
    return value


def _text(element: Element) -> str:
    """The diagnostic content of terminate, error or reply: text only (#PCDATA)."""
    if len(element):
        raise APEXError(501, f"{element.tag} element may not contain elements")
    return (element.text or "").strip(_S)


def _no_text(element: Element) -> None:
    """Element-only content (§9.1) may have whitespace between its elements but no text."""
    # A loop, not any() over a generator: three of these run for every data a relay reads.
    text = element.text
    if text and text.strip(_S):
        raise APEXError(501, f"{element.tag} element may not contain text")
    for child in element:
        tail = child.tail
        if tail and tail.strip(_S):
            raise APEXError(501, f"{element.tag} element may not contain text")


def _option(element: Element, body: bytes, outer: tuple[tuple[str, str], ...] = ()) -> Option:
    internal = element.get("internal") or None  # the DTD's default is ""
    external = element.get("external") or None
    if (internal is None) == (external is None):
        raise APEXError(501, "an option has exactly one of internal and external (§5)")
    if internal is not None and not _NMTOKEN.match(internal):
        raise APEXError(501, f"option internal {internal[:32]!r} is not an NMTOKEN")
    if external is not None and not _ABSOLUTE_URI.match(external):
        raise APEXError(501, f"option external {external[:32]!r} is not an absolute URI")
    target_hop = element.get("targetHop", "final")
    if target_hop not in _TARGET_HOPS:
        raise APEXError(501, f"option targetHop {target_hop[:16]!r} is not this|final|all")
    must = element.get("mustUnderstand", "false")
    if must not in ("true", "false"):
        raise APEXError(501, f"option mustUnderstand {must[:16]!r} is not true|false")
    return Option(
        name=internal or external or "",
        external=external is not None,
        target_hop=target_hop,
        must_understand=must == "true",
        trans_id=_trans_id(element, default=0),
        localize=element.get("localize"),
        body=body.decode("utf-8").strip(_S),
        in_scope=_in_scope(element, outer),
    )


def _in_scope(
    element: Element, outer: tuple[tuple[str, str], ...] = ()
) -> tuple[tuple[str, str], ...]:
    """The attributes of ``element`` that its children inherit (see :attr:`Data.in_scope`),
    after ``outer``, those of the element holding it, that it does not declare again."""
    own = [(name, value) for name, value in element.items() if _INHERITED.match(name)]
    if not outer:
        return tuple(own)
    names = {name for name, _ in own}
    return (*((name, value) for name, value in outer if name not in names), *own)


# Options read, by the octets of their option elements: a relay meets the same few (a
# dataHopping option is ~120 octets) in data after data. An element means the same
# wherever it stands (no DTD, so no entities but XML's own, and no namespaces), and only
# short ones that were valid are kept, so a peer cannot make this big.
_OPTIONS_READ: dict[bytes, Option] = {}
_OPTIONS_READ_LIMIT = 256
_SHORT_OPTION = 256


def _options(
    elements: list[Element],
    xml: bytes,
    spans: _Spans,
    where: str,
    outer: tuple[tuple[str, str], ...] = (),
) -> list[Option]:
    """The options ``elements``; ``outer`` is what their container declares for them to
    inherit (:attr:`Option.in_scope`)."""
    if len(elements) > MAX_OPTIONS:
        raise APEXError(553, f"more than {MAX_OPTIONS} options in {where}")
    options = []
    for element in elements:
        at, inner, close, end = spans[element]
        raw = xml[at:end]
        # What an option inherits from its container is not in its octets: such an
        # option is not remembered by them.
        option = None if outer else _OPTIONS_READ.get(raw)
        if option is None:
            option = _option(element, xml[inner:close], outer)
            if end - at <= _SHORT_OPTION and not outer:
                if len(_OPTIONS_READ) >= _OPTIONS_READ_LIMIT:
                    _OPTIONS_READ.clear()
                _OPTIONS_READ[raw] = option
        options.append(option)
    return options


def _only_options(element: Element, xml: bytes, spans: _Spans) -> list[Option]:
    """The content model ``(option*)`` of attach, bind, originator and recipient."""
    _no_text(element)
    if not len(element):
        return []  # the usual originator and recipient
    for child in element:
        if child.tag != "option":
            raise APEXError(501, f"unexpected {child.tag[:32]} element in {element.tag}")
    return _options(list(element), xml, spans, element.tag, _in_scope(element))


def _data(
    root: Element, xml: bytes, spans: _Spans, parts: _Parts, where: list[int] | None = None
) -> Data:
    ref = _required(root, "content")
    _no_text(root)
    originators: list[Element] = []
    recipients: list[Element] = []
    options: list[Element] = []
    contents: list[Element] = []
    by_tag = {
        "originator": originators,
        "recipient": recipients,
        "option": options,
        "data-content": contents,
    }
    for child in root:
        bucket = by_tag.get(child.tag)
        if bucket is None:
            raise APEXError(501, f"unexpected {child.tag[:32]} element in data")
        bucket.append(child)
    if len(recipients) > MAX_RECIPIENTS:
        raise APEXError(553, f"more than {MAX_RECIPIENTS} recipients")
    # (originator, recipient+, option*, data-content?) of §9.1; the order is not
    # enforced, since it carries no meaning and we re-serialise in DTD order.
    if len(originators) != 1:
        raise APEXError(501, "data needs exactly one originator")
    if not recipients:
        raise APEXError(501, "data needs at least one recipient")
    if len(contents) > 1:
        raise APEXError(501, "data has at most one data-content")
    originator = originators[0]
    data = Data(
        originator=Originator(_identity(originator), _only_options(originator, xml, spans)),
        recipients=[Recipient(_identity(r), _only_options(r, xml, spans)) for r in recipients],
        options=_options(options, xml, spans, "data"),
        content_ref=ref,
        content=_content(ref, contents[0] if contents else None, xml, spans, parts),
        in_scope=_in_scope(root),
    )
    if where is not None:
        where.extend(_options_place(options, contents, xml, spans))
    return data


def _options_place(
    options: list[Element], contents: list[Element], xml: bytes, spans: _Spans
) -> tuple[int, int] | tuple[()]:
    """Where the per-data options of a data lie in ``xml``: from the first option element
    to the end of the last, when nothing but white space comes between them; with none,
    the empty range where they go: before any data-content (the DTD's order), else
    before data's end tag when the document ends with it (only white space can follow
    it there, not a comment that could hold another "</data")."""
    if not options:
        if contents:
            at = spans[contents[0]][0]
            return at, at
        at = xml.rfind(b"</data")
        return (at, at) if at >= 0 and _DATA_END.match(xml, at) else ()
    at, end = spans[options[0]][0], spans[options[0]][3]
    for option in options[1:]:
        next_at, next_end = spans[option][0], spans[option][3]
        if xml[end:next_at].strip(_S_OCTETS):
            return ()
        end = next_end
    return at, end


def _content(
    ref: str, inline: Element | None, xml: bytes, spans: _Spans, parts: _Parts
) -> Content | None:
    """Resolve the ``content`` URI-reference of §4.1 to the octets it names."""
    if ref.startswith("#"):
        name = ref[1:]
        if inline is None or inline.get("Name") != name:
            raise APEXError(501, f"content {ref[:64]!r} names no data-content element")
        if not _NAME.match(name):
            raise APEXError(501, f"data-content Name {name[:32]!r} is not an XML name")
        at, _inner, _close, end = spans[inline]
        return Content("inline", xml[at:end], name)
    if inline is not None:
        raise APEXError(501, "data-content is present but content does not reference it")
    if ref[:4].lower() == "cid:":
        # RFC 2392: the URL is the %-escaped Content-ID; a fragment is not part of it.
        cid = ref[4:].partition("#")[0]
        if "%" in cid:
            cid = unquote(cid)
        raw = parts.by_id.get(cid)
        if raw is None:
            raise APEXError(501, f"content {ref[:64]!r} matches no body part")
        return Content("part", raw, cid, parts.boundary)
    if not _ABSOLUTE_URI.match(ref):
        # §4.1: an absolute URI, or a relative one consisting only of a fragment.
        raise APEXError(501, f"content {ref[:64]!r} is neither absolute nor a fragment")
    return None


def _element(xml: bytes, parts: _Parts, where: list[int] | None = None) -> APEXElement:
    root, spans = _parse(xml)
    tag = root.tag
    if tag == "data":
        return _data(root, xml, spans, parts, where)
    if tag == "attach":
        endpoint = _identity(root, "endpoint")
        return Attach(endpoint, _trans_id(root), _only_options(root, xml, spans))
    if tag == "bind":
        relay = _required(root, "relay")
        try:
            normalise_domain(relay)
        except AddressError as e:
            raise APEXError(553, f"bind relay: {e}") from None
        return Bind(relay, _trans_id(root), _only_options(root, xml, spans))
    if tag == "terminate":
        return Terminate(
            _trans_id(root, default=0, zero=True),
            _code(root, 250),
            _text(root),
            root.get("xml:lang"),
        )
    if tag == "ok":
        if len(root) or (root.text or "").strip(_S):
            raise APEXError(501, "ok element must be empty")
        return OK()
    if tag == "error":
        return Error(_code(root), _text(root), root.get("xml:lang"))
    raise APEXError(501, f"unexpected {tag[:32]} element in APEX")


# --------------------------------------------------------------------------- multipart


def _bodiless(part: bytes) -> bool:
    """Whether ``part`` is a body part of headers alone, written without the blank line
    that only a body needs: RFC 2046 §5.1.1, body-part := MIME-part-headers [CRLF
    *OCTET]. The CRLF ending its last header stands just before the delimiter's."""
    return part.endswith(b"\r\n") and b"\r\n\r\n" not in part


def _part_headers(part: bytes) -> tuple[dict[str, str], int]:
    """:func:`entity_headers` of a body part, which may have no body (:func:`_bodiless`)."""
    try:
        return entity_headers(part)
    except MessageError:
        if not _bodiless(part):
            raise
        headers, _ = entity_headers(part + b"\r\n")
        return headers, len(part)


def _body_part(part: bytes) -> Message:
    """A body part as a :class:`Message`; it may have no body (:func:`_bodiless`)."""
    return Message.from_payload(part + b"\r\n" if _bodiless(part) else part)


def _content_id(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value


def _content_type_params(value: str) -> dict[str, str]:
    """The boundary, start and type parameters of a multipart/related Content-Type
    (RFC 2045 §5.1, RFC 2387 §3): by :func:`_plain_params` when the header is plainly
    written, as every relay and client writes it, else by :mod:`email`."""
    params = _plain_params(value)
    return params if params is not None else _careful_params(value)


def _plain_params(value: str) -> dict[str, str] | None:
    """The parameters of a header that keeps to the plain grammar of RFC 2045 §5.1, or None.

    Plain means: ``type/subtype``, then ``; attribute=value`` where each value is a
    token or a quoted-string without backslashes, and attributes without the ``*`` of
    RFC 2231; space or tab around the separators. :func:`_careful_params` gives the very
    same answer for such a header, a fifth of the time; anything else is left to it.
    """
    header = _PLAIN_CONTENT_TYPE.fullmatch(value)
    if header is None:
        return None
    params: dict[str, str] = {}
    # findall: tuples made in C, no match objects. A token is never empty, so an
    # empty one means the value was the quoted-string.
    for name, token, quoted in _PLAIN_PARAM.findall(value, header.start(1), header.end(1)):
        name = name.lower()
        if name in _MULTIPART_PARAMS and name not in params:  # the first one counts
            if token:
                params[name] = token
            elif len(quoted) > 1 and quoted[0] == "<" and quoted[-1] == ">":
                # email unquotes twice, and the second time strips the <> of start="<cid>".
                params[name] = quoted[1:-1]
            else:
                params[name] = quoted
    return params


def _careful_params(value: str) -> dict[str, str]:
    header = email.message.Message()
    header["Content-Type"] = value
    params = {}
    for name in _MULTIPART_PARAMS:
        param = header.get_param(name)
        if param is not None:
            params[name] = email.utils.collapse_rfc2231_value(param)
    return params


_SHORT_SEARCHES = 8


def _has_delimiter(part: bytes, boundary: bytes) -> bool:
    """Whether CRLF "--" ``boundary`` occurs in ``part``.

    bytes.find is slow for a long needle in content that shares its characters,
    so the short part is searched for and the boundary checked where it is found.
    Content with many lines starting "--" (a nested multipart, or one written to
    make us loop) soon goes back to searching for the whole delimiter.
    """
    at = part.find(b"\r\n--")
    for _ in range(_SHORT_SEARCHES):
        if at < 0 or part.startswith(boundary, at + 4):
            return at >= 0
        at = part.find(b"\r\n--", at + 4)
    return part.find(b"\r\n--" + boundary, at) >= 0


def _split(body: bytes, boundary: bytes) -> list[tuple[int, bytes]]:
    """The body parts of a multipart body (RFC 2046 §5.1.1), each with where it starts
    in ``body``.

    Each delimiter is CRLF "--" boundary (the very first may start the body), then
    optional padding and CRLF; the close delimiter adds "--", and what follows it is
    the epilogue. A line that starts with the delimiter but goes on with other
    characters is refused rather than guessed at. One split finds every delimiter,
    in C; it stops after the most a valid body can have.
    """
    delimiter = b"\r\n--" + boundary
    pieces = body.split(delimiter, MAX_PARTS + 1)
    if body.startswith(delimiter[2:]):
        at = len(delimiter) - 2
        pieces[0] = pieces[0][at:]
    elif len(pieces) == 1:
        raise APEXError(500, "multipart body has no boundary delimiter")
    else:
        at = len(pieces.pop(0)) + len(delimiter)  # the preamble, ignored
    parts: list[tuple[int, bytes]] = []
    for piece in pieces:
        if piece.startswith(b"--"):
            if not parts:
                raise APEXError(500, "multipart body has no parts")
            return parts
        eol = piece.find(b"\r\n")
        if eol < 0 or piece[:eol].strip(b" \t"):
            raise APEXError(500, "malformed multipart boundary line")
        parts.append((at + eol + 2, piece[eol + 2 :]))
        if len(parts) > MAX_PARTS:
            raise APEXError(553, f"multipart body has more than {MAX_PARTS} parts")
        at += len(piece) + len(delimiter)
    raise APEXError(500, "multipart body has no closing delimiter")


def _multipart(body: bytes, content_type: str, where: list[int] | None = None) -> APEXElement:
    params = _content_type_params(content_type)
    boundary = params.get("boundary", "")
    if not _BOUNDARY.match(boundary):
        raise APEXError(500, f"multipart/related boundary {boundary[:80]!r} is not valid")
    if params.get("type", BEEP_XML).lower() != BEEP_XML:
        raise APEXError(500, f"multipart/related type must be {BEEP_XML}")
    delimiting = boundary.encode("ascii")
    places = _split(body, delimiting)
    try:
        heads = [_part_headers(raw) for _, raw in places]
    except MessageError as e:
        raise APEXError(500, f"body part: {e}") from None
    by_id: dict[str, int] = {}
    for index, (headers, _) in enumerate(heads):
        cid = _content_id(headers.get("content-id"))
        if cid is not None:
            if cid in by_id:
                raise APEXError(501, f"two body parts have Content-ID {cid[:64]!r}")
            by_id[cid] = index
    # RFC 2387 §3.2: the start parameter names the root part, else it is the first.
    start = 0
    if "start" in params:
        found = by_id.get(_content_id(params["start"]) or "")
        if found is None:
            raise APEXError(501, "multipart/related start matches no body part")
        start = found
    control, at = heads[start]
    control_type = control.get("content-type")
    if control_type is None or media_type(control_type) != BEEP_XML:
        raise APEXError(500, f"the control part of multipart/related must be {BEEP_XML}")
    encoding = control.get("content-transfer-encoding")
    if encoding is not None and encoding.strip().lower() not in _IDENTITY_ENCODINGS:
        raise APEXError(504, f"transfer encoding {encoding.strip().lower()[:32]} not supported")
    others = {cid: places[i][1] for cid, i in by_id.items() if i != start}
    offset, raw = places[start]
    element = _element(raw[at:], _Parts(others, delimiting), where)
    if where:
        # From the control document's octets to the body's.
        where[:] = [offset + at + place for place in where]
    content = element.content if isinstance(element, Data) else None
    referenced = 1 if content is not None and content.kind == "part" else 0
    # Only one part can be referenced; forwarding would silently drop any other.
    if len(places) != 1 + referenced:
        raise APEXError(501, "multipart/related has body parts that nothing references")
    return element


def _as_written(body: bytes, content_type: str, where: list[int] | None) -> Data | None:
    """The data in a ``multipart/related`` payload written as :func:`_encode_data` writes
    it - as every imxp client and relay sends data - or None for :func:`_multipart`.

    A relay reads a data in every payload it carries, and :func:`_multipart` with the
    XML parser took a third of its time. The form written here is fixed down to the
    octet: the Content-Type's parameters in their order, two body parts (the control
    document, then the content it references, with the headers
    :meth:`Content.from_bytes` writes), the control document
    ``<data content="cid:..."><originator .../><recipient .../>...</data>`` with
    attribute values that need no reference, per-data options only, and each option
    element one that :func:`_options` has read before (:func:`_written_options`). What
    matches is therefore well-formed, and it is read exactly as :func:`_multipart` reads
    it; anything else, bad or merely written otherwise, goes there, as does any data
    that would be refused, so that the refusal and its code are that path's.
    """
    written = _WRITTEN_TYPE.fullmatch(content_type)
    if written is None:
        return None
    boundary = written[1].encode("ascii")
    start = written[2]
    head = b"--%s\r\n%s" % (boundary, _control_headers(start))
    if not body.startswith(head):
        return None
    at = len(head)
    delimiter = b"\r\n--" + boundary
    end = body.find(delimiter, at, at + MAX_XML + len(delimiter))
    part_at = end + len(delimiter) + 2
    close = len(body) - len(delimiter) - 2
    if end < 0 or body[part_at - 2 : part_at] != b"\r\n" or part_at > close:
        return None
    part = body[part_at:close]
    # Exactly two parts: after the CRLF that ends a delimiter line, "--" boundary would
    # begin another.
    if (
        body[close:] != delimiter + b"--"
        or part.startswith(delimiter[2:])
        or _has_delimiter(part, boundary)
    ):
        return None
    control = _WRITTEN_DATA.match(body, at, end)
    options_end = end - len(_DATA_END_TAG)
    if control is None or body[options_end:end] != _DATA_END_TAG:
        return None
    read = _written_options(body, control.end(), options_end)
    parties = _written_parties(control)
    if read is None or read[1] != options_end or parties is None:
        return None
    part_headers = _WRITTEN_PART_HEADERS.match(part)
    if part_headers is None or part_headers.end() > MAX_HEADER_BLOCK:
        return None
    cid = control["cid"].decode("ascii")
    if part_headers[1] != control["cid"] or cid == start:
        return None
    if where is not None:
        where += (control.end(), options_end)
    content = Content("part", part, cid, boundary)
    return Data(parties[0], parties[1], read[0], f"cid:{cid}", content)


def _report_as_written(xml: bytes, where: list[int] | None) -> Data | None:
    """The data in an ``application/beep+xml`` payload that is a report as the report
    service writes it (:func:`status_response_data`), or None for :func:`_element`: as
    :func:`_as_written`, for the data that comes back for every data a client sends.

    The content is a ``statusResponse`` written as :func:`encode_status_response`
    writes it, with diagnostics that need no reference: the only XML that can stand
    there here, so that what matches is well-formed.
    """
    head = _WRITTEN_REPORT.match(xml)
    if head is None or len(xml) > MAX_XML:
        return None
    read = _written_options(xml, head.end(), len(xml))
    if read is None or not _WRITTEN_STATUS_RESPONSE.fullmatch(xml, read[1]):
        return None
    parties = _written_parties(head)
    if parties is None:
        return None
    if where is not None:
        where += (head.end(), read[1])
    content = Content("inline", xml[read[1] : -len(_DATA_END_TAG)], "Content")
    return Data(parties[0], parties[1], read[0], "#Content", content)


def _written_options(xml: bytes, at: int, end: int) -> tuple[list[Option], int] | None:
    """The option elements from ``at`` on, before ``end``, and where they end; None when
    one of them was not read before (or there are more than a data may have).

    Each is an element :func:`_options` has read, in a well-formed document: so it is an
    element wherever it stands (there is no DTD), and it reads the same."""
    options: list[Option] = []
    while xml.startswith(b"<option ", at, end):
        element = _WRITTEN_OPTION.match(xml, at, end)
        option = _OPTIONS_READ.get(element[0]) if element is not None else None
        if option is None or len(options) == MAX_OPTIONS:
            return None
        options.append(option)
        at = element.end()
    return options, at


def remember_short(read: Callable[[_K], _T]) -> Callable[[_K], _T]:
    """``read`` of a text, its results remembered for short texts.

    A relay meets the same few option bodies (a dataHopping element is ~50 characters)
    and the same few parties in every data it carries. Only results are kept - a text
    that raises is read again - and only of texts up to 256 characters or octets, so
    a peer cannot make the cache big.
    """
    remembered = functools.lru_cache(maxsize=256)(read)

    def reading(text: _K) -> _T:
        return remembered(text) if len(text) <= 256 else read(text)

    return reading


def _written_parties(element: re.Match[bytes]) -> tuple[Originator, list[Recipient]] | None:
    """The originator and recipients of a data as written, or None when one of them is not
    an endpoint (or there are more recipients than a data may have)."""
    identities = _written_identities(element["parties"])
    if identities is None:
        return None
    return Originator(identities[0], []), [Recipient(r, []) for r in identities[1]]


@remember_short
def _written_identities(parties: bytes) -> tuple[str, tuple[str, ...]] | None:
    """What the originator and recipient elements of a data as written read as."""
    element = _PARTIES.fullmatch(parties)
    assert element is not None, "only the parties of a data as written"
    identities = _WRITTEN_RECIPIENT.findall(element["recipients"])
    if len(identities) > MAX_RECIPIENTS:
        return None
    originator = element["originator"].decode("ascii")
    recipients = tuple(identity.decode("ascii") for identity in identities)
    try:
        Endpoint.parse(originator)
        for recipient in recipients:
            Endpoint.parse(recipient)
    except AddressError:
        return None
    return originator, recipients


def _choose_boundary(parts: Iterable[bytes], reuse: bytes | None) -> bytes:
    """A boundary whose delimiter occurs in none of ``parts`` (RFC 2046 §5.1.1)."""
    parts = list(parts)
    candidate = reuse if reuse is not None else f"apex-{_unique()}".encode()
    while any(p.startswith(b"--" + candidate) or _has_delimiter(p, candidate) for p in parts):
        # Unpredictable this time: content written to hold our next boundaries must
        # not make us scan it again and again.
        candidate = b"apex-" + secrets.token_hex(16).encode()
    return candidate


# --------------------------------------------------------------------------- decode / encode


def decode(message: Message) -> APEXElement:
    """The APEX element in a BEEP payload of either §4.1 form; raises :class:`APEXError`."""
    return _decode(message, None)


def decode_received(message: Message) -> tuple[APEXElement, Received | None]:
    """:func:`decode`, and for a data whose per-data options lie together (as every
    relay and client writes them) what :func:`encode_onward` needs to hand it on."""
    where: list[int] = []
    element = _decode(message, where)
    if isinstance(element, Data) and where:
        return element, Received(element, message, where[0], where[1])
    return element, None


def _decode(message: Message, where: list[int] | None) -> APEXElement:
    if message.transfer_encoding not in _IDENTITY_ENCODINGS:
        raise APEXError(504, f"transfer encoding {message.transfer_encoding[:32]} not supported")
    raw_type = message.header("Content-Type")
    content_type = media_type(raw_type)
    if content_type == BEEP_XML:
        data = _report_as_written(message.body, where)
        if data is not None:
            return data
        return _element(message.body, _NO_PARTS, where)
    if content_type == MULTIPART_RELATED:
        data = _as_written(message.body, raw_type or "", where)
        if data is not None:
            return data
        return _multipart(message.body, raw_type or "", where)
    raise APEXError(500, f"an APEX payload is {BEEP_XML} or {MULTIPART_RELATED}")


#: How the text of a 451 verdict ends when the data was handed on (to a next hop, to an
#: application) and what became of it could not be learned: RFC 3340 §10 has no code for
#: "unknown", so the text is the only place to say it. The data may well have arrived,
#: and a sender that took such a 451 for a failure and sent again could deliver it twice;
#: the client library reads it back (:func:`says_outcome_unknown`).
OUTCOME_UNKNOWN = "outcome unknown"


def outcome_unknown(reason: str) -> str:
    """The text of a 451 verdict (RFC 3340 §10) for data handed on whose fate could not be
    learned: ``reason``, then :data:`OUTCOME_UNKNOWN`."""
    return f"{reason}; {OUTCOME_UNKNOWN}"


def says_outcome_unknown(code: int | None, text: str) -> bool:
    """Whether a final status (RFC 3340 §6.2) of ``code`` and ``text`` is a relay saying it
    does not know what became of the data: a 451 made by :func:`outcome_unknown`."""
    return code == 451 and text.endswith(OUTCOME_UNKNOWN)


def reply_outcome(reply: Message | list[Message], who: str) -> tuple[int, str]:
    """What a positive reply to a data, from ``who`` (a next hop, an application), says of
    it (RFC 3340 §4.4.4.1 step 5.2, §4.4.4.2): 250 only for an ``ok`` element; an
    ``error`` element is the :func:`refusal` it carries, as an ERR would be; anything else
    - a one-to-many reply (a list of ANS), a payload that is not APEX - says nothing of
    what became of the data: 451, outcome unknown."""
    if type(reply) is not Message:
        return 451, outcome_unknown(f"{who} answered with a one-to-many reply, not ok")
    if reply.body == _OK_BODY:
        return 250, ""
    try:
        answer = decode(reply)
    except APEXError:
        answer = None
    if isinstance(answer, OK):
        return 250, ""
    if isinstance(answer, Error):
        return refusal(answer.code, answer.text, who)
    return 451, outcome_unknown(f"{who} answered with neither ok nor error")


def refusal(code: int, text: str, who: str) -> tuple[int, str]:
    """The code and text of ``who``'s refusal of a data: as given when the code is one a
    refusal has, 4xx or 5xx (RFC 3340 §10); else 554, for an "error" coded 250 took
    nothing and must not be taken for the delivery or hand-over it says it is."""
    if 400 <= code <= 599:
        return code, text
    said = f"{who} refused it with code {code}, which no refusal has"
    return 554, f"{said}: {text}" if text else said


def encode(element: APEXElement) -> Message:
    """The BEEP payload for ``element``: ``application/beep+xml``, or ``multipart/related``
    when a ``data`` element's content is a body part (§4.1)."""
    if isinstance(element, Data):
        return _encode_data(element)
    return Message(_xml(element).encode("utf-8"), headers=_BEEP_XML_HEADERS)


def encode_onward(onward: Data, received: Received | None) -> Message:
    """The payload handing on ``onward``, a data made from ``received.data`` by a relay.

    When only its per-data options differ - the same originator, recipients and content,
    as when a relay counts down the hop limit (RFC 3342 §4) - that is the payload
    received with the option elements written anew in their place: the rest of the
    control document and every body part go on as the octets they came as (§4.4.4.1).
    Otherwise, and whenever the new options would hold what could end a body part,
    it is :func:`encode`'s.
    """
    if received is not None and _same_but_options(onward, received.data):
        options = _options_xml(onward.options).encode("utf-8")
        if b"\r\n" not in options:
            body = received.message.body
            spliced = body[: received.options_at] + options + body[received.options_end :]
            return Message(spliced, headers=received.message.headers)
    return encode(onward)


def _same_but_options(onward: Data, data: Data) -> bool:
    """Whether ``onward`` has ``data``'s very originator, recipients and content."""
    if (
        onward.originator is not data.originator
        or onward.content is not data.content
        or onward.content_ref != data.content_ref
        or len(onward.recipients) != len(data.recipients)
    ):
        return False
    for mine, theirs in zip(onward.recipients, data.recipients, strict=True):
        if mine is not theirs:
            return False
    return True


def _inline(xml_text: str, name: str) -> bytes:
    """The ``data-content`` element carrying ``xml_text`` inline (§4.1)."""
    return f"<data-content Name={_attr(name)}>{xml_text}</data-content>".encode()


def _attr(value: str) -> str:
    """``quoteattr(value)``: quickly for the usual value, which needs no escaping."""
    if _ATTR_SPECIAL.search(value) is None:
        return f'"{value}"'
    return quoteattr(value)


def _diagnostic(text: str) -> str:
    # A literal CR would come back as LF (XML 1.0 §2.11); a reference survives.
    return escape(_NOT_XML.sub("\ufffd", text), {"\r": "&#13;"})


def _check_option(option: Option) -> None:
    if option.external:
        if not _ABSOLUTE_URI.match(option.name):
            raise ValueError(f"external option {option.name!r} is not an absolute URI")
    elif not _NMTOKEN.match(option.name):
        raise ValueError(f"internal option {option.name!r} is not an NMTOKEN")
    if option.target_hop not in _TARGET_HOPS:
        raise ValueError(f"targetHop {option.target_hop!r} is not this|final|all")
    if not 0 <= option.trans_id <= MAX_TRANS_ID:
        raise ValueError(f"option transID {option.trans_id} is out of range")
    if option.body:
        _check_option_body(option.body)


@remember_short
def _check_option_body(body: str) -> None:
    try:
        _parse(f"<option>{body}</option>".encode())
    except APEXError as e:
        raise ValueError(f"option body is not well-formed XML: {e.text}") from None


def _options_xml(options: list[Option]) -> str:
    out = []
    for option in options:
        _check_option(option)
        attrs = (
            f"{'external' if option.external else 'internal'}={_attr(option.name)}"
            f" targetHop='{option.target_hop}'"
            f" mustUnderstand='{'true' if option.must_understand else 'false'}'"
        )
        if option.trans_id:
            attrs += f" transID='{option.trans_id}'"
        if option.localize is not None:
            attrs += f" localize={_attr(option.localize)}"
        if option.in_scope:
            attrs += _inherited_attributes(option.in_scope)
        if option.body:
            out.append(f"<option {attrs}>{option.body}</option>")
        else:
            out.append(f"<option {attrs} />")
    return "".join(out)


def _inherited_attributes(in_scope: tuple[tuple[str, str], ...]) -> str:
    """``in_scope`` (:attr:`Data.in_scope`, :attr:`Option.in_scope`) written as the
    attributes of an element; ValueError for one that children do not inherit."""
    for name, _value in in_scope:
        if not _INHERITED.match(name):
            raise ValueError(f"{name!r} is neither a namespace declaration nor an xml: attribute")
    return "".join(f" {name}={_attr(value)}" for name, value in in_scope)


def _check_trans_id(value: int, *, zero: bool = False) -> None:
    if not (0 if zero else 1) <= value <= MAX_TRANS_ID:
        raise ValueError(f"transID {value} is out of range")


def _check_code(code: int) -> None:
    if not 100 <= code <= 599:
        raise ValueError(f"reply code {code} is not three digits")


def _with_text(tag: str, attrs: str, text: str, lang: str | None) -> str:
    if lang is not None:
        attrs += f" xml:lang={_attr(lang)}"
    if not text:
        return f"<{tag}{attrs} />"
    return f"<{tag}{attrs}>{_diagnostic(text)}</{tag}>"


def _party(tag: str, party: Originator | Recipient) -> str:
    Endpoint.parse(party.identity)
    if not party.options:
        return f"<{tag} identity={_attr(party.identity)} />"
    return f"<{tag} identity={_attr(party.identity)}>{_options_xml(party.options)}</{tag}>"


def _xml(element: Attach | Bind | Terminate | OK | Error) -> str:
    if isinstance(element, OK):
        return "<ok />"  # the answer to nearly every request a relay gets: looked for first
    if isinstance(element, Attach):
        Endpoint.parse(element.endpoint)
        _check_trans_id(element.trans_id)
        attrs = f"endpoint={_attr(element.endpoint)} transID='{element.trans_id}'"
        return _container("attach", attrs, element.options)
    if isinstance(element, Bind):
        normalise_domain(element.relay)
        _check_trans_id(element.trans_id)
        attrs = f"relay={_attr(element.relay)} transID='{element.trans_id}'"
        return _container("bind", attrs, element.options)
    if isinstance(element, Terminate):
        _check_trans_id(element.trans_id, zero=True)
        _check_code(element.code)
        attrs = f" transID='{element.trans_id}' code='{element.code}'"
        return _with_text("terminate", attrs, element.text, element.lang)
    if isinstance(element, Error):
        _check_code(element.code)
        return _with_text("error", f" code='{element.code}'", element.text, element.lang)
    raise TypeError(f"not an APEX element: {element!r}")


def _container(tag: str, attrs: str, options: list[Option]) -> str:
    if not options:
        return f"<{tag} {attrs} />"
    return f"<{tag} {attrs}>{_options_xml(options)}</{tag}>"


def _control_headers(control_id: str) -> bytes:
    """The headers of the control document's body part, as :func:`_encode_data` writes them."""
    return f"Content-Type: {BEEP_XML}\r\nContent-ID: <{control_id}>\r\n\r\n".encode("ascii")


def _encode_data(data: Data) -> Message:
    if not data.recipients:
        raise ValueError("data needs at least one recipient")
    content = data.content
    ref = data.content_ref
    if content is None:
        if ref.startswith("#") or ref[:4].lower() == "cid:" or not _ABSOLUTE_URI.match(ref):
            raise ValueError(f"content {ref!r} refers to content the data does not carry")
    elif content.kind == "inline":
        if ref != content.ref:
            raise ValueError(f"content {ref!r} does not reference the inline content")
    elif ref[:4].lower() != "cid:" or unquote(ref[4:].partition("#")[0]) != content.name:
        raise ValueError(f"content {ref!r} does not reference body part <{content.name}>")
    inherited = _inherited_attributes(data.in_scope)
    head = (
        f"<data content={_attr(ref)}{inherited}>"
        + _party("originator", data.originator)
        + "".join(_party("recipient", r) for r in data.recipients)
        + _options_xml(data.options)
    ).encode("utf-8")
    if content is None or content.kind == "inline":
        inline = content.raw if content is not None else b""
        return Message(head + inline + _DATA_END_TAG, BEEP_XML)
    control_id = f"{_unique()}@apex.invalid"
    control = _control_headers(control_id) + head + _DATA_END_TAG
    boundary = _choose_boundary((control, content.raw), content.boundary)
    delimiter = b"--" + boundary
    body = b"".join(
        (delimiter, b"\r\n", control, b"\r\n", delimiter, b"\r\n", content.raw, b"\r\n")
    )
    body += delimiter + b"--"
    content_type = (
        f'{MULTIPART_RELATED}; boundary="{boundary.decode("ascii")}";'
        f' start="<{control_id}>"; type="{BEEP_XML}"'
    )
    return Message(body, content_type)


# --------------------------------------------------------------------------- report service


def encode_status_response(response: StatusResponse) -> str:
    """The ``statusResponse`` element of §6.2 (DTD §9.2).

    Each ``reply`` carries the response's transID, which the §9.1 DTD makes
    required even though the §5.1 examples leave it out.
    """
    _check_trans_id(response.trans_id)
    if not response.destinations:
        raise ValueError("a statusResponse needs at least one destination")
    out = [f"<statusResponse transID='{response.trans_id}'>"]
    for identity, code, text in response.destinations:
        Endpoint.parse(identity)
        _check_code(code)
        reply = _with_text("reply", f" code='{code}' transID='{response.trans_id}'", text, None)
        out.append(f"<destination identity={_attr(identity)}>{reply}</destination>")
    out.append("</statusResponse>")
    return "".join(out)


def decode_status_response(xml: bytes | str) -> StatusResponse:
    """Parse a ``statusResponse`` element (§6.2), e.g. :attr:`Content.body` of a report.

    A ``reply`` without transID is accepted, as in the §5.1 examples.
    """
    root, _spans = _parse(xml.encode("utf-8") if isinstance(xml, str) else xml)
    if root.tag != "statusResponse":
        raise APEXError(501, f"unexpected {root.tag[:32]} element, not statusResponse")
    trans_id = _trans_id(root)
    _no_text(root)
    if not len(root):
        raise APEXError(501, "statusResponse needs at least one destination")
    if len(root) > MAX_RECIPIENTS:
        raise APEXError(553, f"more than {MAX_RECIPIENTS} destinations")
    destinations = []
    for destination in root:
        if destination.tag != "destination":
            raise APEXError(501, f"unexpected {destination.tag[:32]} element in statusResponse")
        identity = _identity(destination)
        _no_text(destination)
        if len(destination) != 1 or destination[0].tag != "reply":
            raise APEXError(501, "destination contains exactly one reply")
        reply = destination[0]
        _trans_id(reply, default=0)  # validated only: the response's transID is what counts
        destinations.append((identity, _code(reply), _text(reply)))
    return StatusResponse(trans_id, destinations)


def status_response_data(report: str | Endpoint, to: str, response: StatusResponse) -> Data:
    """The data a report service sends (§5.1, §6.2): from ``report`` (an identity, or
    a domain whose ``apex=report`` endpoint is meant) to ``to``, with the
    statusResponse inline as ``#Content``. It carries no statusRequest (§5.1).
    """
    if isinstance(report, Endpoint):
        sender = str(report)
    else:
        sender = report if "@" in report else str(report_endpoint(report))
    # encode_status_response writes well-formed XML (identities checked, diagnostics
    # escaped): Content.inline_xml would only parse it again, once per report.
    raw = _inline(encode_status_response(response), "Content")
    return Data(
        originator=Originator(sender),
        recipients=[Recipient(to)],
        content=Content("inline", raw, "Content"),
    )


# The answer nearly every reply is, the one imxp writes: known without parsing.
_OK_BODY = encode(OK()).body
