"""Studies of a federation's value: what collaboration buys, who contributed, what leaks.

Modules, in dependency order:

* :mod:`.common`       tables (CSV, Markdown), a text progress bar, protocol instances from the
                       registry with study parameters
* :mod:`.runner`       a small multi-party spawner (owners, querier, TTP dealer) for computations
                       that are not inference (contribution scores); CrypTen only through
                       :func:`mpc_fi._crypten.load_crypten`
* :mod:`.noniid`       accuracy of owners and of every registered protocol against the Dirichlet
                       non-IID concentration (plaintext twins, and on shares through
                       :class:`mpc_fi.Federation`)
* :mod:`.contribution` Shapley values of each owner's contribution to ensemble accuracy, computed
                       on shares (only coalition accuracies are opened, to the querier), and
                       label-free rewards compared with them
* :mod:`.leakage`      model extraction and membership inference per release policy
* :mod:`.local_dp`     local DP (k-ary randomized response on each owner's vote) against GNMax on
                       shares, calibrated to the same (epsilon, delta) over the query set
* :mod:`.attacks`      stronger attacks per release policy: LiRA with shadow federations (TPR at
                       low FPR, owners that overfit), extraction from synthetic and
                       out-of-distribution queries, inference of each owner's label skew
* :mod:`.split_inference` an owner inverts a public backbone's features: plaintext features
                       (split deployment) against its shares and received openings in the
                       public-backbone mode (real parties, wire audit)
* :mod:`.plots`        figures (matplotlib, imported lazily)
* :mod:`.cli`          :func:`study_main`, wired as ``mpc-fi study`` (also ``python -m studies``)

Like :mod:`mpc_fi.demo`, the studies play every organisation at once to train the owners and to
score the results; the secure parts never hand one owner's predictions to anyone.
This package sits beside the engine (``mpc_fi`` never imports it): ``mpc-fi study`` finds it
through the ``mpc_fi.commands`` entry point (``setup.cfg``). Nothing here imports ``protocols``
or ``launchers``: protocol classes come from :func:`mpc_fi.plugins.registry` and secure inference
runs through :class:`mpc_fi.Federation`. Importing this package imports nothing else.
"""

from __future__ import annotations


def study_main(argv: list[str] | None = None) -> int:
    """``mpc-fi study ...``: see :func:`studies.cli.study_main`."""
    from .cli import study_main as main  # noqa: PLC0415 - keep the package import free

    return main(argv)


__all__ = ["study_main"]
