"""APEX elements and payloads (RFC 3340 §4.1, §4.4, §5.1, §6.2, DTDs §9; RFC 3342 §4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imxp.apex import wire
from imxp.apex.options import with_data_hopping
from imxp.apex.wire import (
    APEX_URI,
    BEEP_XML,
    MAX_PARTS,
    MAX_RECIPIENTS,
    OK,
    APEXError,
    Attach,
    Bind,
    Content,
    Data,
    Error,
    Option,
    Originator,
    Recipient,
    StatusResponse,
    Terminate,
    decode,
    decode_status_response,
    encode,
    encode_status_response,
    status_response_data,
)
from imxp.beep.message import Message, MessageError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def xml(text: str) -> Message:
    return Message(text.encode("utf-8"), BEEP_XML)


def crlf(text: str) -> bytes:
    """An example printed in the RFC, one line per line, as the CRLF-delimited octets it means."""
    return "\r\n".join(text.split("\n")).encode("utf-8")


def multipart(control: str, *parts: bytes, boundary: str = "boundary") -> Message:
    """``control`` as the start part of a multipart/related, followed by ``parts``."""
    body = b"--" + boundary.encode() + b"\r\n"
    body += b"Content-Type: application/beep+xml\r\nContent-ID: <0@example.com>\r\n\r\n"
    body += control.encode()
    for part in parts:
        body += b"\r\n--" + boundary.encode() + b"\r\n" + part
    body += b"\r\n--" + boundary.encode() + b"--\r\n"
    return Message(
        body,
        f'multipart/related; boundary="{boundary}"; start="<0@example.com>";'
        f' type="application/beep+xml"',
    )


GIF = b"GIF89a\x01\x00\x01\x00\x00\xff\x00,\r\n--boundar\r\n\x00;"
PART_1 = b"Content-Type: image/gif\r\nContent-ID: <1@example.com>\r\n\r\n" + GIF


def expect(code: int, message: Message) -> APEXError:
    with pytest.raises(APEXError) as info:
        decode(message)
    assert info.value.code == code, info.value.text
    return info.value


# --------------------------------------------------------------------------- §4.1 payload forms


def test_profile_uri() -> None:
    assert APEX_URI == "http://iana.org/beep/APEX"  # §4.2


def test_xml_only_payload() -> None:
    """§4.1, the first example (its frame header's size, 39, is not this payload's)."""
    payload = b"Content-Type: application/beep+xml\r\n\r\n<terminate transID='1' />"
    assert decode(Message.from_payload(payload)) == Terminate(1)


RFC_4_1_MULTIPART = """\
Content-Type: multipart/related; boundary="boundary";
              start="<1@example.com>";
              type="application/beep+xml"

--boundary
Content-Type: application/beep+xml
Content-ID: <1@example.com>

<data content='cid:2@example.com'>
    <originator identity='fred@example.com' />
    <recipient identity='barney@example.com' />
</data>
--boundary
Content-Type: image/gif
Content-Transfer-Encoding: binary
Content-ID: <2@example.com>

...
--boundary--
"""


def rfc_multipart() -> Message:
    return Message.from_payload(crlf(RFC_4_1_MULTIPART))


def test_multipart_payload() -> None:
    """§4.1, the second example, with the CRLFs the RFC means."""
    data = decode(rfc_multipart())
    assert isinstance(data, Data)
    assert data.originator == Originator("fred@example.com")
    assert data.recipients == [Recipient("barney@example.com")]
    assert data.options == []
    assert data.content_ref == "cid:2@example.com"
    content = data.content
    assert content is not None
    assert content.kind == "part"
    assert content.name == "2@example.com"
    assert content.media_type == "image/gif"
    assert content.body == b"..."
    assert content.raw == (
        b"Content-Type: image/gif\r\nContent-Transfer-Encoding: binary\r\n"
        b"Content-ID: <2@example.com>\r\n\r\n..."
    )
    assert ("Content-Transfer-Encoding", "binary") in content.headers
    assert content.boundary == b"boundary"
    assert content.ref == "cid:2@example.com"


def test_multipart_without_start_uses_first_part() -> None:
    payload = crlf(RFC_4_1_MULTIPART).replace(b'\r\n              start="<1@example.com>";', b"")
    data = decode(Message.from_payload(payload))
    assert isinstance(data, Data) and data.content is not None
    assert data.content.body == b"..."


def test_multipart_start_need_not_be_first() -> None:
    message = Message(
        b"--xyz\r\n" + PART_1 + b"\r\n--xyz\r\nContent-Type: application/beep+xml\r\n"
        b"Content-ID: <0@x>\r\n\r\n<data content='cid:1@example.com'>"
        b"<originator identity='a@example.com'/><recipient identity='b@example.com'/></data>"
        b"\r\n--xyz--",
        'multipart/related; boundary=xyz; start="<0@x>"; type="application/beep+xml"',
    )
    data = decode(message)
    assert isinstance(data, Data) and data.content is not None
    assert data.content.body == GIF


def test_content_id_matches_with_or_without_brackets() -> None:
    part = b"Content-Type: image/gif\r\nContent-ID: 1@example.com\r\n\r\nxyz"
    data = decode(multipart(DATA_CID, part))
    assert isinstance(data, Data) and data.content is not None
    assert data.content.body == b"xyz"


def test_cid_url_is_unescaped() -> None:
    """RFC 2392: cid:foo4%25foo1@bar.net names Content-ID <foo4%foo1@bar.net>."""
    part = b"Content-Type: text/plain\r\nContent-ID: <foo4%foo1@bar.net>\r\n\r\nhi"
    control = DATA_CID.replace("cid:1@example.com", "cid:foo4%25foo1@bar.net")
    data = decode(multipart(control, part))
    assert isinstance(data, Data) and data.content is not None
    assert data.content.name == "foo4%foo1@bar.net"
    again = decode(encode(data))
    assert isinstance(again, Data) and again.content == data.content


def test_part_without_content_type_is_text_plain() -> None:
    part = b"Content-ID: <1@example.com>\r\n\r\nhello"
    data = decode(multipart(DATA_CID, part))
    assert isinstance(data, Data) and data.content is not None
    assert data.content.media_type == "text/plain"


def test_a_part_without_a_body_may_end_with_its_headers() -> None:
    """RFC 2046 §5.1.1: body-part := MIME-part-headers [CRLF *OCTET] - empty content
    may be written without the blank line, its last header's CRLF then straight before
    the delimiter's. It is carried as it came (§4.4.4.1)."""
    part = b"Content-Type: text/plain\r\nContent-ID: <1@example.com>\r\n"
    data = decode(multipart(DATA_CID, part))
    assert isinstance(data, Data) and data.content is not None
    assert data.content.raw == part
    assert data.content.body == b""
    assert data.content.media_type == "text/plain"
    assert data.content.headers == [
        ("Content-Type", "text/plain"),
        ("Content-ID", "<1@example.com>"),
    ]
    again = decode(encode(dataclasses.replace(data, options=[Option("o")])))
    assert isinstance(again, Data) and again.content == data.content


RFC_4_1_INLINE = """\
<data content='#Content'>
    <originator identity='fred@example.com' />
    <recipient identity='barney@example.com' />
    <data-content Name='Content'>
        <statusResponse transID='86'>
            <destination identity='barney@example.com'>
                <reply code='250' />
            </destination>
        </statusResponse>
    </data-content>
</data>"""


def test_inline_payload() -> None:
    """§4.1, the third example: content nested as a data-content element."""
    payload = b"Content-Type: application/beep+xml\r\n\r\n" + crlf(RFC_4_1_INLINE)
    data = decode(Message.from_payload(payload))
    assert isinstance(data, Data)
    assert data.content_ref == "#Content"
    content = data.content
    assert content is not None
    assert content.kind == "inline"
    assert content.name == "Content"
    assert content.media_type == BEEP_XML
    assert content.headers == []
    assert content.raw.startswith(b"<data-content Name='Content'>\r\n        <statusResponse")
    assert content.raw.endswith(b"</statusResponse>\r\n    </data-content>")
    assert content.body.strip().startswith(b"<statusResponse transID='86'>")
    assert decode_status_response(content.body) == StatusResponse(
        86, [("barney@example.com", 250, "")]
    )


def test_inline_content_empty_element() -> None:
    data = decode(
        xml(
            "<data content='#C'><originator identity='a@b.example'/>"
            "<recipient identity='c@d.example'/><data-content Name='C' a='x>y' /></data>"
        )
    )
    assert isinstance(data, Data) and data.content is not None
    assert data.content.raw == b"<data-content Name='C' a='x>y' />"
    assert data.content.body == b""


def test_external_content() -> None:
    """§4.1: the content may be an absolute URI outside the payload; nothing is carried."""
    data = decode(
        xml(
            "<data content='http://example.com/x#y'><originator identity='a@example.com'/>"
            "<recipient identity='b@example.com'/></data>"
        )
    )
    assert isinstance(data, Data)
    assert data.content is None
    assert data.content_ref == "http://example.com/x#y"
    assert decode(encode(data)) == data


