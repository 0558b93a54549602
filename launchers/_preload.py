"""Imported once by the local launcher's fork server, so that each party process starts as a
fork of a process that already imported what every party needs (seconds saved per party),
while still never inheriting the launching process's state.

Preloaded: torch and CrypTen (through :mod:`mpc_fi._crypten`, with its patches), the party
runtime and everything it imports (:mod:`launchers.entry` -> :mod:`mpc_fi.party`), the protocol
interface with its secure and plaintext ops (:mod:`protocols.base`), and the registries' entry
point tables. (The dealer sizes its answers and the memory plan sizes layers by plain shape
arithmetic: no meta tensors or ``torch.broadcast_shapes``, whose first use imports sympy and
torch's meta kernels, about a second, in every fresh process.) Not preloaded: the protocols themselves (each party imports only the one its
federation names, so dp-accounting and scipy load only for the differentially private ones),
onnxruntime (ONNX owners in output mode only) and scikit-learn.

Importing it has two side effects, both meant for the fork server only: the modules above are
loaded, and the fork server leaves as soon as the launching process (its parent) is gone, which
takes every party with it (:mod:`launchers.lifeline`)."""

from mpc_fi import plugins
from mpc_fi._crypten import load_crypten

import launchers.entry  # noqa: F401
import protocols.base  # noqa: F401
from launchers.lifeline import exit_with_parent

load_crypten()
plugins.names(plugins.PROTOCOLS)  # reads the entry points once, for every party
exit_with_parent()
