"""BEEP message payloads as MIME entities (RFC 3080 §2.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imxp.beep.message import (
    DEFAULT_CONTENT_TYPE,
    DEFAULT_TRANSFER_ENCODING,
    Message,
    MessageError,
    entity_headers,
)

SETTINGS = settings(max_examples=300, deadline=None)


# --------------------------------------------------------------------------- defaults


def test_rfc3080_defaults_when_no_headers() -> None:
    # §2.2: no entity headers -> application/octet-stream, binary.
    message = Message.from_payload(b"\r\n\x00\xffbody")
    assert message.headers == []
    assert message.body == b"\x00\xffbody"
    assert message.content_type == DEFAULT_CONTENT_TYPE == "application/octet-stream"
    assert message.transfer_encoding == DEFAULT_TRANSFER_ENCODING == "binary"


def test_defaults_apply_to_each_missing_header() -> None:
    # "If none, or only some, of the entity-headers are present": each missing one defaults.
    only_type = Message.from_payload(b"Content-Type: text/plain\r\n\r\nhi")
    assert only_type.content_type == "text/plain"
    assert only_type.transfer_encoding == "binary"
    only_cte = Message.from_payload(b"Content-Transfer-Encoding: base64\r\n\r\naGk=")
    assert only_cte.content_type == "application/octet-stream"
    assert only_cte.transfer_encoding == "base64"
    assert only_cte.body == b"aGk="  # never decoded here


def test_new_message_defaults() -> None:
    message = Message()
    assert message.body == b""
    assert message.content_type == "application/octet-stream"
    assert message.transfer_encoding == "binary"
    assert message.to_payload() == b"\r\n"


# --------------------------------------------------------------------------- headers


def test_headers_are_case_insensitive() -> None:
    message = Message.from_payload(
        b"CONTENT-TYPE: Application/BEEP+XML; charset=UTF-8\r\n"
        b"content-transfer-encoding:  Binary \r\n"
        b"X-Thing: Kept As Is\r\n"
        b"\r\n<ok />"
    )
    assert message.content_type == "application/beep+xml"
    assert message.transfer_encoding == "binary"
    assert message.header("Content-Type") == "Application/BEEP+XML; charset=UTF-8"
    assert message.header("content-type") == message.header("cOnTeNt-TyPe")
    assert message.header("x-thing") == "Kept As Is"
    assert message.header("X-Missing") is None
    assert message.header("X-Missing", "fallback") == "fallback"
    assert message.body == b"<ok />"


def test_content_type_parameters_are_dropped_from_content_type() -> None:
    message = Message(b"", content_type="text/plain ; charset=us-ascii")
    assert message.content_type == "text/plain"


def test_header_order_is_kept() -> None:
    payload = b"B: 2\r\nA: 1\r\nC: 3\r\n\r\n"
    assert Message.from_payload(payload).headers == [("B", "2"), ("A", "1"), ("C", "3")]


def test_first_of_repeated_headers_wins() -> None:
    message = Message.from_payload(b"Content-Type: a/b\r\ncontent-type: c/d\r\n\r\n")
    assert message.content_type == "a/b"


def test_folded_headers_are_unfolded() -> None:
    message = Message.from_payload(
        b"Content-Type: application/beep+xml;\r\n"
        b"   charset=utf-8\r\n"
        b"X-Long: one\r\n"
        b"\ttwo\r\n"
        b" three\r\n"
        b"\r\nbody"
    )
    assert message.header("content-type") == "application/beep+xml; charset=utf-8"
    assert message.content_type == "application/beep+xml"
    assert message.header("x-long") == "one two three"
    assert message.body == b"body"


def test_leading_crlf_means_no_headers() -> None:
    # The body may itself look like headers: it is still body.
    payload = b"\r\nContent-Type: text/plain\r\n\r\nhello"
    message = Message.from_payload(payload)
    assert message.headers == []
    assert message.content_type == "application/octet-stream"
    assert message.body == b"Content-Type: text/plain\r\n\r\nhello"
    assert message.to_payload() == payload


def test_body_keeps_blank_lines_and_binary() -> None:
    payload = b"Content-Type: a/b\r\n\r\n\r\n\r\n\x00END\r\n"
    message = Message.from_payload(payload)
    assert message.body == b"\r\n\r\n\x00END\r\n"
    assert message.to_payload() == payload


def test_to_payload_exact_bytes() -> None:
    message = Message(b"<ok />", "application/beep+xml")
    assert message.to_payload() == b"Content-Type: application/beep+xml\r\n\r\n<ok />"
    assert Message(b"x").to_payload() == b"\r\nx"


def test_set_header_replaces_case_insensitively() -> None:
    message = Message(b"", headers=[("content-type", "a/b"), ("X-Other", "1")])
    message.set_header("Content-Type", "c/d")
    assert message.headers == [("X-Other", "1"), ("Content-Type", "c/d")]
    assert message.content_type == "c/d"


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "\r\n"])
def test_set_header_refuses_cr_and_lf(value: str) -> None:
    message = Message(b"")
    with pytest.raises(MessageError):
        message.set_header("X-Test", value)
    with pytest.raises(MessageError):
        Message(b"", content_type=value)
    assert message.headers == []


def test_equality() -> None:
    assert Message(b"a", "x/y") == Message(b"a", "x/y")
    assert Message(b"a", "x/y") != Message(b"b", "x/y")
    assert Message(b"a", "x/y") != Message(b"a", "x/z")
    assert Message(b"a") != b"a"
    assert "application/octet-stream" in repr(Message(b"abc"))


# --------------------------------------------------------------------------- poorly formed

POORLY_FORMED: dict[str, bytes] = {
    "no blank line": b"Content-Type: text/plain\r\nbody",
    "headers but no blank line at all": b"Content-Type: text/plain\r\n",
    "blank line with bare LFs": b"Content-Type: text/plain\n\nbody",
    "line without a colon": b"Content-Type text/plain\r\n\r\n",
    "empty name": b": text/plain\r\n\r\n",
    "space before the colon": b"Content-Type : text/plain\r\n\r\n",
    "continuation before any header": b" folded: value\r\n\r\n",
    "tab continuation first": b"\tfolded\r\nContent-Type: a/b\r\n\r\n",
    "control character in name": b"Content\x01Type: a/b\r\n\r\n",
    "not UTF-8": b"Content-Type: \xff\xfe\r\n\r\n",
    "blank line too late": b"X-Big: " + b"a" * 20000 + b"\r\n\r\nbody",
    "second line without a colon": b"A: 1\r\nbad line\r\n\r\n",
}


@pytest.mark.parametrize("payload", POORLY_FORMED.values(), ids=POORLY_FORMED.keys())
def test_poorly_formed_header_block_raises(payload: bytes) -> None:
    with pytest.raises(MessageError):
        Message.from_payload(payload)


# --------------------------------------------------------------------------- round trips

_name_chars = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":")
header_names = st.text(_name_chars, min_size=1, max_size=20)
# Values as the parser returns them: no CR/LF, no surrounding whitespace.
header_values = st.text(
    st.characters(exclude_categories=("Cs", "Cc")),
    max_size=40,
).map(str.strip)


@SETTINGS
@given(st.lists(st.tuples(header_names, header_values), max_size=6), st.binary(max_size=200))
def test_round_trip(headers: list[tuple[str, str]], body: bytes) -> None:
    message = Message(body, headers=headers)
    again = Message.from_payload(message.to_payload())
    assert again == message
    assert again.to_payload() == message.to_payload()


@SETTINGS
@given(st.binary(max_size=300))
def test_junk_gives_a_message_or_message_error(junk: bytes) -> None:
    try:
        message = Message.from_payload(junk)
    except MessageError:
        return
    assert isinstance(message.content_type, str)
    assert message.body in junk


def test_entity_headers_name_the_first_of_each_header_as_message_does() -> None:
    payload = b"Content-ID: <a@x>\r\ncontent-id: <b@x>\r\nX-Y:  z \r\n\r\nbody"
    headers, at = entity_headers(payload)
    assert headers == {"content-id": "<a@x>", "x-y": "z"}
    assert payload[at:] == b"body"
    message = Message.from_payload(payload)
    assert message.header("Content-ID") == headers["content-id"]
    assert entity_headers(b"\r\nbody") == ({}, 2)
    with pytest.raises(MessageError, match="no blank line"):
        entity_headers(b"Content-ID: <a@x>\r\nbody")
    with pytest.raises(MessageError, match="poorly formed header"):
        entity_headers(b"no colon\r\n\r\nbody")
