"""The edge client library: attach to the mesh, send and receive (RFC 3340 §2.1), and
protect messages end to end (RFC 3923's model with RFC 3156 and RFC 8551).

See :mod:`imxp.client.edge` for the whole story and an example.
"""

from imxp.client.edge import (
    ERROR_KINDS,
    REPORT_TIMEOUT,
    Client,
    ClientError,
    Incoming,
    Outcome,
    Protection,
    Refusal,
    Termination,
    check_timeout,
    connect,
    open_incoming,
)

__all__ = [
    "ERROR_KINDS",
    "REPORT_TIMEOUT",
    "Client",
    "ClientError",
    "Incoming",
    "Outcome",
    "Protection",
    "Refusal",
    "Termination",
    "check_timeout",
    "connect",
    "open_incoming",
]
