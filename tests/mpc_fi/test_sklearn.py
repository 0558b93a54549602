"""FederatedClassifier: a fixed, pre-trained ensemble behind scikit-learn's classifier API."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.base import clone, is_classifier
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import NotFittedError

from mpc_fi.sklearn import FederatedClassifier
from tests.conftest import logits_of, random_federation

FEATURES, CLASSES = 6, 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed, models = random_federation(tmp_path_factory.mktemp("skl"), num_owners=3,
                                    num_classes=CLASSES, in_features=FEATURES,
                                    reveal="scores", batch_size=None)
    return fed, models


def _data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, n)


def _twin(fed, models, x):
    from mpc_fi.plugins import build_protocol  # noqa: PLC0415

    return build_protocol(fed, num_classes=CLASSES).plaintext(logits_of(models, x))


def test_it_is_a_classifier_that_clones_and_sets_params(federation):
    fed, _ = federation
    clf = FederatedClassifier(fed, timeout_s=120)
    assert is_classifier(clf)
    twin = clone(clf)
    assert twin.get_params()["federation"] == fed and twin.get_params()["timeout_s"] == 120
    assert twin.set_params(memory_limit_mb=64).memory_limit_mb == 64
    assert "keep_run_dir" in clf.get_params()


def test_fit_checks_the_files_and_learns_classes_without_starting_parties(federation,
                                                                          monkeypatch):
    fed, _ = federation
    monkeypatch.setattr("mpc_fi.federation.Federation.run",
                        lambda *a, **k: pytest.fail("fit must not start the parties"))
    x, _ = _data()
    clf = FederatedClassifier(fed).fit(x, np.zeros(len(x), dtype=int))  # y lacks classes 1, 2
    np.testing.assert_array_equal(clf.classes_, np.arange(CLASSES))  # from the owners' models
    assert clf.n_features_in_ == FEATURES


def test_fit_refuses_what_the_owners_cannot_answer(federation, tmp_path):
    fed, _ = federation
    x, y = _data()
    with pytest.raises(ValueError, match="does not take"):
        FederatedClassifier(fed).fit(np.zeros((4, FEATURES + 1)), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="outside the owners' classes 0..2"):
        FederatedClassifier(fed).fit(x, y + 5)
    with pytest.raises(ValueError, match="LabelEncoder"):
        FederatedClassifier(fed).fit(x, np.array(["a", "b"] * 12))
    with pytest.raises(NotFittedError):
        FederatedClassifier(fed).predict(x)


def test_without_local_model_files_the_classes_come_from_y(federation, tmp_path):
    fed, _ = federation
    elsewhere = dataclasses.replace(fed, owners=tuple(
        dataclasses.replace(o, model=dataclasses.replace(o.model, weights=str(tmp_path / "x.pt")))
        for o in fed.owners))
    x, _ = _data()
    clf = FederatedClassifier(elsewhere).fit(x, np.array([0, 1] * 12))
    np.testing.assert_array_equal(clf.classes_, [0, 1])


def test_predict_proba_exists_only_where_scores_are_released(federation):
    fed, _ = federation
    assert hasattr(FederatedClassifier(fed), "predict_proba")
    labels_only = FederatedClassifier(dataclasses.replace(fed, reveal="label"))
    assert not hasattr(labels_only, "predict_proba")
    with pytest.raises(AttributeError) as info:
        labels_only.predict_proba  # noqa: B018
    assert "reveal: scores" in str(info.value.__cause__)  # why, chained by available_if


def test_in_a_pipeline_it_answers_like_the_plaintext_ensemble(federation):
    fed, models = federation
    x, y = _data(40)
    pipe = make_pipeline(FunctionTransformer(lambda a: a * 1.0), FederatedClassifier(fed))
    pipe.fit(x, y)
    twin = _twin(fed, models, x)
    proba = pipe.predict_proba(x)  # one federation run
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(proba, np.asarray(twin.scores), atol=2e-2)
    np.testing.assert_array_equal(proba.argmax(axis=1), twin.labels)


@pytest.mark.slow
def test_predict_score_and_cross_val_score_of_the_fixed_ensemble(federation):
    fed, models = federation
    x, y = _data(40)
    clf = FederatedClassifier(fed).fit(x, y)
    twin = _twin(fed, models, x)
    np.testing.assert_array_equal(clf.predict(x), twin.labels)
    expected = float((np.asarray(twin.labels) == y).mean())
    assert clf.score(x, y) == pytest.approx(expected)
    scores = cross_val_score(FederatedClassifier(fed), x, y, cv=2)
    assert scores.mean() == pytest.approx(expected)


def test_over_a_served_session_it_answers_like_one_shot_runs(federation, tmp_path):
    from mpc_fi import Federation

    fed, models = federation
    x, y = _data(40)
    twin = _twin(fed, models, x)
    with Federation(fed, run_dir=tmp_path / "run").start() as session:
        clf = FederatedClassifier(fed, served=session.path).fit(x, y)
        np.testing.assert_array_equal(clf.predict(x), twin.labels)
        np.testing.assert_allclose(clf.predict_proba(x).sum(axis=1), 1.0, atol=1e-6)
        scores = cross_val_score(clone(clf), x, y, cv=2)
        assert scores.mean() == pytest.approx(float((np.asarray(twin.labels) == y).mean()))
        assert session.health()["requests"] == 4  # every call was a warm request


# -- scikit-learn's own estimator checks ---------------------------------------------------
#: Checks that cannot hold for a fixed ensemble of pre-trained private models.
_FIXED = "a fixed ensemble: the owners' models are pre-trained, so fit does not learn from X, y"
_SHAPE = (f"the owners' models take exactly {FEATURES} features; the check fits on other widths")
_LABELS = "the owners' labels are 0..C-1; the check fits string or shifted labels"
_EXPECTED_FAILED = {
    "check_classifiers_train": _FIXED,
    "check_classifiers_classes": _LABELS,
    "check_classifiers_regression_target": _LABELS,
    "check_classifiers_one_label": _FIXED,
    "check_classifier_multioutput": "one label per query; no multi-output targets",
    "check_supervised_y_2d": "one label per query; no multi-output targets",
    "check_classifiers_multilabel_output_format_predict": "no multi-label targets",
    "check_classifiers_multilabel_output_format_predict_proba": "no multi-label targets",
    "check_classifiers_multilabel_representation_invariance": "no multi-label targets",
    "check_estimators_dtypes": _SHAPE,
    "check_fit_score_takes_y": _SHAPE,
    "check_sample_weights_pandas_series": _SHAPE,
    "check_sample_weights_not_an_array": _SHAPE,
    "check_sample_weights_list": _SHAPE,
    "check_sample_weights_shape": _SHAPE,
    "check_sample_weights_not_overwritten": _SHAPE,
    "check_sample_weight_equivalence_on_dense_data": _SHAPE,
    "check_sample_weight_equivalence_on_sparse_data": _SHAPE,
    "check_estimators_fit_returns_self": _SHAPE,
    "check_dtype_object": _SHAPE,
    "check_pipeline_consistency": _SHAPE,
    "check_estimators_nan_inf": _SHAPE,
    "check_estimators_overwrite_params": _SHAPE,
    "check_estimators_pickle": _SHAPE,
    "check_f_contiguous_array_estimator": _SHAPE,
    "check_methods_sample_order_invariance": _SHAPE,
    "check_methods_subset_invariance": _SHAPE,
    "check_fit2d_1sample": _SHAPE,
    "check_fit2d_1feature": _SHAPE,
    "check_fit2d_predict1d": _SHAPE,
    "check_dict_unchanged": _SHAPE,
    "check_dont_overwrite_parameters": _SHAPE,
    "check_fit_idempotent": _SHAPE,
    "check_fit_check_is_fitted": _SHAPE,
    "check_n_features_in": _SHAPE,
    "check_n_features_in_after_fitting": _SHAPE,
    "check_positive_only_tag_during_fit": _SHAPE,
    "check_classifiers_train(readonly_memmap=True)": _FIXED,
    "check_classifiers_train(readonly_memmap=True,X_dtype=float32)": _FIXED,
    "check_classifier_not_supporting_multiclass": _FIXED,
    "check_readonly_memmap_input": _SHAPE,
    "check_classifier_data_not_an_array": _SHAPE,
}


def _checked_estimator():
    from tests.conftest import random_federation as make  # noqa: PLC0415

    fed, _ = make(tempfile_dir(), num_owners=2, num_classes=CLASSES, in_features=FEATURES,
                  reveal="scores", batch_size=None)
    return FederatedClassifier(fed)


def tempfile_dir() -> str:
    import tempfile  # noqa: PLC0415

    return tempfile.mkdtemp(prefix="mpc-fi-skl-")


@pytest.mark.slow
@parametrize_with_checks([_checked_estimator()],
                         expected_failed_checks=lambda est: _EXPECTED_FAILED,
                         xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
