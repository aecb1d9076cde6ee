"""pymmcore-plus's logging, brought under the service's.

Importing pymmcore-plus configures logging for a desktop user: a coloured stderr handler of
its own, a rotating log file under the user's home (up to 20 × 40 MB, which under systemd is
the service's state directory, unseen; ``drivers/__init__.py`` points it at /dev/null before
the first import) and the root logger at DEBUG. A service wants one stream:
``quiet_pymmcore_logging()`` removes both handlers and puts the root logger back at Python's
default, so pymmcore-plus's records propagate to whatever the service set up
(``daemon.service.setup_logging``: JSON lines on stderr). Idempotent.
"""

from __future__ import annotations

import logging


def quiet_pymmcore_logging() -> None:
    from pymmcore_plus import configure_logging

    configure_logging(file=None, log_to_stderr=False)
    logging.getLogger().setLevel(logging.WARNING)