# --------------------------------------------------------------------------- §4.2, §4.4 elements


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # §4.2, piggybacked in the start element's CDATA.
        (
            "<attach endpoint='fred@example.com'\n                 transID='1' />",
            Attach("fred@example.com", 1),
        ),
        ("<bind relay='example.com'\n               transID='1' />", Bind("example.com", 1)),
        # §4.4.1
        ("<attach endpoint='fred@example.com' transID='1' />", Attach("fred@example.com", 1)),
        ("<attach endpoint='wilma@example.com' transID='2' />", Attach("wilma@example.com", 2)),
        ("<ok />", OK()),
        ("<error code='537'>access denied</error>", Error(537, "access denied")),
        # §4.4.2
        ("<bind relay='example.com' transID='1' />", Bind("example.com", 1)),
        ("<bind relay='rubble.com' transID='2' />", Bind("rubble.com", 2)),
        # §4.4.3
        ("<terminate transID='1' />", Terminate(1)),
        ("<terminate transID='13' />", Terminate(13)),
        (
            "<error code='550'>unknown transaction-identifier</error>",
            Error(550, "unknown transaction-identifier"),
        ),
        # DTD §9.1 defaults and optional attributes.
        ("<terminate />", Terminate(0, 250)),
        (
            "<terminate transID='0' code='421' xml:lang='en'>shutting\ndown</terminate>",
            Terminate(0, 421, "shutting\ndown", "en"),
        ),
        ("<error code='500' xml:lang='de' />", Error(500, "", "de")),
        ("<bind relay='[10.0.0.1]' transID='7' />", Bind("[10.0.0.1]", 7)),
    ],
)
def test_rfc_elements(text: str, expected: wire.APEXElement) -> None:
    assert decode(xml(text)) == expected
    assert decode(encode(expected)) == expected


DATA_CID = """\
<data content='cid:1@example.com'>
    <originator identity='fred@example.com' />
    <recipient identity='barney@example.com' />
</data>"""


def test_rfc_data_element() -> None:
    """§4.4.4: the data element, its content a body part."""
    data = decode(multipart(DATA_CID, PART_1))
    assert isinstance(data, Data)
    assert data.originator.identity == "fred@example.com"
    assert [r.identity for r in data.recipients] == ["barney@example.com"]
    assert data.content is not None and data.content.body == GIF


def test_options_on_every_container() -> None:
    """§5: options may be in attach, data, originator and recipient."""
    attach = decode(
        xml(
            "<attach endpoint='fred@example.com' transID='1'>"
            "<option internal='attachOverride' transID='3' /></attach>"
        )
    )
    assert attach == Attach(
        "fred@example.com", 1, [Option("attachOverride", trans_id=3)]
    )  # RFC 3342 §1
    data = decode(
        multipart(
            "<data content='cid:1@example.com'>"
            "<originator identity='fred@example.com'><option internal='o' /></originator>"
            "<recipient identity='a@example.com'><option internal='r1' /></recipient>"
            "<recipient identity='b@example.com'><option external='http://x.example/o#1'"
            " targetHop='this' localize='en fr' /></recipient>"
            "<option internal='hold4Endpoint' /></data>",
            PART_1,
        )
    )
    assert isinstance(data, Data)
    assert data.originator.options == [Option("o")]
    assert data.recipients[0].options == [Option("r1")]
    assert data.recipients[1].options == [
        Option("http://x.example/o#1", external=True, target_hop="this", localize="en fr")
    ]
    assert data.options == [Option("hold4Endpoint")]


STATUS_REQUEST_DATA = """\
<data content='cid:1@example.com'>
       <originator identity='fred@example.com' />
       <recipient identity='barney@rubble.com' />
       <option internal='statusRequest' targetHop='final'
               mustUnderstand='true' transID='86' />
   </data>"""


def test_status_request_example() -> None:
    """§5.1: data with a statusRequest option."""
    data = decode(multipart(STATUS_REQUEST_DATA, PART_1))
    assert isinstance(data, Data)
    assert data.options == [
        Option("statusRequest", target_hop="final", must_understand=True, trans_id=86)
    ]


STATUS_RESPONSE_550 = """\
<data content='#Content'>
       <originator identity='apex=report@example.com' />
       <recipient identity='fred@example.com' />
       <data-content Name='Content'>
           <statusResponse transID='86'>
               <destination identity='barney@example.com'>
                   <reply code='550'>unknown endpoint
                                     identity</reply>
               </destination>
           </statusResponse>
       </data-content>
   </data>"""


def test_status_response_examples() -> None:
    """§5.1: the report service's data, and the statusResponse in it (§6.2)."""
    data = decode(xml(STATUS_RESPONSE_550))
    assert isinstance(data, Data)
    assert data.originator.identity == "apex=report@example.com"
    assert data.content is not None
    response = decode_status_response(data.content.body)
    assert response.trans_id == 86
    [(identity, code, text)] = response.destinations
    assert (identity, code) == ("barney@example.com", 550)
    assert text.split() == ["unknown", "endpoint", "identity"]


DATA_HOPPING = """\
<data content='cid:1@example.com'>
       <originator identity='appl=pubsub/topic=fred@example.com' />
       <recipient identity='barney@example.com' />
       <option internal='dataHopping' targetHop='all'
               mustUnderstand='true' transID='86'>
           <dataHopping noMoreThan='2' reportErrors='true' />
       </option>
   </data>"""


def test_data_hopping_example() -> None:
    """RFC 3342 §4: the option's content is kept as the octets received."""
    data = decode(multipart(DATA_HOPPING, PART_1))
    assert isinstance(data, Data)
    assert data.options == [
        Option(
            "dataHopping",
            target_hop="all",
            must_understand=True,
            trans_id=86,
            body="<dataHopping noMoreThan='2' reportErrors='true' />",
        )
    ]


# --------------------------------------------------------------------------- report service


def test_status_response_round_trip() -> None:
    response = StatusResponse(
        86,
        [("barney@example.com", 250, ""), ("wilma@example.com", 550, "unknown endpoint <x>")],
    )
    text = encode_status_response(response)
    assert "<reply code='250' transID='86' />" in text  # §9.1: reply's transID is required
    assert decode_status_response(text) == response
    assert decode_status_response(text.encode()) == response


def test_status_response_data() -> None:
    """§5.1: from apex=report@domain to the originator, the statusResponse inline."""
    response = StatusResponse(86, [("barney@rubble.com", 250, "")])
    for report in ("apex=report@rubble.com", "rubble.com"):
        data = status_response_data(report, "fred@example.com", response)
        assert data.originator == Originator("apex=report@rubble.com")
        assert data.recipients == [Recipient("fred@example.com")]
        assert data.options == []
        assert data.content_ref == "#Content"
        message = encode(data)
        assert message.content_type == BEEP_XML
        again = decode(message)
        assert isinstance(again, Data) and again.content is not None
        assert again.content == data.content
        assert decode_status_response(again.content.body) == response


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("<statusResponse transID='1' />", 501),
        ("<statusResponse><destination identity='a@b.example'><reply code='250'/>"
         "</destination></statusResponse>", 501),
        ("<statusResponse transID='1'><destination identity='a@b.example' />"
         "</statusResponse>", 501),
        ("<statusResponse transID='1'><destination identity='a@b.example'><reply code='250'/>"
         "<reply code='250'/></destination></statusResponse>", 501),
        ("<statusResponse transID='1'><destination identity='a@b.example'><reply/>"
         "</destination></statusResponse>", 501),
        ("<statusResponse transID='1'><destination identity='a@b.example'>"
         "<reply code='250' transID='0'/></destination></statusResponse>", 501),
        ("<statusResponse transID='1'><destination identity='nobody'><reply code='250'/>"
         "</destination></statusResponse>", 553),
        ("<statusResponse transID='1'><x/></statusResponse>", 501),
        ("<statusResponse transID='1'>text<destination identity='a@b.example'>"
         "<reply code='250'/></destination></statusResponse>", 501),
        ("<reply code='250' />", 501),
        ("<statusResponse", 500),
        ("", 500),
    ],
)  # fmt: skip
def test_bad_status_responses(text: str, code: int) -> None:
    with pytest.raises(APEXError) as info:
        decode_status_response(text)
    assert info.value.code == code


# --------------------------------------------------------------------------- content preserved


def test_content_preserved_when_envelope_changes() -> None:
    """§4.4.4.1: relays never modify content, however the data element changes."""
    original = decode(rfc_multipart())
    assert isinstance(original, Data) and original.content is not None
    changed = dataclasses.replace(
        original,
        recipients=[Recipient("wilma@example.com", [Option("r", body="<x>\r\n</x>")])],
        options=[Option("statusRequest", must_understand=True, trans_id=9)],
    )
    message = encode(changed)
    assert message.content_type == "multipart/related"
    assert 'boundary="boundary"' in (message.header("Content-Type") or "")  # reused
    again = decode(Message.from_payload(message.to_payload()))
    assert isinstance(again, Data) and again.content is not None
    assert again.content.raw == original.content.raw
    assert again.recipients == changed.recipients
    assert again.options == changed.options


def test_inline_content_preserved_when_envelope_changes() -> None:
    original = decode(xml(RFC_4_1_INLINE.replace("\n", "\r\n")))
    assert isinstance(original, Data) and original.content is not None
    changed = dataclasses.replace(original, recipients=[Recipient("wilma@example.com")])
    message = encode(changed)
    assert original.content.raw in message.body  # spliced in verbatim
    again = decode(message)
    assert isinstance(again, Data) and again.content is not None
    assert again.content.raw == original.content.raw
    assert b"\r\n" in again.content.raw  # no line-end normalisation of content


SCOPED_INLINE = (
    "<data content='#C' xmlns='urn:example:default' xmlns:x='urn:example:x' xml:lang='fr'>"
    "<originator identity='fred@example.com' />"
    "<recipient identity='barney@example.com' /><recipient identity='wilma@example.org' />"
    "<option internal='note'><x:why>parce que</x:why></option>"
    "<data-content Name='C'><x:msg>salut</x:msg><plain/></data-content></data>"
)


def namespaced(body: bytes) -> list[tuple[str, dict[str, str]]]:
    """Every element of ``body`` with its expanded name and attributes, as a namespace-aware
    reader sees them (it refuses a prefix that nothing declares)."""
    seen: list[tuple[str, dict[str, str]]] = []
    parser = expat.ParserCreate("UTF-8", " ")
    parser.StartElementHandler = lambda name, attrs: seen.append((name, attrs))
    parser.Parse(body, True)
    return seen


