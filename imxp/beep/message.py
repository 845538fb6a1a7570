"""BEEP message payloads as MIME entities (RFC 3080 §2.2).

A payload is optional entity headers, a blank line, then the body. Missing
headers take the RFC's defaults: ``Content-Type: application/octet-stream``
and ``Content-Transfer-Encoding: binary``. Bodies are bytes and are never
re-encoded here: a profile that receives a base64 body decodes it itself.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "DEFAULT_TRANSFER_ENCODING",
    "MAX_HEADER_BLOCK",
    "Message",
    "MessageError",
    "entity_headers",
    "media_type",
]

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_TRANSFER_ENCODING = "binary"
#: Where the blank line ending a payload's entity headers must be by.
MAX_HEADER_BLOCK = 16384
# Most payloads of a session carry the same few header blocks; parsing and
# serialising each once saves a measurable share of a round trip. Bounded, and
# only for short blocks, so a peer cannot grow it.
_CACHE_LIMIT = 256
_CACHEABLE = 512
_parsed: dict[bytes, tuple[tuple[str, str], ...]] = {}
_serialised: dict[tuple[tuple[str, str], ...], bytes] = {}


class MessageError(ValueError):
    """The payload's entity headers are poorly formed."""


class Message:
    """A MIME entity: ordered ``(name, value)`` headers and a body of bytes."""

    __slots__ = ("body", "headers")

    def __init__(
        self,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.body = body
        self.headers: list[tuple[str, str]] = list(headers)
        if content_type is not None:
            if self.headers:
                self.set_header("Content-Type", content_type)
            else:
                _check_value("Content-Type", content_type)
                self.headers.append(("Content-Type", content_type))

    def header(self, name: str, default: str | None = None) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            # Headers are mostly written as they are asked for: no lower() then.
            if key == name or key.lower() == lowered:
                return value
        return default

    def set_header(self, name: str, value: str) -> None:
        _check_value(name, value)
        lowered = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != lowered]
        self.headers.append((name, value))

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower-cased, with the RFC 3080 §2.2 default."""
        return media_type(self.header("Content-Type"))

    @property
    def transfer_encoding(self) -> str:
        raw = self.header("Content-Transfer-Encoding")
        return DEFAULT_TRANSFER_ENCODING if raw is None else raw.strip().lower()

    def to_payload(self) -> bytes:
        if not self.headers:
            return b"\r\n" + self.body
        key = tuple(self.headers)
        block = _serialised.get(key)
        if block is None:
            block = "".join(f"{k}: {v}\r\n" for k, v in key).encode("utf-8") + b"\r\n"
            if len(block) <= _CACHEABLE:
                if len(_serialised) >= _CACHE_LIMIT:
                    _serialised.clear()
                _serialised[key] = block
        return block + self.body

    @classmethod
    def from_payload(cls, payload: bytes) -> Message:
        if payload.startswith(b"\r\n"):
            return cls(payload[2:])
        end = _header_block_end(payload)
        raw = payload[:end]
        headers = _parsed.get(raw)
        if headers is None:
            headers = _parse_headers(raw)
            if end <= _CACHEABLE:
                if len(_parsed) >= _CACHE_LIMIT:
                    _parsed.clear()
                _parsed[raw] = headers
        message = cls.__new__(cls)
        message.body = payload[end + 4 :]
        message.headers = list(headers)
        return message

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.body == other.body and self.headers == other.headers

    def __repr__(self) -> str:
        return f"<Message {self.content_type} {len(self.body)} octets>"


def entity_headers(payload: bytes) -> tuple[dict[str, str], int]:
    """The headers of ``payload`` by lower-cased name (the first of each name, as
    :meth:`Message.header` finds it) and where its body starts.

    For entities read once and dropped, such as the body parts of a multipart: no
    :class:`Message`, no copy of the body, and none of the header cache, which their
    unique Content-IDs would only churn.
    """
    if payload.startswith(b"\r\n"):
        return {}, 2
    end = _header_block_end(payload)
    named: dict[str, str] = {}
    for name, value in _parse_headers(payload[:end]):
        named.setdefault(name.lower(), value)
    return named, end + 4


def _header_block_end(payload: bytes) -> int:
    end = payload.find(b"\r\n\r\n", 0, MAX_HEADER_BLOCK)
    if end < 0:
        raise MessageError("payload has no blank line ending its entity headers")
    return end


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value, without parameters and lower-cased;
    RFC 3080 §2.2's default for a missing header."""
    if content_type is None:
        return DEFAULT_CONTENT_TYPE
    return content_type.split(";", 1)[0].strip().lower()


def _check_value(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise MessageError(f"header {name} may not contain CR or LF")


def _parse_headers(raw: bytes) -> tuple[tuple[str, str], ...]:
    try:
        block = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("entity headers are not UTF-8") from None
    headers: list[tuple[str, str]] = []
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t"):
            if not headers:
                raise MessageError("continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or not name.isprintable():
            raise MessageError(f"poorly formed header line {line[:40]!r}")
        headers.append((name, value.strip()))
    return tuple(headers)
