"""message/cpim (RFC 3862) built and parsed, and the im: URI mapping of draft-klyne §2.2."""

from __future__ import annotations

import string
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imxp.apex import wire
from imxp.apex.address import Endpoint
from imxp.client import Incoming
from imxp.e2e import cpim
from imxp.e2e.cpim import CPIMError, CPIMMessage, build, from_im_uri, parse, to_im_uri

CRLF = "\r\n"

# RFC 3862 §5.1, "An Example Message/CPIM Message": the h:, s: and e: lines (the m: line
# is the APEX content's media type).
RFC_EXAMPLE = CRLF.join(
    [
        "From: MR SANDERS <im:piglet@100akerwood.com>",
        "To: Depressed Donkey <im:eeyore@100akerwood.com>",
        "DateTime: 2000-12-13T13:40:00-08:00",
        "Subject: the weather will be fine today",
        "Subject:;lang=fr beau temps prevu pour aujourd'hui",
        "NS: MyFeatures <mid:MessageFeatures@id.foo.com>",
        "Require: MyFeatures.VitalMessageOption",
        "MyFeatures.VitalMessageOption: Confirmation-requested",
        "MyFeatures.WackyMessageOption: Use-silly-font",
        "",
        "Content-type: text/xml; charset=utf-8",
        "Content-ID: <1234567890@foo.com>",
        "",
        "<body>",
        "Here is the text of my message.",
        "</body>",
    ]
).encode("utf-8")
MY_FEATURES = "mid:MessageFeatures@id.foo.com"
VITAL = (MY_FEATURES, "VitalMessageOption")
PIGLET = "piglet@100akerwood.com"
EEYORE = "eeyore@100akerwood.com"


def message(*headers: str, content: str = "Content-Type: text/plain\r\n\r\nhi") -> bytes:
    """Message headers (From, To and DateTime first unless given), then ``content``."""
    lines = list(headers)
    names = {line.partition(":")[0] for line in lines}
    defaults = {
        "From": "From: <im:fred@a.test>",
        "To": "To: <im:barney@b.test>",
        "DateTime": "DateTime: 2024-05-01T12:00:00Z",
    }
    lines = [line for name, line in defaults.items() if name not in names] + lines
    return (CRLF.join(lines) + CRLF + CRLF + content).encode("utf-8")


# -- the RFC's examples ----------------------------------------------------------------


def test_rfc_example_is_refused_without_its_vital_option() -> None:
    """§3.5: the example requires MyFeatures.VitalMessageOption, which nobody here
    implements."""
    with pytest.raises(CPIMError, match="required header not understood"):
        parse(RFC_EXAMPLE)


def test_rfc_example_parsed() -> None:
    parsed = parse(RFC_EXAMPLE, understood=[VITAL])

    assert parsed.sender == PIGLET
    assert parsed.to == [EEYORE]
    assert parsed.cc == []
    assert parsed.display_names == {PIGLET: "MR SANDERS", EEYORE: "Depressed Donkey"}
    assert parsed.date == datetime(2000, 12, 13, 21, 40, tzinfo=UTC)
    assert parsed.date.utcoffset() == timedelta(hours=-8)
    assert parsed.subject == "the weather will be fine today"
    assert parsed.subject_lang is None
    assert parsed.subject_translations == [("fr", "beau temps prevu pour aujourd'hui")]
    assert parsed.namespaces == {"MyFeatures": MY_FEATURES}
    assert parsed.require == ["MyFeatures.VitalMessageOption"]
    assert parsed.extra == [
        ("MyFeatures.VitalMessageOption", "Confirmation-requested"),
        ("MyFeatures.WackyMessageOption", "Use-silly-font"),
    ]
    assert parsed.content_type == 'text/xml; charset="utf-8"'  # as email writes it
    assert parsed.content_headers == [("Content-ID", "<1234567890@foo.com>")]
    assert parsed.body == b"<body>\r\nHere is the text of my message.\r\n</body>"
    assert parsed.text() == "<body>\r\nHere is the text of my message.\r\n</body>"


