"""The option framework (RFC 3340 §5), statusRequest (§5.1) and dataHopping (RFC 3342 §4)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imxp.apex import options
from imxp.apex.options import (
    KNOWN,
    DataHopping,
    applies,
    check_must_understand,
    data_hopping,
    forwarded,
    make_status_request,
    status_request,
    with_data_hopping,
)
from imxp.apex.wire import APEXError, Content, Data, Option, Originator, Recipient, decode, encode
from imxp.beep.message import Message

PART = Content.from_bytes(b"hello", "text/plain", content_id="1@example.com")


def data_with(*opts: Option) -> Data:
    return Data(
        Originator("fred@example.com"), [Recipient("barney@rubble.com")], list(opts), content=PART
    )


def receive(xml_text: str) -> Data:
    """A data element as a relay receives it, its content the body part cid:1@example.com."""
    body = (
        b"--xyz\r\nContent-Type: application/beep+xml\r\n\r\n"
        + xml_text.encode()
        + b"\r\n--xyz\r\n"
        + PART.raw
        + b"\r\n--xyz--"
    )
    data = decode(Message(body, 'multipart/related; boundary="xyz"; type="application/beep+xml"'))
    assert isinstance(data, Data)
    return data


# --------------------------------------------------------------------------- targetHop, §5


@pytest.mark.parametrize(
    ("target_hop", "final", "process", "forward"),
    [
        # "this": applies to this relay, and is removed before transmitting.
        ("this", False, True, False),
        # ... but a final relay removes no options as it transmits to the recipient.
        ("this", True, True, True),
        # "final": applies only where the relay transmits directly to the recipient.
        ("final", False, False, True),
        ("final", True, True, True),
        # "all": applies to this relay and is retained for the next.
        ("all", False, True, True),
        ("all", True, True, True),
    ],
)
def test_target_hop(target_hop: str, final: bool, process: bool, forward: bool) -> None:
    option = Option("x", target_hop=target_hop)
    assert applies(option, final=final) is process
    assert forwarded(option, final=final) is forward


def test_forwarded_defaults_to_an_intermediate_relay() -> None:
    assert not forwarded(Option("x", target_hop="this"))
    assert forwarded(Option("x", target_hop="all"))


# --------------------------------------------------------------------------- mustUnderstand, §5


def test_known() -> None:
    assert KNOWN == {"statusRequest", "dataHopping"}


def test_must_understand() -> None:
    unknown = Option("frobnicate", must_understand=True, target_hop="all")
    assert check_must_understand([unknown], final=False) is unknown
    # Consulted only if the option applies to this relay.
    at_final = dataclasses.replace(unknown, target_hop="final")
    assert check_must_understand([at_final], final=False) is None
    assert check_must_understand([at_final], final=True) is at_final
    # An unrecognised option without mustUnderstand is ignored.
    assert check_must_understand([Option("frobnicate", target_hop="all")], final=True) is None
    # Options we understand never fail, whatever their flags.
    known = [make_status_request(1, "all"), *with_data_hopping([], 3, 2)]
    assert check_must_understand(known, final=True) is None
    # External options are identified by URI; none is understood here.
    external = Option("http://example.com/opt", external=True, must_understand=True)
    assert check_must_understand([*known, external], final=True) is external
    # An external URI that happens to spell a registered name is still not that option.
    spoof = Option("statusRequest", external=True, must_understand=True)
    assert check_must_understand([spoof], final=True) is spoof
    # The first offender is reported.
    assert check_must_understand([unknown, external], final=True) is unknown


# --------------------------------------------------------------------------- statusRequest, §5.1


STATUS_REQUEST = """<data content='cid:1@example.com'>
       <originator identity='fred@example.com' />
       <recipient identity='barney@rubble.com' />
       <option internal='statusRequest' targetHop='final'
               mustUnderstand='true' transID='86' />
   </data>"""


def test_status_request_example() -> None:
    data = receive(STATUS_REQUEST)
    option = status_request(data.options)
    assert option == make_status_request(86)
    assert option is not None and option.trans_id == 86
    assert applies(option, final=True) and not applies(option, final=False)
    assert status_request([]) is None
    assert status_request([Option("statusRequest", external=True)]) is None


def test_make_status_request_round_trip() -> None:
    option = make_status_request(2147483647, target_hop="all")
    assert option.must_understand and option.target_hop == "all"
    again = decode(encode(data_with(option)))
    assert isinstance(again, Data) and status_request(again.options) == option


# --------------------------------------------------------------------------- dataHopping, RFC 3342


DATA_HOPPING = """<data content='cid:1@example.com'>
       <originator identity='appl=pubsub/topic=fred@example.com' />
       <recipient identity='barney@example.com' />
       <option internal='dataHopping' targetHop='all'
               mustUnderstand='true' transID='86'>
           <dataHopping noMoreThan='{}' reportErrors='true' />
       </option>
   </data>"""


def test_data_hopping_example() -> None:
    """RFC 3342 §4: relay #1 receives noMoreThan 2 and sends relay #2 noMoreThan 1."""
    received = receive(DATA_HOPPING.format(2))
    found = data_hopping(received.options)
    assert found is not None
    option, hopping = found
    assert hopping == DataHopping(2, True)
    assert (option.target_hop, option.must_understand, option.trans_id) == ("all", True, 86)
    # "Immediately prior to sending the data to the next relay ... reduced by 1."
    onward = dataclasses.replace(
        received,
        options=with_data_hopping(received.options, hopping.no_more_than - 1, option.trans_id),
    )
    sent = decode(encode(onward))
    assert isinstance(sent, Data)
    expected = receive(DATA_HOPPING.format(1))
    assert data_hopping(sent.options) == (sent.options[0], DataHopping(1, True))
    assert sent.options[0].trans_id == expected.options[0].trans_id == 86
    assert data_hopping(expected.options) == (expected.options[0], DataHopping(1, True))
    assert received.options[0].body.endswith("noMoreThan='2' reportErrors='true' />")  # unchanged


