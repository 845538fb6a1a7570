"""A hardened XML parser for protocol elements.

Protocol payloads never need a DTD, so any document type declaration is
refused outright: that rules out entity expansion ("billion laughs"),
external entities and external DTD fetches in one rule. Size and nesting
depth are bounded too. The result is an :class:`xml.etree.ElementTree.Element`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import NoReturn
from xml.etree.ElementTree import Element, TreeBuilder
from xml.parsers import expat

__all__ = ["Span", "XMLError", "parse"]

DEFAULT_MAX_SIZE = 65536
DEFAULT_MAX_DEPTH = 32

#: Where an element lies in the document: the start of its start tag, the end of its
#: start tag, the start of its end tag, the end of its end tag (octet offsets). For an
#: empty-element tag the last three are equal.
Span = tuple[int, int, int, int]

# A start tag that expat has already found well formed: attribute values may contain
# '>' but never their own quote character.
TAG = re.compile(rb"<[^>\"']*(?:(?:\"[^\"]*\"|'[^']*')[^>\"']*)*>")


class XMLError(ValueError):
    """The payload is not acceptable XML (poorly formed, too big, too deep, or has a DTD)."""


def parse(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    utf8_only: bool = False,
    spans_of: Collection[str] = (),
    spans: dict[Element, Span] | None = None,
) -> Element:
    """Parse ``data`` into an element tree, refusing anything hostile.

    ``utf8_only`` refuses a declaration of any other encoding (a protocol that
    fixes UTF-8 also keeps expat from looking up whatever codec a peer names).
    For callers that keep parts of the document verbatim, the :data:`Span` of
    each element whose tag is in ``spans_of`` goes into ``spans``.
    """
    if spans_of and spans is None:
        raise TypeError("spans_of needs a spans dict to fill")
    if len(data) > max_size:
        raise XMLError(f"XML of {len(data)} octets exceeds the limit of {max_size}")
    if utf8_only and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        # expat lets a UTF-16 byte-order mark override the encoding it was given.
        raise XMLError("XML is UTF-16, not UTF-8")
    parser = expat.ParserCreate("UTF-8" if utf8_only else None)
    builder = TreeBuilder()
    depth = 0
    # The elements whose spans are wanted that are open, with where their start tags lie.
    opened: list[tuple[Element, int, int]] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > max_depth:
            raise XMLError(f"XML nested deeper than {max_depth}")
        element = builder.start(tag, attrs)
        if tag in spans_of:
            at = parser.CurrentByteIndex
            tag_match = TAG.match(data, at)
            assert tag_match is not None  # expat has just accepted this tag
            opened.append((element, at, tag_match.end()))

    def end(tag: str) -> None:
        nonlocal depth
        depth -= 1
        element = builder.end(tag)
        if opened and opened[-1][0] is element:
            _element, at, inner = opened.pop()
            assert spans is not None  # checked on entry
            if data[inner - 2 : inner] == b"/>":
                spans[element] = (at, inner, inner, inner)
            else:
                close = parser.CurrentByteIndex
                spans[element] = (at, inner, close, data.index(b">", close) + 1)

    def declaration(_version: str, encoding: str | None, _standalone: int) -> None:
        if encoding is not None and encoding.lower() != "utf-8":
            raise XMLError(f"the XML must be UTF-8, not {encoding[:32]}")

    def refuse(*_args: object) -> NoReturn:
        raise XMLError("document type declarations and entities are not allowed")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    if utf8_only:
        parser.XmlDeclHandler = declaration
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
        return builder.close()
    except XMLError:
        raise
    except expat.ExpatError as e:
        raise XMLError(f"poorly formed XML: {e}") from None
    except (LookupError, ValueError):
        # An XML declaration naming an encoding that Python does not know, or
        # one that is not a single-byte text codec ('rot13', 'utf-7', 'idna'):
        # pyexpat's unknown-encoding hook lets the codec's exception escape.
        raise XMLError("poorly formed XML: unsupported encoding") from None
    except (AssertionError, IndexError):
        # TreeBuilder.close() asserts on an empty document.
        raise XMLError("poorly formed XML: no root element") from None
    finally:
        # start and end refer to the parser, which refers to them: left so, the parser,
        # the builder and the whole tree would wait for the cyclic collector, which
        # then spent 6% of a busy relay's time on them.
        parser.StartElementHandler = parser.EndElementHandler = None
