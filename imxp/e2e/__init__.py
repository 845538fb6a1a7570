"""What endpoints do end to end, above the relays: message formats and their protection.

Relays never look inside a data's content (RFC 3340 §4.4.4.1); everything here is applied
by the sending endpoint and undone by the receiving one. :mod:`imxp.e2e.cpim` is the
common instant-message format of RFC 3862 (``message/cpim``), which gateways to other IM
islands can map without loss.
"""