def test_data_hopping_defaults() -> None:
    """RFC 3342 §6: noMoreThan defaults to 0 (no limit), reportErrors to false."""
    empty = Option("dataHopping", target_hop="all", must_understand=True, trans_id=1)
    assert data_hopping([empty]) == (empty, DataHopping(0, False))
    bare = dataclasses.replace(empty, body="<dataHopping/>")
    assert data_hopping([bare]) == (bare, DataHopping(0, False))
    assert data_hopping([]) is None
    assert data_hopping([Option("dataHopping", external=True)]) is None


@pytest.mark.parametrize(
    "body",
    [
        "<dataHopping noMoreThan='256' />",
        "<dataHopping noMoreThan='-1' />",
        "<dataHopping noMoreThan='two' />",
        "<dataHopping noMoreThan='' />",
        "<dataHopping noMoreThan='0001' />",
        "<dataHopping reportErrors='yes' />",
        "<dataHopping><x/></dataHopping>",
        "<dataHopping>3</dataHopping>",
        "<dataTiming noLaterThan='5' />",
        "<dataHopping/><dataHopping/>",
        "junk",
        "<!DOCTYPE x [<!ENTITY e 'x'>]><dataHopping/>",
    ],
)
def test_bad_data_hopping(body: str) -> None:
    option = Option("dataHopping", target_hop="all", must_understand=True, trans_id=1, body=body)
    for _ in range(2):  # read bodies are cached; refused ones are refused every time
        with pytest.raises(APEXError) as info:
            data_hopping([option])
        assert info.value.code == 501


@pytest.mark.parametrize("padding", [0, 300])
def test_data_hopping_read_alike_cached_or_not(padding: int) -> None:
    """Short bodies are read once and remembered; long ones are read every time."""
    space = " " * (1 + padding)
    good = Option("dataHopping", body=f"<dataHopping noMoreThan='3'{space}reportErrors='true'/>")
    assert data_hopping([good]) == data_hopping([good]) == (good, DataHopping(3, True))
    bad = Option("dataHopping", body=f"<dataHopping noMoreThan='300'{space}/>")
    for _ in range(2):
        with pytest.raises(APEXError):
            data_hopping([bad])


def hopping(opts: list[Option]) -> DataHopping:
    found = data_hopping(opts)
    assert found is not None
    return found[1]


def test_with_data_hopping_adds() -> None:
    status = make_status_request(5)
    original = [status]
    result = with_data_hopping(original, 7, 42)
    assert original == [status]  # a new list
    assert result[0] is status
    added = result[1]
    assert (added.name, added.target_hop, added.must_understand, added.trans_id) == (
        "dataHopping",
        "all",
        True,
        42,
    )
    assert data_hopping(result) == (added, DataHopping(7, False))
    assert hopping(with_data_hopping([], 1, 1, report_errors=True)) == DataHopping(1, True)


def test_with_data_hopping_replaces_in_place() -> None:
    first = with_data_hopping([], 9, 3, report_errors=True)
    listed = [Option("a"), *first, Option("b")]
    result = with_data_hopping(listed, 8, 3)
    assert [o.name for o in result] == ["a", "dataHopping", "b"]
    # The originator's reportErrors is kept unless the caller says otherwise.
    assert hopping(result) == DataHopping(8, True)
    assert hopping(listed) == DataHopping(9, True)
    assert hopping(with_data_hopping(listed, 8, 3, report_errors=False)) == DataHopping(8, False)


def test_with_data_hopping_keeps_a_localize_and_makes_few_options() -> None:
    localized = dataclasses.replace(with_data_hopping([], 9, 3)[0], localize="fr")
    result = with_data_hopping([localized], 8, 3)
    assert result[0].localize == "fr" and hopping(result) == DataHopping(8, False)
    assert with_data_hopping([], 8, 3)[0].localize is None
    # Made options are remembered for reuse, boundedly: transIDs are the originator's.
    remembered = options._made_data_hopping.cache_info().maxsize
    assert remembered is not None
    for trans_id in range(1, remembered + 10):
        assert with_data_hopping([], 5, trans_id)[0].trans_id == trans_id
    assert options._made_data_hopping.cache_info().currsize <= remembered


@pytest.mark.parametrize("hops", [-1, 256])
def test_with_data_hopping_bounds(hops: int) -> None:
    with pytest.raises(ValueError):
        with_data_hopping([], hops, 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, options.MAX_HOPS), st.booleans(), st.integers(1, 2**31 - 1))
def test_data_hopping_round_trip(hops: int, report: bool, trans_id: int) -> None:
    data = data_with(*with_data_hopping([], hops, trans_id, report_errors=report))
    again = decode(encode(data))
    assert isinstance(again, Data)
    found = data_hopping(again.options)
    assert found is not None and found[1] == DataHopping(hops, report)
    assert found[0].trans_id == trans_id
