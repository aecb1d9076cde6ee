"""pymmcore-plus's logging, brought under the service's.

Importing pymmcore-plus configures logging for a desktop user: a coloured stderr handler of
its own, a rotating log file under the user's home (up to 20 × 40 MB, which under systemd is
the service's state directory, unseen; ``drivers/__init__.py`` points it at /dev/null before
the first import) and the root logger at DEBUG. A service wants one stream:
``quiet_pymmcore_logging()`` removes both handlers and puts the root logger back at Python's
default, so pymmcore-plus's records propagate to whatever the service set up
(``daemon.service.setup_logging``: JSON lines on stderr). ``drivers.virtual``, the module
that imports pymmcore-plus first (``drivers.micromanager`` imports it), calls it once.
"""

from __future__ import annotations

import logging


def quiet_pymmcore_logging() -> None:
    # configure_logging(log_to_stderr=False) would remove them, but it removes while
    # iterating the same list and skips every other handler (pymmcore-plus 0.18): clear here.
    logger = logging.getLogger("pymmcore-plus")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    root = logging.getLogger()
    if root.level == logging.DEBUG:  # what pymmcore-plus set on import; a host's own level stays
        root.setLevel(logging.WARNING)
