"""The edge client library: attach to the mesh, send and receive (RFC 3340 §2.1).

See :mod:`imxp.client.edge` for the whole story and an example.
"""

from imxp.client.edge import (
    ERROR_KINDS,
    Client,
    ClientError,
    Incoming,
    Outcome,
    Termination,
    connect,
)

__all__ = ["ERROR_KINDS", "Client", "ClientError", "Incoming", "Outcome", "Termination", "connect"]