@pytest.mark.parametrize("form", ["inline", "multipart"])
def test_what_the_content_inherits_goes_on_when_the_data_is_written_anew(form: str) -> None:
    """The namespaces and xml:lang declared on data are the content's and the options'
    too: a relay writing the data for fewer recipients keeps their meaning (§4.4.4.1)."""
    message = xml(SCOPED_INLINE) if form == "inline" else multipart(SCOPED_INLINE)
    original = decode(message)
    assert isinstance(original, Data)
    assert original.in_scope == (
        ("xmlns", "urn:example:default"),
        ("xmlns:x", "urn:example:x"),
        ("xml:lang", "fr"),
    )
    changed = dataclasses.replace(original, recipients=original.recipients[1:])
    control = encode(changed).body
    if form == "multipart":
        control = control[control.index(b"<data") : control.index(b"</data>") + 7]
    elements = namespaced(control)
    assert ("urn:example:x msg", {}) in elements
    assert ("urn:example:x why", {}) in elements
    assert ("urn:example:default plain", {}) in elements
    again = decode(encode(changed))
    assert isinstance(again, Data)
    assert again.in_scope == original.in_scope
    assert again.content == original.content
    assert again.options == original.options


SCOPED_OPTIONS = (
    "<data content='#C'>"
    "<originator identity='fred@example.com' />"
    "<recipient identity='barney@example.com' xmlns:r='urn:example:r' xml:lang='de'>"
    "<option external='http://example.com/receipt' transID='5'><r:ask/></option></recipient>"
    "<recipient identity='wilma@example.org' />"
    "<option external='http://example.com/trace' targetHop='all' transID='7'"
    " xmlns:t='urn:example:trace'><t:hop by='a.example'/></option>"
    "<data-content Name='C'><msg/></data-content></data>"
)


@pytest.mark.parametrize("form", ["inline", "multipart"])
def test_what_an_option_body_inherits_below_data_goes_on_with_it(form: str) -> None:
    """Namespaces (and xml: attributes) declared on an option element, or on the
    originator or recipient holding it, are its body's: a relay writing the option
    again - counting the hop limit down, or writing the data for fewer recipients -
    keeps them, or a namespace-aware next hop refuses the data (§4.4.4.1, §5)."""
    message = xml(SCOPED_OPTIONS) if form == "inline" else multipart(SCOPED_OPTIONS)
    original, received = wire.decode_received(message)
    assert isinstance(original, Data)
    # Handed on to one next hop with the hop limit counted down: options written anew.
    onward = Data(
        original.originator,
        original.recipients,
        with_data_hopping(original.options, 8, 3),
        original.content_ref,
        original.content,
    )
    # Written anew for one recipient at a time.
    split = [dataclasses.replace(original, recipients=[r]) for r in original.recipients]
    for sent in [wire.encode_onward(onward, received), *map(encode, split)]:
        control = sent.body
        if form == "multipart":
            control = control[control.index(b"<data") : control.index(b"</data>") + 7]
        elements = namespaced(control)
        assert ("urn:example:trace hop", {"by": "a.example"}) in elements
        again = decode(sent)
        assert isinstance(again, Data)
        assert again.options[0] == original.options[0]
        if again.recipients[0].identity == "barney@example.com":
            assert ("urn:example:r ask", {}) in elements
            assert again.recipients[0].options == original.recipients[0].options


def test_data_made_anew_takes_only_what_children_inherit() -> None:
    data = Data(
        Originator("fred@example.com"),
        [Recipient("barney@example.com")],
        content=Content.inline_xml("<x/>"),
        in_scope=(("content", "#Other"),),
    )
    with pytest.raises(ValueError, match="namespace declaration"):
        encode(data)


def test_received_boundary_not_reused_when_control_part_contains_it() -> None:
    original = decode(rfc_multipart())
    assert isinstance(original, Data)
    changed = dataclasses.replace(original, options=[Option("x", body="<a>\r\n--boundary</a>")])
    message = encode(changed)
    assert 'boundary="boundary"' not in (message.header("Content-Type") or "")
    again = decode(message)
    assert isinstance(again, Data)
    assert again.options == changed.options
    assert again.content == original.content


def test_content_ids_and_boundaries_are_never_repeated() -> None:
    """RFC 2045 §7: each Content-ID is unique; so is each boundary we choose."""
    seen_ids, seen_boundaries = set(), set()
    for _ in range(50):
        content = Content.from_bytes(b"hello", "text/plain")
        data = Data(
            Originator("fred@example.com"), [Recipient("barney@example.com")], content=content
        )
        message = encode(data)
        params = wire._content_type_params(message.header("Content-Type") or "")
        seen_ids.update({content.name, params["start"]})
        seen_boundaries.add(params["boundary"])
    assert len(seen_ids) == 100
    assert len(seen_boundaries) == 50


def test_content_holding_our_next_boundaries_is_still_framed() -> None:
    """Content written to contain the boundaries we are about to choose (they follow a
    counter) gets another, unpredictable boundary: one more scan, not one per guess."""
    probe = encode(
        Data(
            Originator("f@example.com"),
            [Recipient("b@example.com")],
            content=Content.from_bytes(b"x", "text/plain"),
        )
    )
    used = wire._content_type_params(probe.header("Content-Type") or "")["boundary"]
    prefix, _, serial = used.rpartition(".")
    guesses = b"".join(
        b"\r\n--%s.%d\r\n" % (prefix.encode(), n)
        for n in range(int(serial) + 1, int(serial) + 2000)
    )
    content = Content.from_bytes(guesses, "application/octet-stream")
    message = encode(
        Data(Originator("f@example.com"), [Recipient("b@example.com")], content=content)
    )
    boundary = wire._content_type_params(message.header("Content-Type") or "")["boundary"]
    assert not boundary.startswith(prefix)
    again = decode(Message.from_payload(message.to_payload()))
    assert isinstance(again, Data) and again.content is not None
    assert again.content.body == guesses


@pytest.mark.parametrize("lines", [0, 1, 7, 8, 9, 50])
def test_content_with_lines_like_delimiters(lines: int) -> None:
    """RFC 2046 §5.1.1: only CRLF "--" boundary delimits; content full of other
    "--" lines (a nested multipart) is carried whole, however many there are."""
    nested = b"".join(b"\r\n--other-%d\r\nx" % n for n in range(lines)) + b"\r\n--apex"
    content = Content.from_bytes(nested, "multipart/mixed; boundary=other")
    data = Data(Originator("f@example.com"), [Recipient("b@example.com")], content=content)
    again = decode(Message.from_payload(encode(data).to_payload()))
    assert isinstance(again, Data) and again.content is not None
    assert again.content.body == nested
    # And a delimiter of the real boundary after such lines is found: a line that only
    # begins like it is refused as malformed, not taken for content.
    boundary = b"b0undary"
    forged = multipart(
        "<data content='cid:1@example.com'><originator identity='f@example.com'/>"
        "<recipient identity='b@example.com'/></data>",
        b"Content-ID: <1@example.com>\r\n\r\n" + nested + b"\r\n--b0undaryX",
        boundary=boundary.decode(),
    )
    with pytest.raises(APEXError) as refused:
        decode(forged)
    assert refused.value.code == 500


def test_new_content() -> None:
    content = Content.from_bytes(
        b"\x00\xff--\r\n", "Application/Octet-Stream", [("X-Note", "hi")], content_id="c@x"
    )
    assert content.kind == "part"
    assert content.ref == "cid:c@x"
    assert content.media_type == "application/octet-stream"
    assert content.body == b"\x00\xff--\r\n"
    assert ("X-Note", "hi") in content.headers
    assert ("Content-Transfer-Encoding", "binary") in content.headers
    data = Data(Originator("fred@example.com"), [Recipient("barney@example.com")], content=content)
    assert data.content_ref == "cid:c@x"
    again = decode(encode(data))
    assert again == data
    qp = Content.from_bytes(b"x", "text/plain", [("Content-Transfer-Encoding", "8bit")])
    assert [v for k, v in qp.headers if k == "Content-Transfer-Encoding"] == ["8bit"]


@pytest.mark.parametrize(
    "call",
    [
        lambda: Content.from_bytes(b"", "text/plain", [("Content-ID", "<x@y>")]),
        lambda: Content.from_bytes(b"", "text/plain\r\nX: y"),
        lambda: Content.from_bytes(b"", "text/plain", [("Bad Name", "v")]),
        lambda: Content.from_bytes(b"", "text/plain", content_id="<x@y>"),
        lambda: Content.inline_xml("<unclosed>"),
        lambda: Content.inline_xml("<x/>", name="1abc"),
    ],
)
def test_bad_new_content(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "element",
    [
        Attach("fred", 1),
        Attach("fred@example.com", 0),
        Bind("exa_mple.com", 1),
        Terminate(-1),
        Error(99),
        Attach("a@b.example", 1, [Option("bad name")]),
        Attach("a@b.example", 1, [Option("relative/uri", external=True)]),
        Attach("a@b.example", 1, [Option("o", target_hop="next")]),
        Attach("a@b.example", 1, [Option("o", trans_id=2147483648)]),
        Attach("a@b.example", 1, [Option("o", body="<unclosed>")]),
        Attach("a@b.example", 1, [Option("o", in_scope=(("transID", "3"),))]),
        Data(Originator("a@b.example"), [], content_ref="http://x/"),
        Data(Originator("a@b.example"), [Recipient("bad")], content_ref="http://x/"),
        Data(Originator("a@b.example"), [Recipient("c@d.example")], content_ref="#C"),
        Data(Originator("a@b.example"), [Recipient("c@d.example")], content_ref="cid:x@y"),
        Data(
            Originator("a@b.example"),
            [Recipient("c@d.example")],
            content_ref="#D",
            content=Content.inline_xml("<x/>", "C"),
        ),
        Data(
            Originator("a@b.example"),
            [Recipient("c@d.example")],
            content_ref="cid:other@x",
            content=Content.from_bytes(b"", "text/plain", content_id="c@x"),
        ),
    ],
)
def test_encode_refuses_invalid_objects(element: wire.APEXElement) -> None:
    with pytest.raises(ValueError):
        encode(element)


