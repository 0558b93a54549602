"""Per-party logging: every line says which party wrote it (rank, role and name)."""

from __future__ import annotations

import logging
from pathlib import Path

LOGGER_NAME = "mpc_fi"


def party_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_party_logging(path: Path | None, *, rank: int, role: str, name: str,
                        level: int = logging.INFO) -> logging.Logger:
    """Send this process's log lines to ``path`` (and stderr if ``path`` is None)."""
    fmt = logging.Formatter(
        f"%(asctime)s.%(msecs)03d [rank {rank} {role} {name}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S")
    handler: logging.Handler = (logging.FileHandler(path) if path is not None
                                else logging.StreamHandler())
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # CrypTen logs at INFO through the root logger: keep it quiet
    logger = party_logger()
    logger.setLevel(level)
    return logger
