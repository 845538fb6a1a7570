"""APEX (RFC 3340) on BEEP; uses imxp.beep only through the profile interface."""