@pytest.mark.parametrize("padding", [0, 300])
def test_encode_checks_option_bodies_alike_cached_or_not(padding: int) -> None:
    """Bodies that passed are remembered (short ones); a bad one is refused every time."""
    space = " " * padding
    for body, good in ((f"<x{space}/>", True), (f"<x{space}>", False), (f"a{space}</x>", False)):
        attach = Attach("a@b.example", 1, [Option("o", body=body)])
        for _ in range(2):
            if good:
                assert decode(encode(attach)) == attach
            else:
                with pytest.raises(ValueError, match="not well-formed"):
                    encode(attach)


def test_encode_refuses_non_elements() -> None:
    with pytest.raises(TypeError):
        encode("<ok/>")  # type: ignore[arg-type]


def test_encode_bad_status_responses() -> None:
    for response in (
        StatusResponse(0, [("a@b.example", 250, "")]),
        StatusResponse(1, []),
        StatusResponse(1, [("bad", 250, "")]),
        StatusResponse(1, [("a@b.example", 1000, "")]),
    ):
        with pytest.raises(ValueError):
            encode_status_response(response)


def test_diagnostics_survive_encoding() -> None:
    error = Error(554, "policy\r\nviolation \x00 <&>")
    again = decode(encode(error))
    assert again == Error(554, "policy\r\nviolation \ufffd <&>")


# --------------------------------------------------------------------------- malformed input


def data_xml(inner: str, content: str = "http://example.com/c") -> str:
    return f"<data content={quoteattr(content)}>{inner}</data>"


PARTIES = "<originator identity='a@example.com'/><recipient identity='b@example.com'/>"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        # Poorly formed XML: 500.
        ("", 500),
        ("junk", 500),
        ("<attach", 500),
        ("<ok/><ok/>", 500),
        ("<ok>&undefined;</ok>", 500),
        (
            "<!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><error code='500'>"
            "&lol2;</error>",
            500,
        ),
        ("<!DOCTYPE ok SYSTEM 'http://example.com/apex.dtd'><ok/>", 500),
        ("<?xml version='1.0' encoding='ISO-8859-1'?><ok/>", 500),
        ("<?xml version='1.0' encoding='UTF-8'?><ok/>", None),
        ("<a>" * 100 + "</a>" * 100, 500),
        # Unknown or misused elements: 501.
        ("<statusResponse transID='1'/>", 501),
        ("<greeting />", 501),
        ("<ok>text</ok>", 501),
        ("<ok><x/></ok>", 501),
        ("<error>no code</error>", 501),
        ("<error code='5000'/>", 501),
        ("<error code='abc'/>", 501),
        ("<error code='250'><b>x</b></error>", 501),
        ("<terminate code='25'/>", 501),
        # Missing attributes and bad transIDs: 501.
        ("<attach transID='1' />", 501),
        ("<attach endpoint='fred@example.com' />", 501),
        ("<bind relay='example.com' />", 501),
        ("<bind transID='1' />", 501),
        ("<attach endpoint='fred@example.com' transID='0' />", 501),
        ("<attach endpoint='fred@example.com' transID='-1' />", 501),
        ("<attach endpoint='fred@example.com' transID=' 1' />", 501),
        ("<attach endpoint='fred@example.com' transID='abc' />", 501),
        ("<attach endpoint='fred@example.com' transID='\u0661' />", 501),
        ("<attach endpoint='fred@example.com' transID='2147483648' />", 501),
        ("<attach endpoint='fred@example.com' transID='99999999999' />", 501),
        ("<terminate transID='2147483648' />", 501),
        ("<attach endpoint='fred@example.com' transID='1'>text</attach>", 501),
        ("<attach endpoint='fred@example.com' transID='1'>\u00a0</attach>", 501),  # not XML S
        ("<attach endpoint='fred@example.com' transID='1'><x/></attach>", 501),
        # Bad identities: 553.
        ("<attach endpoint='fred' transID='1' />", 553),
        ("<attach endpoint='fred@@example.com' transID='1' />", 553),
        ("<attach endpoint='fred@192.0.2.1' transID='1' />", 553),
        ("<bind relay='exa_mple.com' transID='1' />", 553),
        ("<bind relay='[192.0.2.300]' transID='1' />", 553),
        (data_xml("<originator identity='a@example.com'/><recipient identity='b'/>"), 553),
        (data_xml("<originator identity='a'/><recipient identity='b@example.com'/>"), 553),
        # The data element's structure: 501.
        ("<data>" + PARTIES + "</data>", 501),
        (data_xml("<originator identity='a@example.com'/>"), 501),
        (data_xml("<recipient identity='b@example.com'/>"), 501),
        (data_xml(PARTIES + "<originator identity='c@example.com'/>"), 501),
        (data_xml(PARTIES + "<x/>"), 501),
        (data_xml(PARTIES + "text"), 501),
        (data_xml("<originator/><recipient identity='b@example.com'/>"), 501),
        (data_xml("<originator identity='a@example.com'/><recipient/>"), 501),
        (data_xml(PARTIES + "<data-content Name='C'/><data-content Name='C'/>", "#C"), 501),
        (data_xml(PARTIES + "<data-content Name='C'/>", "#D"), 501),
        (data_xml(PARTIES + "<data-content/>", "#C"), 501),
        (data_xml(PARTIES, "#C"), 501),
        (data_xml(PARTIES + "<data-content Name='1C'/>", "#1C"), 501),
        (data_xml(PARTIES + "<data-content Name='C'/>"), 501),
        (data_xml(PARTIES, "relative/path"), 501),
        (data_xml(PARTIES, ""), 501),
        (data_xml(PARTIES, "cid:1@example.com"), 501),  # no body part in this payload
        (
            data_xml(
                "<originator identity='a@example.com'><x/></originator>"
                "<recipient identity='b@example.com'/>"
            ),
            501,
        ),
        # Options: 501.
        (data_xml(PARTIES + "<option/>"), 501),
        (data_xml(PARTIES + "<option internal='' external=''/>"), 501),
        (data_xml(PARTIES + "<option internal='a' external='http://x/'/>"), 501),
        (data_xml(PARTIES + "<option internal='a b'/>"), 501),
        (data_xml(PARTIES + "<option external='relative'/>"), 501),
        (data_xml(PARTIES + "<option internal='a' targetHop='next'/>"), 501),
        (data_xml(PARTIES + "<option internal='a' mustUnderstand='yes'/>"), 501),
        (data_xml(PARTIES + "<option internal='a' transID='0'/>"), 501),
        # Bounded counts: 553.
        (data_xml(PARTIES + "<option internal='a'/>" * 65), 553),
        (
            data_xml(
                "<originator identity='a@example.com'/>"
                + "<recipient identity='b@example.com'/>" * (MAX_RECIPIENTS + 1)
            ),
            553,
        ),
    ],
)
def test_malformed_xml(text: str, code: int | None) -> None:
    if code is None:
        decode(xml(text))
    else:
        expect(code, xml(text))


def test_too_big() -> None:
    expect(500, xml("<error code='500'>" + "x" * wire.MAX_XML + "</error>"))


def test_payload_forms_refused() -> None:
    expect(500, Message(b"<ok/>", "text/xml"))
    expect(500, Message(b"<ok/>"))  # no Content-Type: application/octet-stream (RFC 3080)
    expect(
        504,
        Message(
            b"PG9rLz4=",
            headers=[("Content-Type", BEEP_XML), ("Content-Transfer-Encoding", "base64")],
        ),
    )


MP = 'multipart/related; boundary="xyz"; type="application/beep+xml"'
CONTROL = (
    b"Content-Type: application/beep+xml\r\n\r\n<data content='cid:1@example.com'>"
    b"<originator identity='a@example.com'/><recipient identity='b@example.com'/></data>"
)