def test_rfc_example_built_again() -> None:
    """Our message headers come out as the RFC writes them, line for line; the MIME
    headers as email writes them, meaning the same."""
    built = build(parse(RFC_EXAMPLE, understood=[VITAL]))

    head, _, content = built.partition(b"\r\n\r\n")
    assert head == RFC_EXAMPLE.partition(b"\r\n\r\n")[0]
    assert content == (
        b'Content-Type: text/xml; charset="utf-8"\r\n'
        b"Content-ID: <1234567890@foo.com>\r\n"
        b"\r\n<body>\r\nHere is the text of my message.\r\n</body>"
    )
    assert parse(built, understood=[VITAL]) == parse(RFC_EXAMPLE, understood=[VITAL])


@pytest.mark.parametrize(
    ("line", "endpoint", "name"),
    [
        # §2.2, §4.1-§4.3
        ("From: <im:piglet@100akerwood.com>", PIGLET, None),
        ("From: Winnie the Pooh <im:pooh@100akerwood.com>", "pooh@100akerwood.com", None),
        ("To: Pooh Bear <im:pooh@100akerwood.com>", "pooh@100akerwood.com", "Pooh Bear"),
        ("cc: <im:tigger@100akerwood.com>", "tigger@100akerwood.com", None),
        ('cc: "Tigger (bouncy)"<im:tigger@100akerwood.com>', "tigger@100akerwood.com", None),
    ],
)
def test_rfc_address_examples(line: str, endpoint: str, name: str | None) -> None:
    parsed = parse(message(line))
    header = line.partition(":")[0]
    if header == "From":
        assert parsed.sender == endpoint
    elif header == "To":
        assert parsed.to == [endpoint]
    else:
        assert parsed.cc == [endpoint]
    display = line.partition(": ")[2].rpartition("<")[0].strip().strip('"')
    assert parsed.display_names.get(endpoint) == (display or None)
    if name is not None:
        assert parsed.display_names[endpoint] == name


