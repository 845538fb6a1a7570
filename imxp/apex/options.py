"""The option framework of RFC 3340 §5 and the options this relay understands.

Each ``option`` names the relays that process it (``targetHop``) and whether a
relay that does not understand it must fail (``mustUnderstand``). This module
answers, for one relay position, whether an option applies here and whether
it travels on; and it reads and writes the two options a relay acts on:
``statusRequest`` (RFC 3340 §5.1) and ``dataHopping`` (RFC 3342 §4).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from imxp.apex.wire import APEXError, Option, remember_short
from imxp.beep import xmlsafe

__all__ = [
    "KNOWN",
    "STATUS_REQUEST",
    "DATA_HOPPING",
    "applies",
    "forwarded",
    "check_must_understand",
    "status_request",
    "make_status_request",
    "DataHopping",
    "data_hopping",
    "with_data_hopping",
]

STATUS_REQUEST = "statusRequest"
DATA_HOPPING = "dataHopping"
# Options this relay understands (§5: others are ignored unless mustUnderstand).
KNOWN = frozenset({STATUS_REQUEST, DATA_HOPPING})
MAX_HOPS = 255  # HOPS of the RFC 3342 §6 DTD
_HOPS = re.compile(r"[0-9]{1,3}\Z")


def applies(option: Option, *, final: bool) -> bool:
    """Whether ``option`` applies to this relay (§5, targetHop).

    ``this`` and ``all`` apply to every relay that receives the option;
    ``final`` only to a relay that transmits the containing element directly
    to the recipient (``final`` true).
    """
    return option.target_hop != "final" or final


def forwarded(option: Option, *, final: bool = False) -> bool:
    """Whether ``option`` is transmitted with the containing element (§5).

    A ``this`` option is removed before the element goes to the next relay;
    ``final`` and ``all`` options are retained. A final relay removes nothing
    as it transmits to the recipient ("a final relay does not remove any
    options"), so with ``final`` true every option is forwarded.
    """
    return final or option.target_hop != "this"


def check_must_understand(options: Iterable[Option], *, final: bool) -> Option | None:
    """The first option that applies here, must be understood, and is not (§5).

    Such an option is "an error in processing"; the relay answers 504
    (parameter not implemented, §10). External options are identified by a
    URI and none of them is understood here.
    """
    for option in options:
        if (
            option.must_understand
            and applies(option, final=final)
            and (option.external or option.name not in KNOWN)
        ):
            return option
    return None


def _internal(options: Iterable[Option], name: str) -> Option | None:
    for option in options:
        if option.name == name and not option.external:
            return option
    return None


def status_request(options: Iterable[Option]) -> Option | None:
    """The ``statusRequest`` option among ``options`` (§5.1), if any."""
    return _internal(options, STATUS_REQUEST)


def make_status_request(trans_id: int, target_hop: str = "final") -> Option:
    """A ``statusRequest`` option as in the §5.1 examples (mustUnderstand true).

    ``trans_id`` comes back as the transID of each ``statusResponse``;
    ``target_hop`` ``all`` traces the data's passage through the mesh (§5.1).
    """
    return Option(STATUS_REQUEST, target_hop=target_hop, must_understand=True, trans_id=trans_id)


@dataclass(frozen=True)
class DataHopping:
    """The ``dataHopping`` element of RFC 3342 §6: hops left, and whether to report running out.

    ``no_more_than`` 0 (the DTD's default) means no limit is in force (§4:
    the option acts only when the value is non-zero).
    """

    no_more_than: int
    report_errors: bool


def data_hopping(options: Iterable[Option]) -> tuple[Option, DataHopping] | None:
    """The ``dataHopping`` option among ``options`` and its content (RFC 3342 §4).

    Raises :class:`APEXError` 501 when the option's content is not a valid
    ``dataHopping`` element: the relay cannot honour a hop limit it cannot read.
    """
    option = _internal(options, DATA_HOPPING)
    if option is None:
        return None
    if not option.body:
        return option, DataHopping(0, False)
    return option, _read_data_hopping(option.body)


@remember_short
def _read_data_hopping(body: str) -> DataHopping:
    try:
        element = xmlsafe.parse(body.encode("utf-8"))
    except xmlsafe.XMLError as e:
        raise APEXError(501, f"dataHopping option: {e}") from None
    if element.tag != DATA_HOPPING or len(element) or (element.text or "").strip(" \t\r\n"):
        raise APEXError(501, "dataHopping option contains one empty dataHopping element")
    hops = element.get("noMoreThan", "0")
    if not _HOPS.match(hops) or int(hops) > MAX_HOPS:
        raise APEXError(501, f"dataHopping noMoreThan {hops[:8]!r} is not 0..{MAX_HOPS}")
    report = element.get("reportErrors", "false")
    if report not in ("true", "false"):
        raise APEXError(501, f"dataHopping reportErrors {report[:8]!r} is not true|false")
    return DataHopping(int(hops), report == "true")


def with_data_hopping(
    options: Iterable[Option],
    no_more_than: int,
    trans_id: int,
    report_errors: bool | None = None,
) -> list[Option]:
    """A new list of options whose ``dataHopping`` says ``no_more_than`` (RFC 3342 §4).

    An existing dataHopping option is replaced where it stands, keeping its
    reportErrors unless ``report_errors`` is given (a relay decrementing the
    count must not change what the originator asked for); otherwise one is
    appended. Per §4 the originator sets targetHop ``all`` and mustUnderstand
    ``true``, and so does this.
    """
    if not 0 <= no_more_than <= MAX_HOPS:
        raise ValueError(f"noMoreThan {no_more_than} is not 0..{MAX_HOPS}")
    result = list(options)
    index = None
    for i, option in enumerate(result):
        if option.name == DATA_HOPPING and not option.external:
            index = i
            break
    if report_errors is None:
        report_errors = index is not None and _report_errors(result[index])
    made = _made_data_hopping(
        no_more_than, trans_id, report_errors, None if index is None else result[index].localize
    )
    if index is None:
        result.append(made)
    else:
        result[index] = made
    return result


# A relay counts the same few hop limits down in data after data; options are immutable,
# so one made may stand in many data.
@functools.lru_cache(maxsize=256)
def _made_data_hopping(
    no_more_than: int, trans_id: int, report_errors: bool, localize: str | None
) -> Option:
    body = (
        f"<dataHopping noMoreThan='{no_more_than}'"
        f" reportErrors='{'true' if report_errors else 'false'}' />"
    )
    return Option(DATA_HOPPING, False, "all", True, trans_id, localize, body)


def _report_errors(option: Option) -> bool:
    found = data_hopping([option])
    return found is not None and found[1].report_errors