@pytest.mark.parametrize(
    ("content_type", "body", "code"),
    [
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1 + b"\r\n--xyz--", None),
        (MP, b"preamble\r\n--xyz\r\n" + CONTROL + b"\r\n--xyz \t\r\n" + PART_1 + b"\r\n--xyz--\r\n",
         None),
        # The epilogue is ignored, delimiters and all.
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1 + b"\r\n--xyz--\r\n--xyz\r\nmore",
         None),
        # No closing delimiter.
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1, 500),
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1 + b"\r\n--xyz", 500),
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1 + b"\r\n--xyz\r\n", 500),
        # No delimiter at all, no parts, a line that only starts like a delimiter.
        (MP, CONTROL, 500),
        (MP, b"--xyz--", 500),
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyzx\r\n" + PART_1 + b"\r\n--xyz--", 500),
        (MP, b"--xyzjunk", 500),
        # Boundary parameter missing or invalid; type not beep+xml.
        ("multipart/related", b"--xyz\r\n" + CONTROL + b"\r\n--xyz--", 500),
        ('multipart/related; boundary=""', b"--\r\n" + CONTROL + b"\r\n----", 500),
        ('multipart/related; boundary="a\\"b"', b"", 500),
        ("multipart/related; boundary=" + "x" * 71, b"", 500),
        ('multipart/related; boundary="xyz"; type="text/xml"',
         b"--xyz\r\n" + CONTROL + b"\r\n--xyz--", 500),
        # A part without the blank line ending its headers, or with bad headers.
        (MP, b"--xyz\r\nContent-Type: application/beep+xml\r\n--xyz--", 500),
        (MP, b"--xyz\r\nnot a header\r\n\r\n<ok/>\r\n--xyz--", 500),
        # The control part is not application/beep+xml, or is transfer-encoded.
        (MP, b"--xyz\r\n\r\n<ok/>\r\n--xyz--", 500),
        (MP, b"--xyz\r\nContent-Type: text/plain\r\n\r\n<ok/>\r\n--xyz--", 500),
        (MP, b"--xyz\r\nContent-Type: application/beep+xml\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\nPG9rLz4=\r\n--xyz--", 504),
        # A cid that matches no part; a start that matches no part; duplicate Content-IDs.
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1.replace(b"<1@", b"<2@")
         + b"\r\n--xyz--", 501),
        ('multipart/related; boundary="xyz"; start="<nope>"',
         b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1 + b"\r\n--xyz--", 501),
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1 + b"\r\n--xyz\r\n" + PART_1
         + b"\r\n--xyz--", 501),
        # Parts that nothing references.
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n" + PART_1
         + b"\r\n--xyz\r\n\r\nextra\r\n--xyz--", 501),
        (MP, b"--xyz\r\nContent-Type: application/beep+xml\r\n\r\n<ok/>\r\n--xyz\r\n"
         + PART_1 + b"\r\n--xyz--", 501),
        # Too many parts; as many as may be are only unreferenced.
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n\r\nx" * MAX_PARTS + b"\r\n--xyz--", 553),
        (MP, b"pre\r\n--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n\r\nx" * MAX_PARTS + b"\r\n--xyz--",
         553),
        (MP, b"--xyz\r\n" + CONTROL + b"\r\n--xyz\r\n\r\nx" * (MAX_PARTS - 1) + b"\r\n--xyz--",
         501),
    ],
)  # fmt: skip
def test_malformed_multipart(content_type: str, body: bytes, code: int | None) -> None:
    message = Message(body, content_type)
    if code is None:
        data = decode(message)
        assert isinstance(data, Data) and data.content is not None
        assert data.content.raw == PART_1
    else:
        expect(code, message)


def test_other_elements_in_multipart() -> None:
    """§4.1 allows any element as the start part; only data references another part."""
    message = Message(
        b"--xyz\r\nContent-Type: application/beep+xml\r\n\r\n<terminate transID='3'/>\r\n--xyz--",
        MP,
    )
    assert decode(message) == Terminate(3)


def test_inline_content_in_multipart() -> None:
    message = Message(
        b"--xyz\r\nContent-Type: application/beep+xml\r\n\r\n"
        + data_xml(PARTIES + "<data-content Name='C'><x/></data-content>", "#C").encode()
        + b"\r\n--xyz--",
        MP,
    )
    data = decode(message)
    assert isinstance(data, Data) and data.content is not None
    assert data.content.body == b"<x/>"
    assert encode(data).content_type == BEEP_XML


# --------------------------------------------------------------------------- properties

TOKEN = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/@\ufffe\uffff"),
    min_size=1,
    max_size=12,
)
DOMAIN = st.sampled_from(["example.com", "rubble.com", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
IDENTITY = st.builds(
    lambda a, s, d: f"{a}/{s}@{d}" if s else f"{a}@{d}", TOKEN, st.none() | TOKEN, DOMAIN
)
# XML 1.0 characters, without CR (line-end normalisation) where text is parsed back.
XML_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffe\uffff\r").filter(
        lambda c: c >= " " or c in "\t\n"
    ),
    max_size=20,
)
XML_RAW_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffe\uffff").filter(
        lambda c: c >= " " or c in "\t\n\r"
    ),
    max_size=20,
)
BODY = st.one_of(
    st.just(""),
    st.builds(lambda t, a: f"<x a={quoteattr(a)}>{escape(t)}</x>", XML_RAW_TEXT, XML_TEXT),
    st.just("<dataHopping noMoreThan='2' reportErrors='true' />"),
)
OPTION = st.builds(
    Option,
    name=st.from_regex(r"[A-Za-z0-9_.:-]{1,12}", fullmatch=True),
    external=st.just(False),
    target_hop=st.sampled_from(["this", "final", "all"]),
    must_understand=st.booleans(),
    trans_id=st.integers(0, 2147483647),
    localize=st.none() | st.sampled_from(["en", "i-default", "en fr", ""]),
    body=BODY,
) | st.builds(
    Option,
    name=st.from_regex(r"https?://[a-z]{1,8}\.example/[a-z0-9#]{0,8}", fullmatch=True),
    external=st.just(True),
)
OPTIONS = st.lists(OPTION, max_size=3)
# Content octets that try to look like MIME structure.
CONTENT_BYTES = st.lists(
    st.one_of(
        st.binary(max_size=16),
        st.sampled_from(
            [b"\r\n", b"--", b"boundary", b"\r\n--boundary", b"\r\n--boundary--", b"--apex-",
             b"\r\n--apex-", b"\r\n\r\n", b"Content-ID: <1@example.com>\r\n", b"\x00", b"\r"]
        ),
    ),
    max_size=12,
).map(b"".join)  # fmt: skip
MEDIA = st.sampled_from(["image/gif", "text/plain; charset=utf-8", "application/octet-stream"])
PART_CONTENT = st.builds(Content.from_bytes, CONTENT_BYTES, MEDIA)
INLINE_CONTENT = st.builds(
    lambda t, a, name: Content.inline_xml(f"\r\n <x a={quoteattr(a)}>{escape(t)}</x>\n", name),
    XML_RAW_TEXT,
    XML_TEXT,
    st.sampled_from(["Content", "C", "x.y-z", "été"]),
)
DATA = st.builds(
    Data,
    originator=st.builds(Originator, IDENTITY, OPTIONS),
    recipients=st.lists(st.builds(Recipient, IDENTITY, OPTIONS), min_size=1, max_size=4),
    options=OPTIONS,
    content=st.one_of(PART_CONTENT, INLINE_CONTENT),
)
DIAGNOSTIC = XML_TEXT.map(str.strip)
ELEMENT = st.one_of(
    st.builds(Attach, IDENTITY, st.integers(1, 2147483647), OPTIONS),
    st.builds(
        Bind, st.sampled_from(["example.com", "[10.0.0.1]"]), st.integers(1, 2**31 - 1), OPTIONS
    ),
    st.builds(
        Terminate,
        st.integers(0, 2**31 - 1),
        st.integers(100, 599),
        DIAGNOSTIC,
        st.none() | st.just("en"),
    ),
    st.just(OK()),
    st.builds(Error, st.integers(100, 599), DIAGNOSTIC, st.none() | st.just("fr")),
    DATA,
)


def wire_trip(message: Message) -> Message:
    return Message.from_payload(message.to_payload())


@SETTINGS
@given(ELEMENT)
def test_round_trip(element: wire.APEXElement) -> None:
    assert decode(wire_trip(encode(element))) == element


@SETTINGS
@given(DATA, st.lists(st.builds(Recipient, IDENTITY, OPTIONS), min_size=1, max_size=3), OPTIONS)
def test_content_is_byte_identical(data: Data, recipients: list[Recipient], options) -> None:
    """decode(encode(decode(x))) carries the same content octets, whatever the envelope."""
    first = decode(wire_trip(encode(data)))
    assert isinstance(first, Data) and first.content is not None and data.content is not None
    assert first.content.raw == data.content.raw
    changed = dataclasses.replace(first, recipients=recipients, options=first.options + options)
    second = decode(wire_trip(encode(changed)))
    assert isinstance(second, Data) and second.content is not None
    assert second.content.raw == data.content.raw
    assert second.content.body == data.content.body
    assert second.recipients == recipients


@SETTINGS
@given(CONTENT_BYTES, st.sampled_from(["boundary", "b", "apex-0", "=_x"]))
def test_received_part_survives_forwarding(body: bytes, boundary: str) -> None:
    """A part received in someone else's multipart goes on byte for byte."""
    part = b"Content-Type: application/octet-stream\r\nContent-ID: <1@example.com>\r\n\r\n" + body
    delimiter = b"\r\n--" + boundary.encode()
    assume(delimiter not in b"\r\n" + part)
    data = decode(multipart(DATA_CID, part, boundary=boundary))
    assert isinstance(data, Data) and data.content is not None
    assert data.content.raw == part
    forwarded = decode(wire_trip(encode(dataclasses.replace(data, options=[Option("x")]))))
    assert isinstance(forwarded, Data) and forwarded.content is not None
    assert forwarded.content.raw == part


# --------------------------------------------------------------------------- junk never escapes


def decode_junk(message: Message) -> None:
    """Junk gives APEXError; anything that decodes must encode and decode to the same."""
    try:
        element = decode(message)
    except APEXError as e:
        assert e.code in (500, 501, 504, 553)
        return
    assert decode(wire_trip(encode(element))) == element


@SETTINGS
@given(st.binary(max_size=200))
def test_junk_xml(body: bytes) -> None:
    decode_junk(Message(body, BEEP_XML))


VOCABULARY = st.sampled_from(
    [
        "<data content='#C'>", "<data content='cid:1@example.com'>", "<data content='x:y'>",
        "</data>", "<originator identity='a@example.com'/>", "<originator identity='a'>",
        "</originator>", "<recipient identity='b@example.com'/>", "<recipient identity='b@x'>",
        "</recipient>", "<option internal='dataHopping' targetHop='all'>", "<option internal='o'/>",
        "<option external='http://x/'/>", "</option>", "<data-content Name='C'>",
        "<data-content Name='C'/>", "</data-content>", "<attach endpoint='a@b.c' transID='1'>",
        "</attach>", "<bind relay='b.c' transID='2'/>", "<terminate>", "</terminate>", "<ok/>",
        "<error code='550'>", "</error>", "text", " ", "\r\n", "&amp;", "<![CDATA[x]]>",
        "<!-- c -->", "<?pi x?>", "'", '"', ">", "<", "/>",
    ]
)  # fmt: skip