def test_rfc_language_tagged_subject() -> None:
    """§3.3, §4.5."""
    parsed = parse(message("Subject:;lang=en Eeyore's feeling very depressed today"))
    assert parsed.subject == "Eeyore's feeling very depressed today"
    assert parsed.subject_lang == "en"
    assert b"Subject:;lang=en Eeyore's feeling" in build(parsed)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2001-02-02T10:48:54-05:00", datetime(2001, 2, 2, 15, 48, 54, tzinfo=UTC)),  # §2.2
        ("2001-02-01T12:16:49-05:00", datetime(2001, 2, 1, 17, 16, 49, tzinfo=UTC)),  # §4.4
        ("2024-05-01t12:00:00z", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # RFC 3339 §5.6 NOTE
        ("2024-05-01T12:00:00.5+01:30", datetime(2024, 5, 1, 10, 30, 0, 500000, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),  # leap
        ("2024-05-01T12:00:00-00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # RFC 3339 §4.3
    ],
)
def test_datetime_forms(value: str, expected: datetime) -> None:
    assert parse(message(f"DateTime: {value}")).date == expected


# -- namespaces and Require (§3.4, §3.5, §4.6, §4.7) ----------------------------------------

ACME = "http://id.acme.widgets/wily-headers/"


@pytest.mark.parametrize(
    "headers",
    [
        # §3.4: three ways of saying the same thing.
        ["NS: acme <http://id.acme.widgets/wily-headers/>", "acme.runner-trap: set"],
        ["NS: widget <http://id.acme.widgets/wily-headers/>", "widget.runner-trap: set"],
        ["NS: <http://id.acme.widgets/wily-headers/>", "runner-trap: set"],
    ],
)
def test_namespace_prefixes(headers: list[str]) -> None:
    parsed = parse(message(*headers))
    assert list(parsed.namespaces.values()) == [ACME]
    assert parsed.extra == [(headers[1].partition(":")[0], "set")]
    assert parse(build(parsed)) == parsed


@pytest.mark.parametrize("prefix", ["acme", "widget"])
def test_require_resolves_the_prefix(prefix: str) -> None:
    raw = message(f"NS: {prefix} <{ACME}>", f"Require: {prefix}.runner-trap")
    with pytest.raises(CPIMError, match=f"required header not understood: {prefix}.runner"):
        parse(raw)
    parsed = parse(raw, understood=[(ACME, "runner-trap")])
    assert parsed.require == [f"{prefix}.runner-trap"]
    assert parse(build(parsed), understood=[(ACME, "runner-trap")]) == parsed


def test_after_a_new_default_namespace_require_is_that_namespaces_header() -> None:
    """§3.4 taken at its word: an unprefixed name, Require's own included, now belongs to
    the new default namespace; build therefore writes Require before such an NS."""
    parsed = parse(message(f"NS: <{ACME}>", "Require: runner-trap"))
    assert parsed.require == []
    assert parsed.extra == [("Require", "runner-trap")]
    assert parse(build(parsed)) == parsed


def test_require_names_core_headers_and_lists() -> None:
    """Every header of §4 is understood; a list takes commas (§3.5)."""
    parsed = parse(message("Require: Subject,DateTime, cc", "Subject: hello"))
    assert parsed.require == ["Subject", "DateTime", "cc"]
    assert b"Require: Subject,DateTime,cc\r\n" in build(parsed)


def test_require_of_a_feature_that_is_no_header() -> None:
    """§3.5: Require may name behaviour, e.g. Locale.MustRenderKanji."""
    raw = message("NS: Locale <urn:example:locale>", "Require: Locale.MustRenderKanji")
    with pytest.raises(CPIMError, match="required header not understood"):
        parse(raw)
    assert parse(raw, understood=[("urn:example:locale", "MustRenderKanji")]).extra == []


def test_core_headers_under_a_prefix_for_their_namespace() -> None:
    parsed = parse(message("NS: cpim <urn:ietf:params:cpim-headers:>", "cpim.Subject: hi"))
    assert parsed.subject == "hi"
    assert parsed.extra == []


def test_a_new_default_namespace_takes_unprefixed_names_away_from_cpim() -> None:
    parsed = parse(message("NS: <http://example.com/ns>", "Subject: not ours"))
    assert parsed.subject is None
    assert parsed.extra == [("Subject", "not ours")]
    assert parse(build(parsed)) == parsed


def test_extension_header_parameters_and_escapes_are_kept_as_written() -> None:
    parsed = parse(message("NS: x <urn:example:x>", 'x.Note:;lang=fr;q="a b" quoted \\"x\\"'))
    assert parsed.extra == [('x.Note;lang=fr;q="a b"', 'quoted \\"x\\"')]
    assert parse(build(parsed)) == parsed


# -- escapes (§2.3) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("tab\\there", "tab\there"),
        ("a\\\\b", "a\\b"),
        ("\\u0041\\u00e9", "Aé"),
        ("\\ud83d\\ude00", "😀"),  # UCS-2 escapes of a surrogate pair
        ("\\q", "q"),  # unrecognised: the character after the backslash
        ("end\\", "end"),  # an isolated final backslash is ignored
        ("\\'\\\"", "'\""),
        ("\\b\\n\\r", "\b\n\r"),
    ],
)
def test_subject_escapes_read(written: str, meant: str) -> None:
    assert parse(message(f"Subject: {written}")).subject == meant


