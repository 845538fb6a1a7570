"""The CPIM message format, ``message/cpim`` (RFC 3862), for instant messages over IMXP.

An instant message travels as the content of an APEX data whose media type is
``message/cpim`` (draft-klyne-imxp-message-service-01 §3; RFC 3862 §2, §2.1). The content
is a block of message headers, a blank line, and an encapsulated MIME object::

    From: Fred Flintstone <im:fred@a.test>      message headers (RFC 3862 §2.2, §3)
    To: <im:barney@b.test>
    DateTime: 2024-05-01T12:00:00+00:00
    Subject:;lang=en Dinner?
                                                blank line
    Content-Type: text/plain; charset="utf-8"   MIME content headers (§2.4)
                                                blank line
    Yabba dabba doo!                            content

Two syntaxes meet here, and each is handled by the tool that fits it:

* The message headers look like RFC 5322 headers but are not: one header per line and no
  folding, exactly one space after the colon, parameters such as ``;lang=fr`` between the
  colon and that space (§3.3), case-sensitive names with namespace prefixes
  (``MyFeatures.Name``, §3.4), control characters as backslash escapes (§2.3), UTF-8
  throughout, and addresses as ``<im:...>`` URIs. ``email`` would fold, re-case and
  decode them by the wrong rules, so they are written and read here by the syntax of
  §3.6.
* The encapsulated MIME object is plain MIME. Its headers are read and written with the
  standard library's ``email`` package (folding, RFC 2047 encoded words, Content-Type
  parameters), and its text is decoded by ``email`` too (charset, transfer encoding).
  Its body octets are kept exactly as they are.

Addresses map as draft-klyne §2.2 says: ``fred@a.test`` <-> ``im:fred@a.test``.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from urllib.parse import quote, unquote

from imxp.apex.address import AddressError, Endpoint

__all__ = [
    "MEDIA_TYPE",
    "CPIM_NS",
    "CORE_HEADERS",
    "CPIMError",
    "CPIMMessage",
    "build",
    "parse",
    "text_message",
    "to_im_uri",
    "from_im_uri",
]

#: The media type of the APEX content that carries a CPIM message (RFC 3862 §7.1).
MEDIA_TYPE = "message/cpim"
#: The namespace of the headers RFC 3862 §4 defines, the default one of message/cpim.
CPIM_NS = "urn:ietf:params:cpim-headers:"
#: The headers of that namespace (§4.1-§4.7); every one of them is understood here.
CORE_HEADERS = frozenset({"From", "To", "cc", "DateTime", "Subject", "NS", "Require"})

# §3.6: NAMECHAR is US-ASCII but CTLs, SEPARATORS and "."; TOKENCHAR adds "." and all of
# UCS above US-ASCII.
_NAME = r"[!#$%&'*+\-^_`|~A-Za-z0-9]+"
_HEADER_NAME = re.compile(rf"(?:({_NAME})\.)?({_NAME})")
_PARAM_NAME = re.compile(rf"({_NAME})=")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~A-Za-z0-9\u0080-\U0010ffff]+")
_CTL = re.compile(r"[\x00-\x1f\x7f]")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*\Z")  # RFC 3066 §2.1
# RFC 3862 §3.4: a namespace is a full absolute-URI, never a fragment reference.
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"#]*\Z")
# RFC 3339 §5.6 date-time; "T" and "Z" may be lower case (§5.6, NOTE).
_DATE_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)\Z"
)
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")
# RFC 5322 §3.6.8 field names, for the MIME content headers.
_MIME_NAME = re.compile(r"[!-9;-~]+\Z")
# §2.3: what a backslash introduces, and the sequences a generator must use (§2.3.1).
_UNESCAPE = {"\\": "\\", '"': '"', "'": "'", "b": "\b", "t": "\t", "n": "\n", "r": "\r"}
_ESCAPE = {"\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
# A local part's characters that stay as they are in an im: URI: the RFC 5322 atext
# that RFC 3986 allows in a path, so that fred/appl=im@a.test stays readable; "%", "?"
# and "#" would be read as URI syntax, everything else is percent-encoded UTF-8.
_URI_SAFE = "!$&'*+-/=_~."
# MIME headers with CRLF line ends; non-ASCII values become RFC 2047 encoded words.
_MIME = email.policy.SMTP
# The longest MIME parameter name written. email folds a long parameter into RFC 2231
# sections, "name*N*=charset''..." on lines of 78 (_MIME), and for a name that leaves no
# room there for one character of the value it loops for ever (CPython 3.11.2, 3.11.7): the
# sender's Content-Type would freeze whoever reads the text. No parameter in use has a
# name near this long.
_MAX_PARAMETER_NAME = 48


class CPIMError(ValueError):
    """A message/cpim content that cannot be read, with the reason."""


@dataclass
class CPIMMessage:
    """One CPIM message (RFC 3862).

    Addresses are APEX endpoints (``fred@a.test``); on the wire they are ``im:`` URIs
    (draft-klyne §2.2), with an optional display name each (``display_names``, endpoint ->
    Formal-name of §3.6). ``subject`` and ``subject_lang`` are the first Subject header
    and its language (§3.3, §4.5); further Subject headers, e.g. translations, are
    ``subject_translations`` as (language or "", text). ``namespaces`` maps each prefix
    declared by an NS header to its URI (§4.6; "" for a new default namespace);
    ``require`` lists the Require header's names (§4.7).

    ``extra`` holds every other message header in order, with its name as written
    (``MyFeatures.WackyMessageOption``), any parameters right after the name
    (``Note;lang=fr``), and its value as written: the escapes of §2.3 are not undone, as
    what they mean depends on the header's own syntax.

    ``content_type`` is the encapsulated object's Content-Type (§2.4), ``content_headers``
    its other MIME headers, ``body`` its octets.
    """

    sender: str
    to: list[str]
    cc: list[str] = field(default_factory=list)
    date: datetime = field(default_factory=lambda: datetime.now(UTC))
    subject: str | None = None
    namespaces: dict[str, str] = field(default_factory=dict)
    require: list[str] = field(default_factory=list)
    extra: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = 'text/plain; charset="utf-8"'
    body: bytes = b""
    content_headers: list[tuple[str, str]] = field(default_factory=list)
    subject_lang: str | None = None
    subject_translations: list[tuple[str, str]] = field(default_factory=list)
    display_names: dict[str, str] = field(default_factory=dict)

    def text(self) -> str | None:
        """The content as text when it is ``text/*``, else None.

        ``email`` undoes the transfer encoding and the charset; a text without a charset
        is read as UTF-8, which is what draft-klyne §3.2 asks endpoints to handle and a
        superset of MIME's default US-ASCII. Raises :class:`CPIMError` for a content
        that cannot be read so: a charset Python does not know or that is no text's
        (``idna``, ``undefined``: a sender chooses it), or content headers ``email``
        cannot read back.
        """
        try:
            entity = _content_entity(self.content_type, self.content_headers, self.body)
        except ValueError as e:
            raise CPIMError(str(e)) from None
        part = email.parser.BytesParser(policy=email.policy.default).parsebytes(entity)
        if part.get_content_maintype() != "text":
            return None
        try:
            if part.get_param("charset") is None:
                part.set_param("charset", "utf-8")
            return part.get_content()
        except (LookupError, UnicodeError):
            charset = part.get_param("charset")
            raise CPIMError(f"the text cannot be decoded as charset {charset!r}") from None


# -- addresses (draft-klyne §2.2) -------------------------------------------------------


def to_im_uri(endpoint: str | Endpoint) -> str:
    """``fred@a.test`` -> ``im:fred@a.test`` (draft-klyne §2.2, RFC 3860).

    The domain takes its normal form (RFC 3340 §2.2.1); local-part characters that a URI
    cannot carry as they are get percent-encoded. Raises
    :class:`~imxp.apex.address.AddressError` for a name that is no endpoint.
    """
    parsed = endpoint if isinstance(endpoint, Endpoint) else Endpoint.parse(endpoint)
    return f"im:{quote(parsed.local, safe=_URI_SAFE)}@{parsed.domain}"


def from_im_uri(uri: str) -> str:
    """``im:fred@a.test`` -> ``fred@a.test``; raises :class:`CPIMError` for anything else.

    Percent-encoding is undone before the endpoint is read, as RFC 3340 §2.2.1 asks of
    any transmission encoding; the scheme is case-insensitive (RFC 3986 §3.1).
    """
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() != "im":
        raise CPIMError(f"{uri[:80]!r} is not an im: URI")
    if "?" in rest or "#" in rest:
        raise CPIMError(f"{uri[:80]!r}: an im: URI for an address has no headers or fragment")
    local, at, domain = rest.rpartition("@")
    if not at:
        raise CPIMError(f"{uri[:80]!r} has no '@domain'")
    try:
        return str(
            Endpoint.parse(f"{unquote(local, errors='strict')}@{unquote(domain, errors='strict')}")
        )
    except UnicodeDecodeError:
        raise CPIMError(f"{uri[:80]!r}: percent-encoding is not UTF-8") from None
    except AddressError as e:
        raise CPIMError(f"{uri[:80]!r} is not an endpoint: {e}") from None


# -- escapes (§2.3) -------------------------------------------------------------------------


def _escape(text: str, quote_char: str | None = None) -> str:
    """``text`` with the escapes §2.3.1 requires (and no others)."""
    out = []
    for ch in text:
        if ch in _ESCAPE:
            out.append(_ESCAPE[ch])
        elif ch == quote_char:
            out.append("\\" + ch)
        elif _CTL.match(ch):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _unescape(text: str) -> str:
    """Undo §2.3's escapes as §2.3.1 says a processor should."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
        elif i + 1 == len(text):
            break  # an isolated backslash ending the header is ignored
        elif text[i + 1] == "u" and _HEX4.fullmatch(text, i + 2, i + 6):
            out.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
        else:
            # Unrecognised sequences stand for the character after the backslash.
            out.append(_UNESCAPE.get(text[i + 1], text[i + 1]))
            i += 2
    result = "".join(out)
    # \uxxxx names UCS-2 characters: anything beyond the BMP comes as a surrogate pair.
    try:
        return result.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise CPIMError("an escape names half of a surrogate pair") from None


def _quoted(text: str, start: int) -> tuple[str, int]:
    """The String (§3.6) starting at ``text[start]``, unescaped, and where it ends."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return _unescape(text[start + 1 : i]), i + 1
        else:
            i += 1
    raise CPIMError(f"unterminated quoted string in {text[:80]!r}")


# -- one header line (§3.6) ---------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    prefix: str | None
    name: str
    params: dict[str, str]
    params_text: str  # ";lang=fr" as written
    value: str  # as written

    @property
    def written_name(self) -> str:
        return self.name if self.prefix is None else f"{self.prefix}.{self.name}"


def _read_header(line: str) -> _Header:
    """``Header = Header-name ":" *( ";" Parameter ) SP Header-value`` (§3.6), and §2.2's
    rules for the line: no control characters, no white space at either end."""
    if _CTL.search(line):
        raise CPIMError(f"{line[:40]!r}: control characters must be escaped (§2.3)")
    if line.startswith((" ", "\t")):
        raise CPIMError(f"{line[:40]!r}: a header is one line, without folding (§2.2)")
    if line.endswith(" "):
        raise CPIMError(f"{line[:40]!r}: a header line may not end in white space (§2.2)")
    match = _HEADER_NAME.match(line)
    if match is None or not line.startswith(":", match.end()):
        raise CPIMError(f"{line[:40]!r} is not 'Name: value' (§3.6)")
    at = match.end() + 1
    params: dict[str, str] = {}
    while line.startswith(";", at):
        param = _PARAM_NAME.match(line, at + 1)
        if param is None:
            raise CPIMError(f"{line[:40]!r}: a parameter is 'name=value' (§3.6)")
        at = param.end()
        if line.startswith('"', at):
            value, at = _quoted(line, at)
        else:
            token = _TOKEN.match(line, at)
            if token is None:
                raise CPIMError(f"{line[:40]!r}: parameter {param.group(1)} has no value")
            value, at = token.group(), token.end()
        params[param.group(1)] = value
    if not line.startswith(" ", at):
        raise CPIMError(f"{line[:40]!r}: one space must follow the name and colon (§2.2)")
    lang = params.get("lang")
    if lang is not None and not _LANGUAGE_TAG.match(lang):
        raise CPIMError(f"{line[:40]!r}: {lang!r} is not a language tag (§3.3, RFC 3066)")
    params_text = line[match.end() + 1 : at]
    return _Header(match.group(1), match.group(2), params, params_text, line[at + 1 :])


def _address(value: str, what: str) -> tuple[str, str | None]:
    """``[ Formal-name ] "<" URI ">"`` (§4.1-§4.3): the endpoint and its display name."""
    name = None
    rest = value
    if value.startswith('"'):
        name, end = _quoted(value, 0)
        # The syntax puts "<" right after the String; the examples' habit of a space
        # between them is tolerated.
        rest = value[end + 1 :] if value.startswith(" ", end) else value[end:]
    else:
        lt = value.find("<")
        if lt > 0:
            before = value[:lt]
            if not before.endswith(" ") or not all(
                _TOKEN.fullmatch(t) for t in before[:-1].split(" ")
            ):
                raise CPIMError(
                    f"{what}: display name {before.strip()!r} must be words or a quoted "
                    "string (§3.6 Formal-name)"
                )
            name = before[:-1]
            rest = value[lt:]
    if not rest.startswith("<") or not rest.endswith(">") or ">" in rest[1:-1]:
        raise CPIMError(f"{what}: {value[:80]!r} is not [name] <im:...> (§4.1)")
    try:
        return from_im_uri(rest[1:-1]), name or None
    except CPIMError as e:
        raise CPIMError(f"{what}: {e}") from None


def _formal_name(name: str) -> str:
    """A display name as §3.6's Formal-name, followed by what separates it from "<"."""
    if all(_TOKEN.fullmatch(t) for t in name.split(" ")):
        return name + " "
    return '"' + _escape(name, '"') + '"'


def _namespace(value: str) -> tuple[str, str]:
    """``[ Name-prefix ] "<" URI ">"`` (§4.6): the prefix ("" for the default) and URI."""
    prefix, lt, rest = value.partition("<")
    prefix = prefix.removesuffix(" ")
    if not lt or not rest.endswith(">") or (prefix and not re.fullmatch(_NAME, prefix)):
        raise CPIMError(f"NS: {value[:80]!r} is not [prefix] <URI> (§4.6)")
    uri = rest[:-1]
    if not _ABSOLUTE_URI.match(uri):
        raise CPIMError(f"NS: {uri[:80]!r} is not an absolute URI without fragment (§3.4)")
    return prefix, uri


def _parse_datetime(value: str) -> datetime:
    """RFC 3339 §5.6 ``date-time`` (§4.4), as an aware datetime."""
    match = _DATE_TIME.match(value)
    if match is None:
        raise CPIMError(f"DateTime: {value[:40]!r} is not an RFC 3339 date-time (§4.4)")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        if offset in ("Z", "z"):
            zone = UTC
        else:
            sign = -1 if offset[0] == "-" else 1
            zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            # RFC 3339 allows a leap second, which datetime cannot hold: the second before.
            min(int(second), 59),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=zone,
        )
    except ValueError as e:
        raise CPIMError(f"DateTime: {value[:40]!r}: {e}") from None


def _format_datetime(date: datetime) -> str:
    offset = date.utcoffset()
    if offset is None:
        raise ValueError("the DateTime must be timezone-aware (RFC 3339 §4.4)")
    if offset % timedelta(minutes=1):
        # RFC 3339 offsets are whole minutes; a historic zone's seconds are not.
        date = date.astimezone(UTC)
    return date.isoformat()


# -- the encapsulated MIME object (§2.4) -----------------------------------------------------


def _content_entity(content_type: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """The MIME object: headers written by ``email``, blank line, ``body`` as it is."""
    part = EmailMessage(policy=_MIME)
    for name, value in [("Content-Type", content_type), *headers]:
        if not _MIME_NAME.match(name):
            raise ValueError(f"{name!r} is not a MIME header name")
        if name.lower() == "content-type" and "Content-Type" in part:
            raise ValueError("the content has one Content-Type, given as content_type")
        try:
            part[name] = value
        except ValueError:
            raise  # e.g. CR or LF in the value, which email refuses as wanted here
        except Exception as e:  # see _mime_headers
            raise ValueError(f"content header {name}: {value!r} cannot be read: {e!r}") from None
    for name, value in part.items():
        if value.defects:
            raise ValueError(f"content header {name}: {value.defects[0]}")
        for parameter in getattr(value, "params", ()):
            if len(parameter) > _MAX_PARAMETER_NAME:
                raise ValueError(
                    f"content header {name}: parameter name {parameter[:16]!r}... is longer "
                    f"than {_MAX_PARAMETER_NAME} characters"
                )
    head = b"".join(_MIME.fold_binary(name, value) for name, value in part.items())
    return head + b"\r\n" + body


def _mime_headers(text: str) -> list[tuple[str, str]]:
    """The MIME headers in ``text`` (a header block), each unfolded and decoded by email."""
    try:
        parsed = email.parser.HeaderParser(policy=email.policy.default).parsestr(text)
        if parsed.defects:
            raise CPIMError(f"the MIME content headers are malformed: {parsed.defects[0]!r}")
        headers = []
        for name, value in parsed.items():
            if value.defects:
                raise CPIMError(f"MIME content header {name}: {value.defects[0]}")
            headers.append((name, str(value)))
        return headers
    except CPIMError:
        raise
    except Exception as e:
        # email's parser records what it finds wrong as defects, but some hostile values
        # make it raise instead (an IndexError or HeaderParseError from deep inside
        # _header_value_parser, e.g. for "Content-Type: ;0*"). Either way: unreadable.
        raise CPIMError(f"the MIME content headers cannot be read: {e!r}"[:200]) from None


def _parse_content(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Content-Type, the other MIME headers, and the body of the encapsulated object."""
    if raw.startswith(b"\r\n"):
        raise CPIMError("the MIME content has no headers; it needs a Content-Type (§2.4)")
    head, blank, body = raw.partition(b"\r\n\r\n")
    if not blank:
        raise CPIMError("no blank line after the MIME content headers (§2)")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise CPIMError("the MIME content headers are not UTF-8") from None
    content_type = None
    others = []
    for name, value in _mime_headers(text + "\r\n\r\n"):
        if name.lower() != "content-type":
            others.append((name, value))
        elif content_type is not None:
            raise CPIMError("the MIME content has two Content-Type headers")
        else:
            content_type = value
    if content_type is None:
        raise CPIMError("the MIME content has no Content-Type (§2.4)")
    return content_type, others, body


# -- parse and build ---------------------------------------------------------------------------


def parse(raw: bytes, *, understood: Collection[tuple[str, str]] = ()) -> CPIMMessage:
    """Read the octets of a ``message/cpim`` content (RFC 3862 §2-§4).

    ``understood`` names extension headers (namespace URI, name) the caller implements:
    a Require header naming anything else, or a core header not defined by §4, is a
    mandatory feature not understood, and the message is refused (§3.5, §4.7). From, at
    least one To, and DateTime must be present (the headers an instant message over IMXP
    always carries, §6). Raises :class:`CPIMError` saying what is wrong, and nothing
    else.
    """
    head, blank, content = raw.partition(b"\r\n\r\n")
    if not blank or not head:
        raise CPIMError("no message headers followed by a blank line (§2)")
    try:
        lines = head.decode("utf-8").split("\r\n")
    except UnicodeDecodeError:
        raise CPIMError("the message headers are not UTF-8 (§2.2)") from None
    known = {(CPIM_NS, name) for name in CORE_HEADERS} | set(understood)
    namespaces: dict[str, str] = {}
    message = CPIMMessage(sender="", to=[])
    date = None

    def resolve(prefix: str | None, written: str) -> str:
        if prefix is None:
            return namespaces.get("", CPIM_NS)
        if prefix not in namespaces:
            raise CPIMError(f"{written}: prefix {prefix} is used before an NS header (§3.4)")
        return namespaces[prefix]

    for line in lines:
        header = _read_header(line)
        name = header.name
        if resolve(header.prefix, header.written_name) != CPIM_NS or name not in CORE_HEADERS:
            message.extra.append((header.written_name + header.params_text, header.value))
        elif name in ("From", "To", "cc"):
            endpoint, display = _address(header.value, name)
            if name == "From":
                if message.sender:
                    raise CPIMError("more than one From header (§4.1)")
                message.sender = endpoint
            else:
                (message.to if name == "To" else message.cc).append(endpoint)
            if display is not None:
                message.display_names[endpoint] = display
        elif name == "DateTime":
            if date is not None:
                raise CPIMError("more than one DateTime header (§4.4)")
            date = _parse_datetime(header.value)
        elif name == "Subject":
            lang = header.params.get("lang")
            if message.subject is None:
                message.subject, message.subject_lang = _unescape(header.value), lang
            else:
                message.subject_translations.append((lang or "", _unescape(header.value)))
        elif name == "NS":
            prefix, uri = _namespace(header.value)
            if prefix in namespaces:
                raise CPIMError(f"NS: prefix {prefix or '(default)'} is declared twice")
            namespaces[prefix] = uri
        else:  # Require
            for required in header.value.split(","):
                required = required.strip(" ")
                match = _HEADER_NAME.fullmatch(required)
                if match is None:
                    raise CPIMError(f"Require: {required[:40]!r} is not a header name (§4.7)")
                if (resolve(match.group(1), required), match.group(2)) not in known:
                    raise CPIMError(f"required header not understood: {required} (§3.5)")
                message.require.append(required)
    if not message.sender:
        raise CPIMError("no From header: who sent the message (§4.1)")
    if not message.to:
        raise CPIMError("no To header: whom the message is for (§4.2)")
    if date is None:
        raise CPIMError("no DateTime header: when the message was sent (§4.4)")
    message.date = date
    message.namespaces = namespaces
    message.content_type, message.content_headers, message.body = _parse_content(content)
    return message


def build(message: CPIMMessage) -> bytes:
    """The octets of ``message`` as a ``message/cpim`` content (RFC 3862 §2-§4).

    Headers go in this order: From, To, cc, DateTime, Subject(s), the NS headers with a
    prefix, Require, an NS header for a new default namespace, then ``extra`` as given
    (a prefix is declared before its use, §3.4). The APEX
    content carrying the result has the media type :data:`MEDIA_TYPE` (§2.1). Raises
    ValueError for what cannot be written: a naive date, an address that is no endpoint,
    a value ending in a space (§2.2 forbids it and §2.3 has no escape for it), an
    undeclared prefix, a malformed content header.
    """
    names = message.display_names

    def address(endpoint: str) -> str:
        name = names.get(endpoint)
        return f"{_formal_name(name) if name else ''}<{to_im_uri(endpoint)}>"

    lines = [f"From: {address(message.sender)}"]
    lines += [f"To: {address(endpoint)}" for endpoint in message.to]
    lines += [f"cc: {address(endpoint)}" for endpoint in message.cc]
    lines.append(f"DateTime: {_format_datetime(message.date)}")
    subjects = list(message.subject_translations)
    if message.subject is not None:
        subjects.insert(0, (message.subject_lang or "", message.subject))
    elif subjects:
        raise ValueError("subject_translations without a subject")
    lines += [
        f"Subject:{f';lang={lang}' if lang else ''} {_escape(text)}" for lang, text in subjects
    ]
    namespaces = message.namespaces
    for prefix, uri in namespaces.items():
        if prefix and not re.fullmatch(_NAME, prefix):
            raise ValueError(f"NS: {prefix!r} is not a prefix (§3.6 Name)")
        if not _ABSOLUTE_URI.match(uri):
            raise ValueError(f"NS: {uri!r} is not an absolute URI without fragment (§3.4)")
    # Prefixed declarations come before Require, which may name their headers (§3.4); a
    # new default namespace comes after it, since it changes what an unprefixed name
    # means - including "Require" itself.
    lines += [f"NS: {prefix} <{uri}>" for prefix, uri in namespaces.items() if prefix]
    for required in message.require:
        match = _HEADER_NAME.fullmatch(required)
        if match is None:
            raise ValueError(f"Require: {required!r} is not a header name (§4.7)")
        if match.group(1) is not None and match.group(1) not in namespaces:
            raise ValueError(f"Require: prefix {match.group(1)} has no NS entry")
    if message.require:
        lines.append("Require: " + ",".join(message.require))
    if "" in namespaces:
        lines.append(f"NS: <{namespaces['']}>")
    for name, value in message.extra:
        written, _semicolon, params = name.partition(";")
        match = _HEADER_NAME.fullmatch(written)
        if match is None:
            raise ValueError(f"{name!r} is not a header name (§3.6)")
        prefix = match.group(1)
        if prefix is not None and prefix not in namespaces:
            raise ValueError(f"{written}: prefix {prefix} has no NS entry")
        namespace = namespaces.get(prefix or "", CPIM_NS)
        if namespace == CPIM_NS and match.group(2) in CORE_HEADERS:
            raise ValueError(f"{written} has a field of its own; it cannot be an extra header")
        lines.append(f"{written}:{';' + params if params else ''} {value}")
    for line in lines:
        try:
            _read_header(line)
        except CPIMError as e:
            raise ValueError(str(e)) from None
    head = "".join(line + "\r\n" for line in lines).encode("utf-8")
    entity = _content_entity(message.content_type, message.content_headers, message.body)
    return head + b"\r\n" + entity


def text_message(
    sender: str,
    to: Iterable[str],
    text: str,
    *,
    cc: Iterable[str] = (),
    subject: str | None = None,
    date: datetime | None = None,
) -> CPIMMessage:
    """A plain-text instant message: ``text/plain; charset=utf-8`` (draft-klyne §3.2),
    dated ``date`` or now."""
    return CPIMMessage(
        sender=sender,
        to=list(to),
        cc=list(cc),
        date=date or datetime.now(UTC),
        subject=subject,
        content_type='text/plain; charset="utf-8"',
        body=text.encode("utf-8"),
    )
