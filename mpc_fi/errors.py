"""Exception hierarchy: one root, a few meaningful subclasses.

Every check a user can trigger raises one of these (never ``assert``). Each class carries an
exit code used by the CLI; ``mpc-fi --help`` prints the table.
"""

from __future__ import annotations


class MpcFiError(Exception):
    """Root of every error mpc-fi raises on purpose."""

    exit_code = 1


class ConfigError(MpcFiError):
    """A federation description (object or file) is invalid; the message names the key."""

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None):
        self.key = key
        self.bare = message  # without the key, to re-raise under a longer key
        super().__init__(f"{key}: {message}" if key else message)


class UnsupportedModelError(MpcFiError):
    """A model cannot run on shares (or cannot be loaded); lists every offending layer."""

    exit_code = 3


class InputError(MpcFiError):
    """A query or a model output has the wrong shape, or holds NaN/inf or out-of-range values."""

    exit_code = 4


class ProtocolError(MpcFiError):
    """A protocol was misconfigured or cannot produce the requested release."""

    exit_code = 5


class BudgetExceededError(MpcFiError):
    """A query would overspend the querier's differential-privacy budget."""

    exit_code = 6


class PartyFailedError(MpcFiError):
    """A party crashed, hung, or reported an error; the run was stopped everywhere."""

    exit_code = 7

    def __init__(self, message: str, *, party: str | None = None, rank: int | None = None,
                 log_tail: str = ""):
        self.party = party
        self.rank = rank
        self.log_tail = log_tail
        text = message
        if log_tail:
            text += "\n--- last log lines of " + (party or "the party") + " ---\n" + log_tail
        super().__init__(text)


class SessionLost(PartyFailedError):
    """A served session lost a peer: this party leaves it to rejoin a new session with the same
    parties (``mpc-fi serve`` re-executes itself; a local session's launcher starts it again).
    The message names the peer that was lost."""

    exit_code = 75


class HandshakeError(MpcFiError):
    """Parties disagree at start-up: federation fingerprint, package versions, or I/O shapes."""

    exit_code = 8


class WireFormatError(MpcFiError):
    """A peer sent a message outside the fixed wire schema (:mod:`mpc_fi.wire`): not JSON, too
    large, too deep, or the wrong structure for its kind. Nothing it sent was interpreted; every
    honest party stops with this error, naming the peer."""

    exit_code = 9

    def __init__(self, message: str, *, party: str | None = None, rank: int | None = None):
        self.party = party
        self.rank = rank
        super().__init__(message)


#: The error classes a peer may name when it reports a failure (:func:`mpc_fi.wire.peer_error`).
#: A name outside this table is a malformed message; never looked up in this module by name.
PEER_ERRORS: dict[str, type[MpcFiError]] = {cls.__name__: cls for cls in (
    MpcFiError, ConfigError, UnsupportedModelError, InputError, ProtocolError,
    BudgetExceededError, PartyFailedError, SessionLost, HandshakeError, WireFormatError)}


class Terminated(SystemExit):
    """SIGTERM reached the launching process while its parties ran; every party was stopped.

    Not an :class:`MpcFiError`: like ``SystemExit``, which it extends, it ends the program
    unless caught, with exit code 143 (128 + SIGTERM, what a shell reports for a process killed
    by SIGTERM).
    """

    exit_code = 143

    def __init__(self) -> None:
        super().__init__(self.exit_code)


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error (a bug: please report it with the party logs)",
    ConfigError.exit_code: "invalid federation or option (the message names the key)",
    UnsupportedModelError.exit_code: "model cannot be loaded or run on shares",
    InputError.exit_code: "bad query or model output (shape, NaN/inf, range), or a query too "
                          "large for the parties' memory",
    ProtocolError.exit_code: "protocol misconfigured or release not allowed",
    BudgetExceededError.exit_code: "privacy budget would be exceeded; nothing was computed",
    PartyFailedError.exit_code: "a party failed or timed out; every party was stopped",
    HandshakeError.exit_code: "parties disagree at start-up (fingerprint, versions, shapes)",
    WireFormatError.exit_code: "a peer sent a message outside the wire schema (a rogue or "
                               "incompatible party); every party was stopped",
    SessionLost.exit_code: "a served session lost a peer; this party rejoins a new session",
    130: "interrupted (Ctrl-C); every party was stopped",
    Terminated.exit_code: "terminated (SIGTERM); every party was stopped",
}


class InsecureSettingWarning(UserWarning):
    """A setting weakens security (own-party dealer, plaintext links, fixed seeds, debug checks)."""