def test_escapes_written_as_required() -> None:
    """§2.3.1: backslash, BS, HT, LF, CR by their sequences, other controls as \\uxxxx,
    nothing else escaped."""
    m = cpim.text_message("fred@a.test", ["barney@b.test"], "x", subject='a\\b\t"\x01é\x7f')
    m.display_names["fred@a.test"] = 'Fred "the man"\n'
    head = build(m).partition(b"\r\n\r\n")[0].decode()
    assert 'Subject: a\\\\b\\t"\\u0001é\\u007f' in head.split(CRLF)
    assert 'From: "Fred \\"the man\\"\\n"<im:fred@a.test>' in head.split(CRLF)
    assert parse(build(m)) == m


# -- round trips ---------------------------------------------------------------------------

_TEXT = st.characters(exclude_categories=("Cs",))
_LOCAL = st.text(
    st.characters(
        exclude_categories=("Cs", "Cc"), exclude_characters="/@\ufffe\uffff", max_codepoint=0x2FFF
    ),
    min_size=1,
    max_size=12,
)
_DOMAIN = st.sampled_from(["a.test", "b.example", "xn--bcher-kva.example", "[192.0.2.1]"])
_ENDPOINT = st.builds(
    lambda address, sub, domain: str(Endpoint(address, sub, domain)),
    _LOCAL,
    st.none() | _LOCAL,
    _DOMAIN,
)
_NAME = st.text(_TEXT, min_size=1, max_size=20)
_SUBJECT = st.text(_TEXT, min_size=1, max_size=40).filter(lambda s: not s.endswith(" "))
_LANG = st.from_regex(r"[a-z]{2,3}(-[A-Z]{2})?", fullmatch=True)
_ZONE = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
_DATE = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=_ZONE)


@st.composite
def messages(draw: st.DrawFn) -> CPIMMessage:
    sender = draw(_ENDPOINT)
    to = draw(st.lists(_ENDPOINT, min_size=1, max_size=4))
    cc = draw(st.lists(_ENDPOINT, max_size=4))
    everyone = [sender, *to, *cc]
    names = draw(st.dictionaries(st.sampled_from(everyone), _NAME, max_size=len(everyone)))
    subject = draw(st.none() | _SUBJECT)
    translations = (
        draw(st.lists(st.tuples(_LANG, _SUBJECT), max_size=2)) if subject is not None else []
    )
    message = cpim.text_message(
        sender, to, draw(st.text(_TEXT)), cc=cc, subject=subject, date=draw(_DATE)
    )
    message.display_names = names
    message.subject_lang = draw(st.none() | _LANG) if subject is not None else None
    message.subject_translations = translations
    return message


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_round_trip(message: CPIMMessage) -> None:
    assert parse(build(message)) == message


@given(st.binary(), st.sampled_from(["application/octet-stream", "image/png; name=x.png"]))
def test_round_trip_of_any_content(body: bytes, content_type: str) -> None:
    message = CPIMMessage(
        "fred@a.test",
        ["barney@b.test"],
        date=datetime(2024, 5, 1, tzinfo=UTC),
        content_type=content_type,
        body=body,
        content_headers=[("Content-Description", "Grüße aus Köln, " + "x" * 80)],
    )
    parsed = parse(build(message))
    assert parsed.body == body  # the octets, exactly
    assert parsed.content_headers == message.content_headers  # RFC 2047 and folding undone
    assert parsed.text() is None


@given(st.text(_TEXT))
def test_text_of_a_text_message(text: str) -> None:
    message = cpim.text_message("fred@a.test", ["barney@b.test"], text)
    assert parse(build(message)).text() == text


def test_text_decoding_by_email() -> None:
    def with_content(content: str) -> CPIMMessage:
        return parse(message(content=content))

    assert with_content("Content-Type: text/plain\r\n\r\nGr\xfc\xdfe").text() == "Grüße"
    quoted = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
    quoted += "quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe"
    assert with_content(quoted).text() == "Grüße"
    with pytest.raises(CPIMError, match="charset 'bogus'"):
        with_content("Content-Type: text/plain; charset=bogus\r\n\r\nx").text()


