"""Logging for the Python API: mimkit logs to the "mimkit" logger; when the program configured no logging at all
(no handler on it or on the root logger), mimkit adds one INFO handler to stderr, as the command line shows."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def ensure_logging() -> None:
    logger = logging.getLogger("mimkit")
    if logger.hasHandlers():  # the application's own setup (or the command line's basicConfig) decides
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