@SETTINGS
@given(st.lists(VOCABULARY, max_size=14).map("".join))
def test_junk_apex_xml(text: str) -> None:
    decode_junk(xml(text))
    decode_junk(multipart(text, PART_1))


@SETTINGS
@given(st.text(max_size=100), st.binary(max_size=200))
def test_junk_multipart_header(content_type: str, body: bytes) -> None:
    try:
        message = Message(body, "multipart/related; " + content_type)
    except MessageError:
        return
    decode_junk(message)


PAYLOADS = [
    crlf(RFC_4_1_MULTIPART),
    b"Content-Type: application/beep+xml\r\n\r\n" + crlf(RFC_4_1_INLINE),
    encode(decode(multipart(DATA_HOPPING, PART_1))).to_payload(),
]


# Slices of a payload to replace by junk: where, how long, and the junk.
EDITS = st.lists(
    st.tuples(st.integers(0, 2000), st.integers(0, 8), st.binary(max_size=8)), max_size=4
)


def mutated(payload: bytes, edits: list[tuple[int, int, bytes]]) -> Message | None:
    """``payload`` with ``edits`` made, as a message; None if it has no header block."""
    for at, length, junk in edits:
        at %= len(payload) + 1
        payload = payload[:at] + junk + payload[at + length :]
    try:
        return Message.from_payload(payload)
    except MessageError:
        return None


@SETTINGS
@given(st.sampled_from(PAYLOADS), EDITS)
def test_mutated_payloads(payload: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    """Payloads with slices replaced by junk give APEXError or something that round-trips."""
    message = mutated(payload, edits)
    if message is not None:
        decode_junk(message)


# -------------------------------------------------------------- multipart/related parameters

PARAM_PIECES = st.sampled_from(
    [
        "multipart/related", "Multipart/Related", " ", "\t", ";", "=", '"', "\\", "<", ">", "*",
        "*0", "boundary", "BOUNDARY", "Boundary", "start", "START", "type", "Type", "xyz",
        "application/beep+xml", "0@example.com", "é", "(", ")", "/", "@", ",", "?", ":", "'",
        "%41", "us-ascii''x", "\r\n ",
    ]
)  # fmt: skip


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ('multipart/related; boundary="xyz"; start="<0@example.com>"; type="application/beep+xml"',
         {"boundary": "xyz", "start": "0@example.com", "type": "application/beep+xml"}),
        ("multipart/related;boundary=xyz;type=x-y",
         {"boundary": "xyz", "type": "x-y"}),
        ('Multipart/Related ;\tBOUNDARY = "x y" ; Start= "<a>" ;TYPE ="t/s"  ',
         {"boundary": "x y", "start": "a", "type": "t/s"}),
        ('multipart/related; boundary=a; boundary=b; start=""; charset=utf-8',
         {"boundary": "a", "start": ""}),
        ('multipart/related; start="<>"; type="<t>"', {"start": "", "type": "t"}),
        ("multipart/related", {}),
    ],
)  # fmt: skip
def test_plain_multipart_parameters(content_type: str, expected: dict[str, str]) -> None:
    """Plainly written headers take the fast path, with email's answer (RFC 2045 §5.1)."""
    assert wire._plain_params(content_type) == expected
    assert wire._careful_params(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/related; boundary="a\\"b"',  # quoted-pair
        "multipart/related; boundary*=us-ascii''xyz",  # RFC 2231 encoded
        "multipart/related; boundary*0=x; boundary*1=yz",  # RFC 2231 continued
        "multipart/related; boundary=",  # empty value
        "multipart/related; boundary=xyz;",  # trailing separator
        "multipart/related; boundary",  # no value
        "multipart/related; start=<0@example.com>",  # tspecials in a token
        "multipart/related; type=application/beep+xml",  # "/" is one too
        'multipart/related; boundary="caf\u00e9"',  # not ASCII
        "multipart/related;\r\n boundary=xyz",  # folded
        "multipart; boundary=xyz",  # no subtype
        "",
    ],
)
def test_other_multipart_parameters_are_left_to_email(content_type: str) -> None:
    assert wire._plain_params(content_type) is None
    assert wire._content_type_params(content_type) == wire._careful_params(content_type)


SPACE = st.sampled_from(["", " ", "\t", "  "])
PARAMETER = st.tuples(
    SPACE,
    SPACE,
    st.sampled_from(["boundary", "BOUNDARY", "Start", "type", "charset", "b*", "x"]),
    SPACE,
    SPACE,
    st.one_of(
        st.text("abcXYZ019'*+-.^_`{|}~!#$%&", min_size=1, max_size=8),
        st.text("abc <>@/=;:,?()[]*'", max_size=8).map(lambda text: f'"{text}"'),
    ),
).map(lambda p: f"{p[0]};{p[1]}{p[2]}{p[3]}={p[4]}{p[5]}")


@SETTINGS
@given(
    st.one_of(
        st.tuples(
            st.sampled_from(["multipart/related", " Multipart/RELATED"]), st.lists(PARAMETER)
        ).map(lambda t: t[0] + "".join(t[1])),
        st.lists(PARAM_PIECES, max_size=16).map("".join),
    )
)
def test_plain_multipart_parameters_agree_with_email(content_type: str) -> None:
    """Whatever the fast path answers, email would have answered too."""
    plain = wire._plain_params(content_type)
    if plain is not None:
        assert plain == wire._careful_params(content_type)


def test_plain_multipart_parameters_refuse_what_email_refuses() -> None:
    body = b"--xyz\r\n" + CONTROL + b"\r\n--xyz--"
    for content_type in (
        'multipart/related; boundary="xyz"; type="text/xml"',
        "multipart/related; boundary=" + "x" * 71,
        'multipart/related; type="application/beep+xml"',
    ):
        assert wire._plain_params(content_type) is not None
        expect(500, Message(body, content_type))


@SETTINGS
@given(st.text(alphabet=st.sampled_from("ab@.'\"&<>\n\r\t \u00e9"), max_size=12) | st.text())
def test_attribute_values_quoted_as_quoteattr_does(value: str) -> None:
    assert wire._attr(value) == quoteattr(value)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["barney@rubble.com", "wilma/x'y\"z&<>@rubble.com", "é@bücher.de"]),
            st.integers(100, 599),
            st.text(max_size=20),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_status_response_content_is_what_inline_xml_makes(
    destinations: list[tuple[str, int, str]],
) -> None:
    """Reports skip inline_xml's well-formedness check; they must not need it."""
    response = StatusResponse(7, destinations)
    data = status_response_data("rubble.com", "fred@example.com", response)
    assert data.content == Content.inline_xml(encode_status_response(response))
    again = decode(encode(data))
    assert isinstance(again, Data) and again.content is not None
    assert decode_status_response(again.content.body).trans_id == 7


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("<option internal='o' transID='7'><x a='1' /></option>",
         Option("o", trans_id=7, body="<x a='1' />")),
        ("<option external='urn:x:y' targetHop='all' mustUnderstand='true' />",
         Option("urn:x:y", external=True, target_hop="all", must_understand=True)),
        ("<option internal='o' targetHop='next' />", 501),
        ("<option internal='o' transID='0x1' />", 501),
        ("<option />", 501),
    ],
)  # fmt: skip
def test_option_elements_are_read_alike_remembered_or_not(
    option: str, expected: Option | int
) -> None:
    """A relay remembers the options it has read; an option reads the same wherever it
    stands and however often it comes, and a bad one is refused every time."""
    xml = (
        f"<data content='http://example.com/c'><originator identity='a@b.example'>{option}"
        f"</originator><recipient identity='c@d.example'>{option}</recipient>{option}</data>"
    )
    for _ in range(2):
        message = Message(xml.encode(), BEEP_XML)
        if isinstance(expected, int):
            expect(expected, message)
        else:
            data = decode(message)
            assert isinstance(data, Data)
            assert data.originator.options == data.recipients[0].options == data.options
            assert data.options == [expected]


def test_options_remembered_are_bounded() -> None:
    for n in range(wire._OPTIONS_READ_LIMIT + 10):
        xml = (
            "<data content='http://example.com/c'><originator identity='a@b.example' />"
            f"<recipient identity='c@d.example' /><option internal='o{n}' /></data>"
        )
        data = decode(Message(xml.encode(), BEEP_XML))
        assert isinstance(data, Data) and data.options[0].name == f"o{n}"
    assert len(wire._OPTIONS_READ) <= wire._OPTIONS_READ_LIMIT


# --------------------------------------------------------------------------- handing data on

HOPS = "<option internal='dataHopping' targetHop='all' mustUnderstand='true' transID='3'>" \
    "<dataHopping noMoreThan='{}' reportErrors='false' /></option>"  # fmt: skip
PARTIES = "<originator identity='a@b.example' /><recipient identity='c@d.example' />"