@pytest.mark.parametrize(
    "headers",
    [
        'Content-Type: text/plain; charset="idna"',
        'Content-Type: text/plain; charset="undefined"',
        "Content-Type: text/plain; charset*=undefined''x",
        "Content-Type: text/plain\r\nContent-Disposition: ;0*",
    ],
)
def test_a_text_the_sender_made_unreadable_is_a_cpim_error(headers: str) -> None:
    """The sender chooses the charset and the content headers: a codec that is no text's
    or a header email cannot read back is the same CPIMError as an unknown charset, which
    a reader catches, not a UnicodeError or ValueError it does not."""
    with pytest.raises(CPIMError):
        parse(message(content=f"{headers}\r\n\r\nhi")).text()


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain; " + "x" * 80 + "=1",
        # Long enough for a line of its own, too long for a section of a long value.
        "text/plain; " + "x" * 63 + "=" + "1" * 100,
        # A non-ASCII value: each character takes 6 of the room in a section.
        "text/plain; " + "x" * 60 + "*=utf-8''" + "%C3%BC" * 40,
    ],
)
def test_a_parameter_name_too_long_to_fold_is_a_cpim_error_not_a_frozen_reader(
    content_type: str,
) -> None:
    """A sender's Content-Type with a parameter name too long to fold sent email's folding
    into an endless loop: the README's receive loop, at ``message().text()``, froze the
    whole process, every session of a gateway with it. Now it is a CPIMError, which a
    reader catches (``imxp listen`` prints a warning line and goes on). Run in a thread,
    so that the loop, were it back, fails this test rather than hangs the suite."""
    content = wire.Content.from_bytes(b"hello", content_type)
    data = wire.Data(
        wire.Originator("fred@a.test"), [wire.Recipient("barney@b.test")], content=content
    )
    incoming = Incoming("fred@a.test", ["barney@b.test"], content.media_type, b"hello", data)
    outcome: list[BaseException | str | None] = []

    def read() -> None:
        try:
            outcome.append(incoming.message().text())
        except BaseException as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert outcome, "text() never returned"
    assert isinstance(outcome[0], CPIMError), outcome
    assert "is longer than 48 characters" in str(outcome[0])


def test_a_long_parameter_name_that_folds_is_read() -> None:
    """The bound leaves every name that folds: one of 48 characters, its value in RFC 2231
    sections over several lines."""
    long_name = "x" * 48
    content_type = f"text/plain; {long_name}=" + "1" * 200
    assert parse(message(content=f"Content-Type: {content_type}\r\n\r\nhi")).text() == "hi"


