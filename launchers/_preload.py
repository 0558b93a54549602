"""Imported once by the local launcher's fork server, so that each party process starts as a
fork of a process that already imported torch and CrypTen (seconds saved per party), while
still never inheriting the launching process's state.

Importing it has two side effects, both meant for the fork server only: torch and CrypTen are
loaded, and the fork server leaves as soon as the launching process (its parent) is gone, which
takes every party with it (:mod:`launchers.lifeline`)."""

from mpc_fi._crypten import load_crypten

import launchers.entry  # noqa: F401
from launchers.lifeline import exit_with_parent

load_crypten()
exit_with_parent()
