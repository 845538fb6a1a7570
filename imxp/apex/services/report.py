"""The report service, ``apex=report`` (RFC 3340 §6.2, DTD §9.2).

It only speaks: a relay that processes a statusRequest (§5.1) has it send a
``statusResponse`` to the originator as ordinary data from
``apex=report@DOMAIN``. Consumers never initiate communication with it (§6.2),
so data addressed to it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from imxp.apex import wire
from imxp.apex.address import Endpoint, report_endpoint

__all__ = ["ReportService"]


class ReportService:
    """The report service of one domain; ``send`` carries the data it originates."""

    address = "apex=report"

    def __init__(self, domain: str, send: Callable[[wire.Data], None]) -> None:
        self.identity = str(report_endpoint(domain))
        self._send = send

    def report(
        self, originator: Endpoint, trans_id: int, destinations: Sequence[tuple[str, int, str]]
    ) -> None:
        """One statusResponse to ``originator`` for the statusRequest ``trans_id``.

        §5.1: the data carrying it has no statusRequest of its own, so a report
        is never reported on.
        """
        response = wire.StatusResponse(trans_id, list(destinations))
        self._send(wire.status_response_data(self.identity, str(originator), response))

    def accept(self, data: wire.Data) -> tuple[int, str]:
        """§6.2: consumers reply to nothing and send nothing here."""
        return 554, "the report service accepts no data (RFC 3340 §6.2)"