# -- malformed input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "no message headers"),
        (b"From: <im:fred@a.test>\r\n", "no message headers"),
        (b"\r\n\r\nContent-Type: text/plain\r\n\r\n", "no message headers"),
        (message().replace(b"\r\n", b"\n"), "no message headers"),
        (message("Subject: \xff").replace("\xff".encode(), b"\xff"), "not UTF-8"),
        (message("Subject: a", " folded"), "without folding"),
        (message("Subject: trailing "), "may not end in white space"),
        (message("Subject: bell\x07"), "control characters must be escaped"),
        (message("Subject:no space"), "one space must follow"),
        (message("Subject:;lang=1234567890 x"), "not a language tag"),
        (message("Subject:;lang x"), "'name=value'"),
        (message('Subject:;x="open x'), "unterminated quoted string"),
        (message("Sub ject: x"), "is not 'Name: value'"),
        (message("x.Header: y"), "prefix x is used before an NS header"),
        (message("NS: x <urn:a>", "NS: x <urn:b>"), "declared twice"),
        (message("NS: x <relative/uri>"), "not an absolute URI"),
        (message("NS: x <urn:a#frag>"), "not an absolute URI"),
        (message("NS: x urn:a"), "is not [prefix] <URI>"),
        (message("Require: Nope"), "required header not understood: Nope"),
        (message("Require: Subject,,DateTime"), "is not a header name"),
        (message("From: <im:fred@a.test>", "From: <im:wilma@a.test>"), "more than one From"),
        (message("From: <sip:fred@a.test>"), "From: 'sip:fred@a.test' is not an im: URI"),
        (message("From: im:fred@a.test"), "is not [name] <im:...>"),
        (message("From: Fred (x) <im:fred@a.test>"), "must be words or a quoted string"),
        (message("To: <im:barney>"), "has no '@domain'"),
        (message("To: <im:bar%ffney@b.test>"), "percent-encoding is not UTF-8"),
        (message("To: <im:barney@b.test?subject=x>"), "has no headers or fragment"),
        (message("To: <im:bar%40ney@b.test>"), "is not an endpoint"),
        (message("To: <im:barney@-b-.test>"), "is not an endpoint"),
        (b"From: <im:fred@a.test>\r\nDateTime: 2024-05-01T12:00:00Z\r\n\r\nx", "no To header"),
        (message("DateTime: 2024-05-01 12:00:00Z"), "not an RFC 3339 date-time"),
        (message("DateTime: 2024-02-30T12:00:00Z"), "day is out of range"),
        (message("DateTime: 2024-02-01T12:00:00+24:00"), "DateTime"),
        (message("DateTime: 2024-05-01T12:00:00Z", "DateTime: 2024-05-01T12:00:00Z"), "more than"),
        (message(content="Content-Type: text/plain"), "no blank line after the MIME content"),
        (message(content="\r\nbody"), "needs a Content-Type"),
        (message(content="Content-ID: <x@y>\r\n\r\nbody"), "no Content-Type"),
        (message(content="Content-Type: text/plain\r\nnot a header\r\n\r\n"), "malformed"),
        (message(content="Content-Type: nonsense\r\n\r\nx"), "Content-Type"),
        # email's own parser raises IndexError on this one.
        (message(content="Content-Type: ;0*\r\n\r\nx"), "cannot be read"),
        (message(content="Content-Type: a/b\r\nContent-type: c/d\r\n\r\n"), "two Content-Type"),
        (
            message(content="Content-Type: a/b\r\nX: \xff\r\n\r\n").replace(b"\xc3\xbf", b"\xff"),
            "UTF-8",
        ),
    ],
)
def test_malformed(raw: bytes, reason: str) -> None:
    with pytest.raises(CPIMError) as caught:
        parse(raw)
    assert reason in str(caught.value)


def test_no_from_and_no_datetime() -> None:
    no_from = (
        b"To: <im:b@b.test>\r\nDateTime: 2024-05-01T12:00:00Z\r\n\r\nContent-Type: a/b\r\n\r\n"
    )
    with pytest.raises(CPIMError, match="no From header"):
        parse(no_from)
    no_date = b"From: <im:a@a.test>\r\nTo: <im:b@b.test>\r\n\r\nContent-Type: a/b\r\n\r\n"
    with pytest.raises(CPIMError, match="no DateTime header"):
        parse(no_date)


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_any_octets_parse_or_raise_cpim_error(raw: bytes) -> None:
    try:
        parse(raw)
    except CPIMError:
        pass


_VALID = build(parse(RFC_EXAMPLE, understood=[VITAL]))


@settings(max_examples=500)
@given(st.integers(0, len(_VALID)), st.integers(0, 40), st.binary(max_size=8))
def test_damaged_messages_parse_or_raise_cpim_error(at: int, cut: int, insert: bytes) -> None:
    try:
        parse(_VALID[:at] + insert + _VALID[at + cut :], understood=[VITAL])
    except CPIMError:
        pass


@settings(max_examples=300)
@given(st.text(string.printable + "é☃<>\"'\\;:=@.", max_size=80))
def test_garbled_header_lines_parse_or_raise_cpim_error(line: str) -> None:
    try:
        parse(message(line))
    except CPIMError:
        pass


