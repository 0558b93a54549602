"""A scikit-learn classifier backed by a federation: ``FederatedClassifier(federation).predict(X)``.

scikit-learn is imported here only (``import mpc_fi`` does not load it). The owners' models are
already trained and private to them, so this is a *fixed* ensemble: :meth:`fit` checks the
federation and learns the input width and the classes, it never trains anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from .config import FederationConfig
from .errors import ConfigError

#: Protocols whose released scores are logits, not probabilities: predict_proba applies softmax.
_LOGIT_SCORES = frozenset({"logit_average"})


def _reveals_scores(est: "FederatedClassifier") -> bool:
    """predict_proba exists only where the federation releases scores (``reveal: scores``)."""
    try:
        fed = est._config()
    except (ConfigError, TypeError, ValueError) as exc:
        raise AttributeError(f"predict_proba needs a valid federation: {exc}") from None
    if fed.reveal != "scores":
        raise AttributeError("predict_proba is not available: the federation releases labels "
                             "only (set reveal: scores to release the aggregate scores)")
    return True


class FederatedClassifier(ClassifierMixin, BaseEstimator):
    """A scikit-learn classifier whose predictions are a federation's secure aggregate.

    The owners' models are trained already and stay with their owners: :meth:`fit` does **not**
    train. It checks the federation (its settings, and the owners' model files and the query
    file where they are on this host, with :func:`mpc_fi.preflight.check_files`), then sets
    ``n_features_in_`` from ``X`` and ``classes_``. ``classes_`` is ``arange(C)``, ``C`` the
    owners' class count: read from a local owner's model when one is on this host (no party is
    started), else ``max(y) + 1``. The owners' labels are ``0..C-1`` (the engine's contract),
    so ``y`` must hold integers in that range; labels outside it are refused with
    ``ValueError``. So in a cross-validation every fold's "fit" is this check, and the score
    measures the fixed ensemble.

    Every :meth:`predict`, :meth:`predict_proba` and :meth:`score` call is one complete, one-shot
    federation run (:meth:`mpc_fi.Federation.run`: the parties start, answer ``X``, and stop),
    or, with ``served``, one warm request to a served session (long-lived parties:
    :meth:`mpc_fi.Federation.start` or ``mpc-fi serve``), which gives the same answers. A query
    on which the protocol abstains (confident release) is predicted as ``-1``.

    Parameters
    ----------
    federation:
        A :class:`~mpc_fi.FederationConfig` or the path of a federation file (YAML/TOML).
    launcher, timeout_s, run_dir, memory_limit_mb, keep_run_dir:
        Passed to :class:`~mpc_fi.Federation` for every run.
    served:
        The socket of a served session of this federation (``ServedFederation.path`` of
        ``Federation(...).start()``, or ``mpc-fi serve --socket``): every call is a warm
        request to it (:func:`mpc_fi.connect`) instead of a one-shot run. A path, so that the
        estimator clones and pickles; the session's lifetime is the caller's.

    Attributes
    ----------
    classes_ : ndarray of shape (C,)
        ``arange(C)``.
    n_features_in_ : int
        Width of ``X`` seen in :meth:`fit`.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline                  # doctest: +SKIP
    >>> from sklearn.preprocessing import MinMaxScaler              # doctest: +SKIP
    >>> clf = make_pipeline(MinMaxScaler(), FederatedClassifier("federation.yaml"))  # doctest: +SKIP
    >>> clf.fit(X_train, y_train).score(X_test, y_test)             # doctest: +SKIP
    """

    def __init__(self, federation: FederationConfig | str | os.PathLike[str] | None = None, *,
                 launcher: str = "local", timeout_s: float = 600.0,
                 run_dir: str | os.PathLike[str] | None = None,
                 memory_limit_mb: float | None = None, keep_run_dir: bool = False,
                 served: str | os.PathLike[str] | None = None) -> None:
        self.federation = federation
        self.served = served
        self.launcher = launcher
        self.timeout_s = timeout_s
        self.run_dir = run_dir
        self.memory_limit_mb = memory_limit_mb
        self.keep_run_dir = keep_run_dir

    # -- helpers -----------------------------------------------------------------------
    def _config(self) -> FederationConfig:
        if isinstance(self.federation, FederationConfig):
            return self.federation
        if self.federation is None:
            raise ConfigError("FederatedClassifier needs a federation: a FederationConfig or "
                              "the path of a federation file", key="federation")
        return FederationConfig.load(self.federation)

    def _federation(self) -> Any:
        from .federation import Federation  # noqa: PLC0415

        return Federation(self._config(), launcher=self.launcher, timeout_s=self.timeout_s,
                          run_dir=self.run_dir, memory_limit_mb=self.memory_limit_mb,
                          keep_run_dir=self.keep_run_dir)

    def _check_X(self, X: Any, *, reset: bool) -> np.ndarray:
        return validate_data(self, X, reset=reset, dtype=np.float32, allow_nd=True)

    def _run(self, X: Any) -> Any:
        check_is_fitted(self, ("classes_", "n_features_in_"))
        X = self._check_X(X, reset=False)
        if self.served is not None:
            from .serve import connect  # noqa: PLC0415

            with connect(self.served, timeout_s=self.timeout_s) as session:
                return session.run(X)
        return self._federation().run(X).prediction

    # -- scikit-learn API --------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> "FederatedClassifier":
        """Check the federation and learn ``n_features_in_`` and ``classes_``; no training."""
        X, y = validate_data(self, X, y, dtype=np.float32, allow_nd=True)
        fed = self._config()
        num_classes = _local_class_count(fed, X.shape[1:])
        y = np.asarray(y)
        if y.dtype.kind not in "iub" and not (y.dtype.kind == "f"
                                              and np.all(np.equal(np.mod(y, 1), 0))):
            raise ValueError("the owners' labels are integers 0..C-1: encode y the same way "
                             f"(e.g. with sklearn.preprocessing.LabelEncoder); got dtype {y.dtype}")
        y = y.astype(np.int64)
        if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
            high = "C-1" if num_classes is None else str(num_classes - 1)
            raise ValueError(f"y holds labels outside the owners' classes 0..{high}: encode y "
                             "the way the owners did")
        if num_classes is None:
            num_classes = int(y.max()) + 1
        self.classes_ = np.arange(num_classes)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """The federation's labels for ``X`` (one federation run; ``-1`` = abstained)."""
        return np.asarray(self._run(X).labels)

    @available_if(_reveals_scores)
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities from the released scores (one federation run).

        Only with ``reveal: scores``. Distributions (soft voting and its variants) are returned
        as released; counts (hard voting, weighted votes; GNMax's noisy counts, negatives
        clipped to 0) are divided by their row sums; logits (logit averaging) go through a
        softmax.
        """
        scores = np.asarray(self._run(X).scores, dtype=np.float64)
        if self._config().protocol.name in _LOGIT_SCORES:
            z = np.exp(scores - scores.max(axis=1, keepdims=True))
            return z / z.sum(axis=1, keepdims=True)
        scores = np.clip(scores, 0.0, None)
        total = scores.sum(axis=1, keepdims=True)
        uniform = np.full_like(scores, 1.0 / scores.shape[1])
        return np.where(total > 0, scores / np.where(total > 0, total, 1.0), uniform)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        tags.target_tags.required = True
        return tags


def _local_files(fed: FederationConfig) -> list[str]:
    """The parties whose files are on this host (an owner's model files exist here; the
    querier when its query file does)."""
    here = []
    for owner in fed.owners:
        src = owner.model
        paths = [p for p in (getattr(src, "weights", None), getattr(src, "onnx", None)) if p]
        if paths and all(Path(p).exists() for p in paths):
            here.append(owner.name)
    if fed.querier.data and Path(fed.querier.data).exists():
        here.append(fed.querier.name)
    return here


def _local_class_count(fed: FederationConfig, query_shape: tuple[int, ...]) -> int | None:
    """Check the files on this host; the owners' class count from the first local owner's model
    (None when no owner's model is here). Raises ``ValueError`` for an ``X`` of the wrong shape."""
    from .errors import MpcFiError  # noqa: PLC0415
    from .models import load_owner_model, output_classes  # noqa: PLC0415
    from .preflight import check_files  # noqa: PLC0415

    local = _local_files(fed)
    check_files(fed, parties=local)
    owners = [o for o in fed.owners if o.name in local]
    if not owners:
        return None
    classes = None
    for owner in owners:
        model = load_owner_model(owner.model, mode=fed.mode)
        try:
            found = output_classes(model, tuple(query_shape))
        except MpcFiError as exc:
            raise ValueError(f"X has rows of shape {tuple(query_shape)}, which owner "
                             f"{owner.name}'s model does not take: {exc}") from None
        if classes is not None and found != classes:
            raise ValueError(f"owners disagree on the number of classes ({classes} != {found})")
        classes = found
    return classes
