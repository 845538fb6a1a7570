"""Registers ``twistd imxp``: an APEX relay configured by one TOML file (see imxp.tap).

This directory is deliberately not a package (no ``__init__.py`` here or in ``twisted/``):
Twisted's plugin loader finds every ``twisted/plugins`` directory on ``sys.path``, and an
``__init__.py`` would shadow Twisted's own ``twisted`` package.
"""

from twisted.application.service import ServiceMaker

imxp = ServiceMaker(
    "imxp",
    "imxp.tap",
    "An IM relay of the imxp mesh (BEEP/APEX, RFC 3080/3340), configured by a TOML file",
    "imxp",
)
