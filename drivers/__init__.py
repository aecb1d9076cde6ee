"""Acquisition backends: virtual microscope, Micro-Manager, scanner folder, slide files."""

import os

# pymmcore-plus opens a rotating log file under the user's home when it is first imported
# (drivers.pymmcore_logging says why a service does not want it); every import of it goes
# through this package, so point that file nowhere first. A user's own setting wins.
os.environ.setdefault("PYMM_LOG_FILE", os.devnull)
