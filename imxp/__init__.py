"""imxp: an instant-messaging and presence relay mesh speaking APEX over BEEP."""

__version__ = "0.1.0"
