"""Imported once by the study runner's fork server, so that each party process starts as a fork
of a process that already imported torch and CrypTen (seconds saved per party) while never
inheriting the launching process's state. Importing it has that one side effect."""

from mpc_fi._crypten import load_crypten

import mpc_fi.study.contribution  # noqa: F401  - the party function the studies run

load_crypten()