@pytest.mark.parametrize(
    "message",
    [
        # the forms relays and clients write: options together, or none
        multipart(f"<data content='cid:1@example.com'>{PARTIES}</data>", PART_1),
        multipart(f"<data content='cid:1@example.com'>{PARTIES}{HOPS.format(9)}</data>", PART_1),
        multipart(
            f"<data content='cid:1@example.com'>\n  {PARTIES}\n  {HOPS.format(9)}\n"
            "  <option internal='o' targetHop='final' />\n</data>",
            PART_1,
        ),
        xml(f"<data content='#C'>{PARTIES}<data-content Name='C'><x>y</x></data-content></data>"),
        xml(f"<data content='#C'>{PARTIES}{HOPS.format(9)}<data-content Name='C' /></data>"),
        xml(f"<data content='http://example.com/c'>{PARTIES}{HOPS.format(9)}</data>"),
        # the control document as the second part, named by start (RFC 2387 §3.2)
        Message(
            b"preamble\r\n--zz\r\n" + PART_1 + b"\r\n--zz\r\nContent-Type: application/beep+xml"
            b"\r\nContent-ID: <0@example.com>\r\n\r\n<data content='cid:1@example.com'>"
            + PARTIES.encode()
            + HOPS.format(9).encode()
            + b"</data>  \r\n--zz--\r\nepilogue",
            'multipart/related; boundary=zz; start="<0@example.com>"; type="application/beep+xml"',
        ),
    ],
)
def test_a_data_handed_on_with_new_options_keeps_every_other_octet(message: Message) -> None:
    """RFC 3342 §4: a relay counts the hop limit down as it hands a data on; the rest of
    the control document and the content go on as the octets they came as (§4.4.4.1)."""
    data, received = wire.decode_received(message)
    assert isinstance(data, Data) and data == decode(message)
    assert received is not None and received.data is data
    options = with_data_hopping(data.options, 8, 3)
    onward = Data(data.originator, data.recipients, options, data.content_ref, data.content)
    sent = wire.encode_onward(onward, received)
    assert decode(sent) == onward
    assert sent.headers == message.headers
    body = message.body
    assert sent.body.startswith(body[: received.options_at])
    assert sent.body.endswith(body[received.options_end :])
    assert b"noMoreThan='8'" in sent.body[received.options_at :]


def test_a_data_whose_options_lie_apart_is_written_anew() -> None:
    message = multipart(
        "<data content='cid:1@example.com'><option internal='o' />"
        f"{PARTIES}<option internal='p' /></data>",
        PART_1,
    )
    data, received = wire.decode_received(message)
    assert isinstance(data, Data) and received is None
    sent = wire.encode_onward(data, received)
    assert decode(sent) == data
    assert sent.header("Content-Type") != message.header("Content-Type")


@pytest.mark.parametrize(
    "change",
    [
        lambda d: dataclasses.replace(d, recipients=[Recipient("c@d.example")]),
        lambda d: dataclasses.replace(d, originator=Originator("a@b.example")),
        lambda d: dataclasses.replace(d, options=[Option("o", body="<x>\r\n--boundary</x>")]),
    ],
)
def test_a_data_changed_beyond_its_options_is_written_anew(
    change: Callable[[Data], Data],
) -> None:
    """Other recipients or parties, or options that hold a line break (which could end a
    body part), take encode's way."""
    message = multipart(f"<data content='cid:1@example.com'>{PARTIES}</data>", PART_1)
    data, received = wire.decode_received(message)
    assert isinstance(data, Data) and received is not None
    onward = change(data)
    sent = wire.encode_onward(onward, received)
    assert decode(sent) == onward
    assert sent.header("Content-Type") != message.header("Content-Type")


def test_elements_other_than_data_have_no_received_form() -> None:
    element, received = wire.decode_received(xml("<ok />"))
    assert element == OK() and received is None


@SETTINGS
@given(DATA, OPTIONS)
def test_a_data_handed_on_reads_as_the_data_written_anew(data: Data, options: list[Option]) -> None:
    """Whatever a data holds, handing it on with other options by encode_onward gives what
    encode would have: the same data, the same content octets."""
    received_data, received = wire.decode_received(wire_trip(encode(data)))
    assert isinstance(received_data, Data) and received is not None
    onward = dataclasses.replace(received_data, options=options)
    sent = decode(wire_trip(wire.encode_onward(onward, received)))
    assert sent == decode(wire_trip(encode(onward))) == dataclasses.replace(data, options=options)


# --------------------------------------------------------------- data as imxp writes it


def both_ways(
    message: Message,
) -> tuple[wire.APEXElement | APEXError, Data | None, list[int], list[int]]:
    """What the general reading and the reading of data as imxp writes it make of
    ``message``, with where each found the per-data options."""
    content_type = message.header("Content-Type") or ""
    general_where: list[int] = []
    written_where: list[int] = []
    # First: the general way remembers the options it reads.
    general: wire.APEXElement | APEXError
    if content_type == BEEP_XML:
        written = wire._report_as_written(message.body, written_where)
        try:
            general = wire._element(message.body, wire._NO_PARTS, general_where)
        except APEXError as e:
            general = e
    else:
        written = wire._as_written(message.body, content_type, written_where)
        try:
            general = wire._multipart(message.body, content_type, general_where)
        except APEXError as e:
            general = e
    return general, written, general_where, written_where


def assert_read_alike(message: Message) -> Data | None:
    """The reading of data as written, when it reads ``message`` at all, reads it as the
    general one does: the same data, content, boundary and options' place."""
    general, written, general_where, written_where = both_ways(message)
    if written is not None:
        assert isinstance(general, Data), general
        assert written == general
        assert written.content is not None and general.content is not None
        assert written.content.boundary == general.content.boundary
        assert written_where == general_where
    return written


STATUS_REQUEST = Option("statusRequest", target_hop="final", trans_id=7)
AS_SENT = [
    Data(Originator("fred@a.example"), [Recipient("barney@b.example")]),
    Data(
        Originator("fred/appl=im@a.example"),
        [Recipient("barney@b.example"), Recipient("wilma@c.example"), Recipient("[192.0.2.1]@x")],
        [STATUS_REQUEST],
    ),
    Data(
        Originator("fred@a.example"),
        [Recipient("barney@b.example")],
        with_data_hopping([STATUS_REQUEST], 15, 7, report_errors=True),
    ),
]


def as_sent(data: Data, content: bytes = b"hello\r\n") -> Message:
    """``data`` with a body part of ``content``, as a client or relay sends it."""
    part = Content.from_bytes(content, "text/plain; charset=utf-8")
    return wire_trip(encode(dataclasses.replace(data, content=part)))


@pytest.mark.parametrize("data", AS_SENT)
def test_data_as_imxp_writes_it_is_read_without_the_xml_parser(data: Data) -> None:
    """Every data a client or relay sends takes the short way, once its options were read
    (as the first data that carries them is), and reads as the general way reads it."""
    message = as_sent(data)
    decode(message)  # the options' first reading
    written = assert_read_alike(message)
    assert written is not None
    assert dataclasses.replace(written, content=None, content_ref="") == dataclasses.replace(
        data, content=None, content_ref=""
    )
    assert wire.decode_received(message)[1] is not None


def test_data_handed_on_by_a_relay_is_read_without_the_xml_parser() -> None:
    data, received = wire.decode_received(as_sent(AS_SENT[2]))
    assert isinstance(data, Data)
    options = with_data_hopping(data.options, 14, 7, report_errors=True)
    onward = wire_trip(wire.encode_onward(dataclasses.replace(data, options=options), received))
    decode(onward)
    assert assert_read_alike(onward) is not None


def test_options_never_read_before_go_the_general_way() -> None:
    unheard = Option("neverSeenBefore", trans_id=12345, body="<x y='1' />")
    message = as_sent(dataclasses.replace(AS_SENT[0], options=[unheard]))
    assert both_ways(message)[1] is None
    decode(message)
    assert assert_read_alike(message) is not None


def start_id(message: Message) -> bytes:
    return (message.header("Content-Type") or "").split('start="<')[1].split(">")[0].encode()


def content_id(message: Message) -> bytes:
    return message.body.split(b'content="cid:')[1].split(b'"')[0]


def written_otherwise(message: Message, old: bytes, new: bytes) -> Message:
    assert old in message.body
    return Message(message.body.replace(old, new, 1), headers=message.headers)


