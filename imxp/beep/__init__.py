"""BEEP session layer (RFC 3080, RFC 3081); imports nothing from imxp.apex."""
