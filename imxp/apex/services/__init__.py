"""APEX services co-resident with each relay, as well-known endpoints (RFC 3340 §6)."""