# -- build refuses what cannot be written ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"date": datetime(2024, 5, 1)}, "timezone-aware"),
        ({"subject": "ends in a space "}, "white space"),
        ({"subject": ""}, "white space"),
        ({"sender": "not an endpoint"}, "has no '@domain'"),
        ({"extra": [("x.Header", "v")]}, "prefix x has no NS entry"),
        ({"extra": [("From", "<im:x@a.test>")]}, "has a field of its own"),
        ({"extra": [("Bad Name", "v")]}, "is not a header name"),
        ({"extra": [("X", "bell\x07")]}, "control characters"),
        ({"require": ["y.Header"]}, "prefix y has no NS entry"),
        ({"require": ["a b"]}, "is not a header name"),
        ({"namespaces": {"p": "not a uri"}}, "absolute URI"),
        ({"namespaces": {"p.q": "urn:x"}}, "is not a prefix"),
        ({"subject_translations": [("fr", "x")]}, "without a subject"),
        ({"content_type": "nonsense"}, "Content-Type"),
        ({"content_headers": [("Content-Type", "a/b")]}, "one Content-Type"),
        ({"content_headers": [("X", "a\r\nB: c")]}, "linefeed"),
        ({"content_headers": [("X Y", "a")]}, "not a MIME header name"),
    ],
)
def test_build_refuses(change: dict[str, object], reason: str) -> None:
    message = cpim.text_message("fred@a.test", ["barney@b.test"], "hi")
    for name, value in change.items():
        setattr(message, name, value)
    with pytest.raises(ValueError, match=reason):
        build(message)


# -- im: URIs (draft-klyne §2.2) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "uri"),
    [
        ("fred@a.test", "im:fred@a.test"),
        ("fred/appl=im@a.test", "im:fred/appl=im@a.test"),
        ("Fred@A.Test", "im:Fred@a.test"),  # §2.2.1: the local part keeps its case
        ("fred smith@a.test", "im:fred%20smith@a.test"),
        ("100%?#@a.test", "im:100%25%3F%23@a.test"),
        ("grüße@bücher.example", "im:gr%C3%BC%C3%9Fe@xn--bcher-kva.example"),
        ("fred@[192.0.2.1]", "im:fred@[192.0.2.1]"),
    ],
)
def test_im_uris(endpoint: str, uri: str) -> None:
    assert to_im_uri(endpoint) == uri
    assert from_im_uri(uri) == str(Endpoint.parse(endpoint))


def test_im_uri_decoding_is_undone_before_comparing() -> None:
    """RFC 3340 §2.2.1: "apex:fred@example.com" is "apex:f%72ed@example.com"."""
    assert from_im_uri("IM:f%72ed@Example.COM") == "fred@example.com"


@given(_ENDPOINT)
def test_im_uri_round_trip(endpoint: str) -> None:
    uri = to_im_uri(endpoint)
    assert uri.isascii()
    assert from_im_uri(uri) == endpoint


# -- plain text received as a message --------------------------------------------------------


def test_plain_text_content_as_a_message() -> None:
    data = wire.Data(
        wire.Originator("fred@a.test"),
        [wire.Recipient("barney@b.test")],
        content=wire.Content.from_bytes(
            "ça".encode("latin-1"), "text/plain; charset=latin-1", [("Content-Language", "fr")]
        ),
    )
    received = datetime(2024, 5, 1, tzinfo=UTC)
    incoming = Incoming("fred@a.test", ["barney@b.test"], "text/plain", b"\xe7a", data, received)

    message = incoming.message()

    assert message is not None
    assert (message.sender, message.to, message.date) == (
        "fred@a.test",
        ["barney@b.test"],
        received,
    )
    assert message.text() == "ça"
    assert message.content_type == "text/plain; charset=latin-1"
    assert message.content_headers == [
        ("Content-Language", "fr"),
        ("Content-Transfer-Encoding", "binary"),
    ]