# Rewritings of a data as imxp writes it; {B} stands for its boundary.
WRITTEN_OTHERWISE = [
    # content holding the boundary delimiter: a third part, and a refusal
    (b"hello", b"he\r\n--{B}\r\nllo"),
    (b"hello", b"he\r\n--{B}--llo"),
    (b"\r\n\r\nhello", b"\r\n\r\n--{B}hello"),
    # content whose headers start with the boundary, right after a delimiter's CRLF
    (b"\r\nContent-Type: text/plain", b"\r\n--{B}x: y\r\nContent-Type: text/plain"),
    # a content reference naming no part, written with an escape, or with a fragment
    (b'content="cid:', b'content="cid:x'),
    (b'@apex.invalid"', b'%40apex.invalid"'),
    (b'@apex.invalid"', b'@apex.invalid#x"'),
    # attribute values with references
    (b'identity="fred', b'identity="&#102;red'),
    (b'identity="barney', b'identity="&amp;barney'),
    # an identity that is no endpoint
    (b"barney@b.example", b"barney@@b.example"),
    # no originator, or the parties out of order
    (b'<originator identity="fred/appl=im@a.example" />', b""),
    (b'<originator identity="fred/appl=im@a.example" />', b'<recipient identity="x@y.example" />'
     b'<originator identity="fred/appl=im@a.example" />'),
    # text where none may be, or outside the document
    (b"</data>", b"x</data>"),
    (b"</data>", b"</data>x"),
    (b"</data>", b"</datx>"),
    # a preamble, an epilogue, padding after a delimiter
    (b"--{B}\r\nContent-Type: a", b"preamble\r\n--{B}\r\nContent-Type: a"),
    (b"\r\n--{B}--", b"\r\n--{B}--\r\nepilogue"),
    (b"--{B}\r\nContent-Type: t", b"--{B} \r\nContent-Type: t"),
    # the parts' headers otherwise
    (b"Content-Type: text/plain", b"Content-Type:\xfftext/plain"),
    (b"Content-Type: application/beep+xml\r\n", b"Content-Type: application/beep+xml\r\nX: y\r\n"),
    # the content's headers otherwise: its Content-ID elsewhere or written otherwise, a
    # header Message reads otherwise than as it stands (folded, tab, not ASCII), or none
    (b"Content-Type: text/plain; charset=utf-8\r\n", b""),
    (b"Content-Type: text/plain; charset=utf-8\r\n", b"X: y\r\nContent-Type: text/plain\r\n"),
    (b"utf-8\r\nContent-ID: <", b"utf-8\r\nContent-Id: <"),
    (b"utf-8\r\nContent-ID: <", b"utf-8\r\nContent-ID:  <"),
    (b">\r\nContent-Transfer-Encoding", b"> \r\nContent-Transfer-Encoding"),
    (b"Content-Transfer-Encoding: binary", b"Content-Transfer-Encoding:\tbinary"),
    (b"Content-Transfer-Encoding: binary", b"Content-Transfer-Encoding:\r\n binary"),
    (b"Content-Transfer-Encoding: binary", b"Content-Transfer-Encoding : binary"),
    (b"Content-Transfer-Encoding: binary", b"X-Name: caf\xc3\xa9"),
    (b"binary\r\n\r\nhello", b"binary\r\nhello"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new"), WRITTEN_OTHERWISE)
def test_data_written_otherwise_goes_the_general_way(old: bytes, new: bytes) -> None:
    """Whatever differs from the form imxp writes, refused or not by the general way, is
    left to it."""
    message = as_sent(AS_SENT[1])
    decode(message)
    boundary = (message.header("Content-Type") or "").split('"')[1].encode()
    old, new = old.replace(b"{B}", boundary), new.replace(b"{B}", boundary)
    general, written, _, _ = both_ways(written_otherwise(message, old, new))
    assert written is None, general


def test_more_options_than_a_data_may_have_go_the_general_way() -> None:
    options = [Option(f"o{n}", trans_id=n + 1) for n in range(wire.MAX_OPTIONS + 1)]
    message = as_sent(dataclasses.replace(AS_SENT[0], options=options))
    for option in options:  # each read before, as the only option of a data
        decode(as_sent(dataclasses.replace(AS_SENT[0], options=[option])))
    general, written, _, _ = both_ways(message)
    assert written is None and isinstance(general, APEXError) and general.code == 553


def test_more_recipients_than_a_data_may_have_go_the_general_way() -> None:
    recipients = [Recipient(f"r{n}@b.example") for n in range(MAX_RECIPIENTS + 1)]
    message = as_sent(dataclasses.replace(AS_SENT[0], recipients=recipients))
    general, written, _, _ = both_ways(message)
    assert written is None and isinstance(general, APEXError) and general.code == 553


def test_content_headers_longer_than_a_header_block_may_be_go_the_general_way() -> None:
    """Message reads no header block whose blank line is past MAX_HEADER_BLOCK."""

    def with_header_of(octets: int) -> Message:
        header = [("X-Long", "a" * octets)]
        content = Content.from_bytes(b"hello", "text/plain", headers=header)
        return wire_trip(encode(dataclasses.replace(AS_SENT[0], content=content)))

    general, written, _, _ = both_ways(with_header_of(wire.MAX_HEADER_BLOCK))
    assert written is None and isinstance(general, APEXError) and general.code == 500
    assert assert_read_alike(with_header_of(wire.MAX_HEADER_BLOCK - 200))


def test_content_named_as_the_control_document_goes_the_general_way() -> None:
    message = as_sent(AS_SENT[0])
    decode(message)
    changed = Message(
        message.body.replace(content_id(message), start_id(message)), headers=message.headers
    )
    general, written, _, _ = both_ways(changed)
    assert written is None and isinstance(general, APEXError)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"; start="<', '";  start="<'),
        ("multipart/related;", "Multipart/Related;"),
        ('type="application/beep+xml"', 'type="application/beep+xml"; charset=utf-8'),
        ('boundary="', 'boundary="x'),
    ],
)
def test_content_types_written_otherwise_go_the_general_way(old: str, new: str) -> None:
    message = as_sent(AS_SENT[0])
    decode(message)
    content_type = message.header("Content-Type") or ""
    assert old in content_type
    changed = Message(message.body, content_type.replace(old, new, 1))
    assert both_ways(changed)[1] is None


def test_a_start_written_with_a_quoted_pair_goes_the_general_way() -> None:
    """RFC 822's quoted-pair: email reads start="<\\\\x>" as "\\x", which names no part here."""
    message = as_sent(AS_SENT[0])
    decode(message)
    start = start_id(message)
    changed = Message(
        message.body.replace(start, b"\\\\" + start),
        (message.header("Content-Type") or "").replace(start.decode(), "\\\\" + start.decode()),
    )
    general, written, _, _ = both_ways(changed)
    assert written is None and isinstance(general, APEXError)


@SETTINGS
@given(st.sampled_from(range(len(AS_SENT))), CONTENT_BYTES, EDITS)
def test_data_as_written_and_mutated_is_read_alike_both_ways(
    which: int, content: bytes, edits: list[tuple[int, int, bytes]]
) -> None:
    """The short way never takes what the general way refuses, nor reads anything
    otherwise: payloads as imxp writes them, with slices replaced by junk."""
    message = as_sent(AS_SENT[which], content)
    decode(message)
    changed = mutated(message.to_payload(), edits)
    if changed is not None:
        assert_read_alike(changed)


@SETTINGS
@given(DATA)
def test_any_data_is_read_alike_both_ways(data: Data) -> None:
    """Whatever parties, options and content a data has, both ways read it alike."""
    message = wire_trip(encode(data))
    if isinstance(data.content, Content) and data.content.kind == "part":
        decode(message)
        assert_read_alike(message)


# --------------------------------------------------------------- reports as imxp writes them

REPORTS = [
    StatusResponse(1, [("barney@b.example", 250, "")]),
    StatusResponse(2147483647, [("barney@b.example", 250, "relayed to b.example via [::1]:912")]),
    StatusResponse(
        7,
        [
            ("barney@b.example", 550, "unknown endpoint identity"),
            ("wilma/appl=im@b.example", 451, "endpoint's session was lost; outcome unknown"),
            ("[192.0.2.1]@x", 450, 'no route to x: "no such domain"'),
        ],
    ),
]


def report(response: StatusResponse, options: list[Option] | None = None) -> Message:
    """The report service's data carrying ``response`` to fred, as a relay hands it on."""
    data = status_response_data("b.example", "fred@a.example", response)
    return wire_trip(encode(dataclasses.replace(data, options=options or [])))


@pytest.mark.parametrize("hopping", [False, True])
@pytest.mark.parametrize("response", REPORTS)
def test_reports_as_imxp_writes_them_are_read_without_the_xml_parser(
    response: StatusResponse, hopping: bool
) -> None:
    """The report that comes back for each data a client sends takes the short way, and
    reads as the general way reads it: content and all."""
    message = report(response, with_data_hopping([], 15, 3) if hopping else None)
    decode(message)
    written = assert_read_alike(message)
    assert written is not None and written.content is not None
    assert decode_status_response(written.content.body) == response
    assert wire.decode_received(message)[1] is not None


# Rewritings of a report as imxp writes it.
REPORTS_WRITTEN_OTHERWISE = [
    (b"<data ", b"<?xml version='1.0'?><data "),
    (b"</data>", b"</data>\n"),
    (b'content="#Content"', b'content="#Other"'),
    (b'Name="Content"', b'Name="Other"'),
    (b"unknown endpoint", b"unknown &amp; endpoint"),
    (b"unknown endpoint", b"unknown ]]> endpoint"),
    (b"unknown endpoint", b"unknown <x/> endpoint"),
    (b"unknown endpoint", b"unknown \xc3\xa9 endpoint"),
    (b"</reply>", b"</reply><x/>"),
    (b"</destination>", b"</destination> "),
    (b"code='550'", b"code='55'"),
    (b"transID='7'>", b"transID='7' >"),
    (b"transID='7'>", b"transID='<7'>"),
    (b'identity="fred@a.example"', b'identity="fred@@a.example"'),
    (b'identity="wilma', b'identity="wi&#108;ma'),
    (b'<recipient identity="fred@a.example" />', b""),
    (b"</statusResponse>", b"</statusresponse>"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new"), REPORTS_WRITTEN_OTHERWISE)
def test_reports_written_otherwise_go_the_general_way(old: bytes, new: bytes) -> None:
    message = report(REPORTS[2])
    decode(message)
    general, written, _, _ = both_ways(written_otherwise(message, old, new))
    assert written is None, general


def test_reports_longer_than_a_control_document_may_be_go_the_general_way() -> None:
    many = [(f"r{n}@b.example", 550, "unknown endpoint identity") for n in range(15000)]
    message = report(StatusResponse(1, many))
    assert len(message.body) > wire.MAX_XML
    general, written, _, _ = both_ways(message)
    assert written is None and isinstance(general, APEXError) and general.code == 500


@SETTINGS
@given(st.sampled_from(REPORTS), st.booleans(), EDITS)
def test_reports_as_written_and_mutated_are_read_alike_both_ways(
    response: StatusResponse, hopping: bool, edits: list[tuple[int, int, bytes]]
) -> None:
    message = report(response, with_data_hopping([], 15, 3) if hopping else None)
    decode(message)
    changed = mutated(message.to_payload(), edits)
    if changed is not None:
        assert_read_alike(changed)


@SETTINGS
@given(
    st.lists(st.tuples(IDENTITY, st.integers(100, 599), DIAGNOSTIC), min_size=1, max_size=3),
    st.integers(1, 2147483647),
    OPTIONS,
)
def test_any_report_is_read_alike_both_ways(
    destinations: list[tuple[str, int, str]], trans_id: int, options: list[Option]
) -> None:
    message = report(StatusResponse(trans_id, destinations), options)
    decode(message)
    assert_read_alike(message)
