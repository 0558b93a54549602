"""mpc-fi: secure multiparty computation for federated inference.

Independently owned classifiers answer a query together on secret shares (CrypTen); only the
agreed aggregate reaches the querier. Public API: :class:`Federation` (one-shot runs, or a
long-lived session with ``Federation.start()``), :func:`connect` (a session served by
``mpc-fi serve``), the configuration classes, the result types and the errors.
"""

from .config import BackboneConfig, FederationConfig, ModelSource, NetworkConfig, OwnerConfig, PrivacyConfig, \
    ProtocolConfig, QuerierConfig
from .errors import BudgetExceededError, ConfigError, InputError, InsecureSettingWarning, MpcFiError, \
    PartyFailedError, ProtocolError, Terminated, UnsupportedModelError
from .federation import Federation
from .result import ABSTAIN, PartyCost, Prediction, RunResult
from .serve import ServedFederation, connect

__version__ = "0.1.0"

__all__ = [
    "Federation", "ServedFederation", "connect", "FederationConfig", "OwnerConfig", "QuerierConfig", "ModelSource",
    "ProtocolConfig", "NetworkConfig", "PrivacyConfig", "BackboneConfig", "Prediction", "RunResult", "PartyCost", "ABSTAIN",
    "MpcFiError", "ConfigError", "UnsupportedModelError", "InputError", "ProtocolError",
    "PartyFailedError", "BudgetExceededError", "InsecureSettingWarning", "Terminated",
]
