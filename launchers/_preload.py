"""Imported once by the local launcher's fork server, so that each party process starts as a
fork of a process that already imported torch and CrypTen (seconds saved per party), while
still never inheriting the launching process's state. Importing it has that one side effect."""

from mpc_fi._crypten import load_crypten

import launchers.entry  # noqa: F401

load_crypten()
