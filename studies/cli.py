"""``mpc-fi study``: the collaboration studies from the command line.

``study_main(argv)`` has its own parser so that ``mpc-fi`` can hand it the rest of the command
line (``mpc-fi study shapley --owners 3 5``). Every subcommand writes a CSV, a Markdown table and
PNG figures into ``--out`` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from mpc_fi.errors import ConfigError, MpcFiError

_EXAMPLES = """\
examples:
  mpc-fi study noniid                      # full plaintext grid, a small subset on shares
  mpc-fi study noniid --full-secure        # every cell and protocol on shares (an hour or more)
  mpc-fi study shapley --owners 3 5 8      # Shapley values on shares, label-free rewards
  mpc-fi study leakage --seeds 0 1 2       # extraction and membership inference per policy
  mpc-fi study valuation-leakage           # what coalition accuracies leak; owners' defences
  mpc-fi study local-dp --owners 5 25      # randomized response per owner vs GNMax on shares
  mpc-fi study attacks                     # LiRA (TPR at low FPR), OOD extraction, label skew
  mpc-fi study split-inference             # feature inversion: plaintext features vs shares
  mpc-fi study noniid --combos mnist1d:mlp --samples 5000   # MNIST-1D, generated here
  mpc-fi study all --out docs/study        # everything, with the default settings
"""


def _combo(text: str) -> tuple[str, str]:
    from demos import DATASETS  # noqa: PLC0415

    dataset, _, arch = text.partition(":")
    if dataset not in DATASETS or arch not in ("mlp", "cnn") or \
            (arch == "cnn" and dataset != "digits"):
        raise argparse.ArgumentTypeError(
            f"expected DATASET:ARCH with DATASET in {DATASETS} and ARCH mlp (or cnn for digits), "
            f"got {text!r}")
    return dataset, arch


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _owner_count(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a federation needs at least 2 owners, got {text}")
    return value


def _sample_count(text: str) -> int:
    value = int(text)
    if value < 10:
        raise argparse.ArgumentTypeError(f"MNIST-1D needs at least 10 examples, got {text}")
    return value


def _backbone(text: str) -> tuple[int, int]:
    depth, sep, width = text.lower().partition("x")
    if not sep or not depth.isdigit() or not width.isdigit() or int(depth) < 1 or int(width) < 1:
        raise argparse.ArgumentTypeError(f"expected DEPTHxWIDTH (e.g. 2x32), got {text!r}")
    return int(depth), int(width)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_DESCRIPTION = ("Collaboration value, incentives and leakage of a federation. "
                "Each study writes CSV + Markdown + PNG into --out.")


def build_study_parser(prog: str = "mpc-fi study") -> argparse.ArgumentParser:
    """The parser of :func:`study_main` (what follows ``mpc-fi study``)."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=_EXAMPLES, description=_DESCRIPTION)
    _populate(parser)
    return parser


def add_study_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Attach ``study`` (with its STUDY subcommands) to a parent CLI's subparsers.

    The parsed namespace gets ``func=run_study``, which returns the exit code; the parent's
    ``main`` handles :class:`~mpc_fi.errors.MpcFiError` as for its other commands.
    """
    parser = subparsers.add_parser(
        "study", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
        help="collaboration value, incentives and leakage studies", description=_DESCRIPTION)
    _populate(parser)
    parser.set_defaults(func=run_study)
    return parser


def _populate(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="study", required=True, metavar="STUDY")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="study-results", help="output folder (default ./study-results)")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    nid = sub.add_parser("noniid", help="owners vs every protocol against the Dirichlet alpha",
                         description="Accuracy of each owner, the best and mean owner and every "
                                     "registered protocol (plaintext twins) on a grid of data "
                                     "sets, owner models, N and alpha; a subset also on shares.")
    nid.add_argument("--combos", nargs="+", type=_combo, metavar="DATASET:ARCH",
                     default=None, help="default: digits:mlp digits:cnn breast_cancer:mlp")
    nid.add_argument("--owners", nargs="+", type=_owner_count, default=[3, 5, 8])
    nid.add_argument("--alphas", nargs="+", type=_positive_float, default=[0.1, 0.3, 1.0, 10.0])
    nid.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                     help="seeds (default 0-4: tables give 95%% intervals over them)")
    nid.add_argument("--protocols", nargs="+", metavar="NAME",
                     help="default: every protocol registered at run time")
    nid.add_argument("--param", action="append", metavar="NAME.KEY=VALUE",
                     help="protocol parameter (repeatable), e.g. gnmax.sigma=2")
    sec = nid.add_mutually_exclusive_group()
    sec.add_argument("--full-secure", action="store_true",
                     help="run every cell and protocol on shares too (slow)")
    sec.add_argument("--no-secure", action="store_true", help="plaintext twins only")
    nid.add_argument("--secure-combos", nargs="+", type=_combo, metavar="DATASET:ARCH",
                     default=[("digits", "mlp")], help="cells on shares (default digits:mlp)")
    nid.add_argument("--secure-owners", nargs="+", type=_owner_count, default=[3])
    nid.add_argument("--secure-alphas", nargs="+", type=_positive_float, default=[0.1, 10.0])
    nid.add_argument("--secure-protocols", nargs="+", metavar="NAME",
                     help="protocols on shares (default: all)")
    nid.add_argument("--secure-seeds", nargs="+", type=int, default=[0],
                     help="seeds of the cells on shares (default 0)")
    nid.add_argument("--samples", type=_sample_count, metavar="N",
                     help="examples of MNIST-1D to generate (mnist1d combos; default 5000)")
    nid.add_argument("--secure-queries", type=_positive_int,
                     help="answer only the first N held-out queries on shares")
    nid.add_argument("--secure-repeats", type=_positive_int, default=5,
                     help="runs on shares of each DP protocol per secure cell (default 5)")
    common(nid)

    sh = sub.add_parser("shapley", help="Shapley contribution scores on shares, label-free rewards",
                        description="Exact Shapley values (Monte-Carlo above 8 owners) of each "
                                    "owner's contribution to ensemble accuracy on the querier's "
                                    "labelled split, computed on shares: only coalition accuracies "
                                    "reach the querier. Compared with equal, agreement and "
                                    "entropy rewards (L1).")
    sh.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    sh.add_argument("--arch", default="mlp", choices=["mlp", "cnn"])
    sh.add_argument("--owners", nargs="+", type=_owner_count, default=[3, 5, 8])
    sh.add_argument("--alphas", nargs="+", type=_positive_float, default=[0.1, 1.0])
    sh.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                    help="seeds (default 0-4: tables give 95%% intervals over them)")
    sh.add_argument("--protocol", default="soft_vote", help="an additive protocol (default soft_vote)")
    sh.add_argument("--plaintext", action="store_true",
                    help="compute coalition values with the plaintext twin only (no parties)")
    sh.add_argument("--method", default="auto", choices=["auto", "exact", "permutation"])
    sh.add_argument("--permutations", type=_positive_int, default=200,
                    help="Monte-Carlo permutations (default 200)")
    sh.add_argument("--empty", default="zero", choices=["zero", "chance"],
                    help="value of the empty coalition: 0 (default) or 1/C")
    sh.add_argument("--validation", type=_positive_int,
                    help="use only the first N labelled held-out examples")
    sh.add_argument("--timeout", type=float, default=900.0)
    common(sh)

    lk = sub.add_parser("leakage", help="model extraction and membership inference per release policy",
                        description="Surrogate agreement and membership-inference advantage for "
                                    "the release policies all_outputs, averaged, label and "
                                    "dp_label (plaintext twins: the released values are those the "
                                    "secure protocols open).")
    lk.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    lk.add_argument("--owners", type=_owner_count, default=3)
    lk.add_argument("--alpha", type=_positive_float, default=0.5)
    lk.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    lk.add_argument("--budgets", nargs="+", type=_positive_int,
                    default=[10, 25, 50, 100, 200, 400, 600])
    lk.add_argument("--sigma", type=_positive_float, default=1.0,
                    help="GNMax noise std per vote count (default 1)")
    lk.add_argument("--queries-per-candidate", nargs="+", type=_positive_int,
                    default=[1, 2, 4, 8, 16, 32])
    common(lk)

    vl = sub.add_parser("valuation-leakage",
                        help="what coalition accuracies leak about the owners' classes; defences",
                        description="The chosen-subset attack on the contribution protocol (one "
                                    "validation run per class reveals which classes each owner "
                                    "trained on) before and after the owners' defences: a "
                                    "minimum validation size, DP noise on the opened counts, a "
                                    "per-querier budget (plaintext twin of the opened counts; "
                                    "--on-shares: every run on shares, the owners enforcing a "
                                    "minimum size, a jointly sampled pool, and noisy counts "
                                    "charged to their own ledgers).")
    vl.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    vl.add_argument("--owners", nargs="+", type=_owner_count, default=None,
                    help="owner counts (default 3 5; with --on-shares one count, default 3)")
    vl.add_argument("--alphas", nargs="+", type=_positive_float, default=None,
                    help="Dirichlet alphas (default 0.1 1; with --on-shares one, default 0.1)")
    vl.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    vl.add_argument("--min-validation", type=_positive_int, default=100,
                    help="the owners' minimum validation size (default 100)")
    vl.add_argument("--sigmas", nargs="+", type=_positive_float, default=[5.0, 20.0, 50.0],
                    help="Gaussian noise std on every opened count (default 5 20 50)")
    vl.add_argument("--budget", type=_positive_float, default=2.0,
                    help="per-querier epsilon cap of the dp+budget rows (default 2)")
    vl.add_argument("--on-shares", action="store_true",
                    help="run the attacks with every run on shares, the owners enforcing the "
                         "defences (minimum size, jointly sampled pool, noisy counts charged to "
                         "their ledgers); writes valuation_leakage_shares.{csv,md}")
    vl.add_argument("--min-pool", type=_positive_int, default=100,
                    help="with --on-shares: the owners' minimum pool (default 100)")
    vl.add_argument("--sample", type=_positive_int, default=50,
                    help="with --on-shares: queries the parties draw from the pool (default 50)")
    vl.add_argument("--count-sigma", type=_positive_float, default=10.0,
                    help="with --on-shares: noise std on every opened count (default 10)")
    common(vl)

    ld = sub.add_parser("local-dp",
                        help="local DP (randomized response per owner) vs GNMax on shares",
                        description="k-ary randomized response on each owner's vote (local DP) "
                                    "against GNMax and Confident-GNMax on the vote histogram "
                                    "(central DP on shares), calibrated to the same (epsilon, "
                                    "delta) over the whole query set; accuracy, agreement with "
                                    "the non-private ensemble and answered rate over epsilon and "
                                    "the number of owners (seeded plaintext twins), and GNMax "
                                    "on shares for a few cells.")
    ld.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    ld.add_argument("--samples", type=_sample_count, metavar="N",
                    help="examples of MNIST-1D to generate (--dataset mnist1d; default 5000)")
    ld.add_argument("--owners", nargs="+", type=_owner_count, default=[5, 25, 100, 250])
    ld.add_argument("--epsilons", nargs="+", type=_positive_float,
                    default=[1.0, 4.0, 16.0, 64.0, 256.0],
                    help="total epsilon per owner over all queries (default 1 4 16 64 256)")
    ld.add_argument("--delta", type=_positive_float, default=1e-5)
    ld.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                    help="seeds (default 0-4: tables give 95%% intervals over them)")
    ld.add_argument("--queries", type=_positive_int,
                    help="answer only the first Q held-out queries (default: all 540)")
    ld.add_argument("--no-confident", action="store_true", help="leave out confident_gnmax")
    ld.add_argument("--confident-threshold", type=float, default=0.5, metavar="FRACTION",
                    help="confident_gnmax threshold: floor(FRACTION * N) + 1 votes (default 0.5: "
                         "a strict majority)")
    ld.add_argument("--confident-ratio", type=_positive_float, default=2.0,
                    help="confident_gnmax sigma_threshold / sigma (default 2)")
    ld.add_argument("--no-secure", action="store_true", help="plaintext twins only")
    ld.add_argument("--secure-owners", nargs="+", type=_owner_count, default=[5])
    ld.add_argument("--secure-epsilons", nargs="+", type=_positive_float, default=[64.0, 256.0])
    ld.add_argument("--secure-repeats", type=_positive_int, default=1,
                    help="runs on shares per secure cell and seed (default 1)")
    ld.add_argument("--timeout", type=float, default=900.0)
    common(ld)

    at = sub.add_parser("attacks",
                        help="LiRA membership inference, extraction off-distribution, label skew",
                        description="Membership inference with shadow models (LiRA; TPR at 0.1 "
                                    "% and 1 % FPR) against owners trained as the demo and "
                                    "owners that overfit; distillation from synthetic and "
                                    "out-of-distribution queries; inference of each owner's "
                                    "class distribution; per release policy (plaintext twins).")
    at.add_argument("--experiments", nargs="+", choices=["membership", "extraction", "skew"],
                    default=["membership", "extraction", "skew"])
    at.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                    help="seeds (default 0-4: tables give 95%% intervals over them)")
    at.add_argument("--owners", type=_owner_count, default=3,
                    help="owners of the membership and extraction federations (default 3)")
    at.add_argument("--alpha", type=_positive_float, default=0.5)
    at.add_argument("--shadows", type=_positive_int, default=16,
                    help="shadow federations per seed and regime (default 16)")
    at.add_argument("--nonmembers", type=_positive_int, default=1600,
                    help="non-member scores per seed (sets the number of target federations)")
    at.add_argument("--label-queries", type=_positive_int, default=16,
                    help="queries per candidate of the label-only attacks (default 16)")
    at.add_argument("--sigma", type=_positive_float, default=1.0,
                    help="GNMax noise std per vote count (default 1)")
    at.add_argument("--budgets", nargs="+", type=_positive_int, default=[100, 300, 600, 2000],
                    help="extraction query budgets")
    at.add_argument("--sources", nargs="+", metavar="SOURCE",
                    choices=["in_distribution", "uniform", "gaussian", "mixup", "ood_patches",
                             "ood_permuted"],
                    default=["in_distribution", "uniform", "gaussian", "mixup", "ood_patches",
                             "ood_permuted"])
    at.add_argument("--skew-owners", nargs="+", type=_owner_count, default=[3, 5])
    at.add_argument("--skew-alphas", nargs="+", type=_positive_float, default=[0.1, 1.0])
    at.add_argument("--no-secure", action="store_true",
                    help="skip the membership spot-check on shares (one federation, a few s)")
    at.add_argument("--timeout", type=float, default=900.0)
    common(at)

    si = sub.add_parser("split-inference",
                        help="feature inversion: split deployment vs the public-backbone mode",
                        description="An owner trains an inversion network (features -> query) on "
                                    "its auxiliary data and decodes held-out queries, from the "
                                    "backbone's plaintext features (split deployment) and from its "
                                    "own shares and received openings in mpc-fi's public-backbone "
                                    "mode (real parties, wire audit on), for backbones of several "
                                    "depths and widths.")
    si.add_argument("--backbones", nargs="+", type=_backbone, metavar="DEPTHxWIDTH",
                    default=[(1, 8), (1, 32), (2, 32), (3, 64)],
                    help="backbones as DEPTHxWIDTH (default 1x8 1x32 2x32 3x64)")
    si.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                    help="seeds (default 0-4: tables give 95%% intervals over them)")
    si.add_argument("--owners", type=_owner_count, default=3)
    si.add_argument("--queries", type=_positive_int,
                    help="decode only the first Q held-out queries (default: all 540)")
    si.add_argument("--inverter-epochs", type=_positive_int, default=600)
    si.add_argument("--no-secure", action="store_true",
                    help="plaintext features only (no parties, no shares row)")
    si.add_argument("--timeout", type=float, default=600.0)
    common(si)

    al = sub.add_parser("all", help="every study with its defaults")
    al.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                    help="seeds of every study (default 0-4)")
    common(al)


def _emit(name: str, text: str, out: Path) -> None:
    (out / f"{name}.md").write_text(text)
    print(text)


def _noniid(args: argparse.Namespace, out: Path) -> None:
    from .common import parse_param_overrides, write_csv  # noqa: PLC0415
    from .noniid import COMBOS, FULL_SECURE, NoniidConfig, SecureCell, markdown_report, \
        run_noniid  # noqa: PLC0415

    secure = None if getattr(args, "no_secure", False) else (
        FULL_SECURE if getattr(args, "full_secure", False) else SecureCell(
            combos=tuple(getattr(args, "secure_combos", [("digits", "mlp")])),
            owners=tuple(getattr(args, "secure_owners", [3])),
            alphas=tuple(getattr(args, "secure_alphas", [0.1, 10.0])),
            protocols=tuple(args.secure_protocols) if getattr(args, "secure_protocols", None)
            else None, seeds=tuple(getattr(args, "secure_seeds", [0]))))
    cfg = NoniidConfig(combos=tuple(getattr(args, "combos", None) or COMBOS),
                       owners=tuple(getattr(args, "owners", (3, 5, 8))),
                       alphas=tuple(getattr(args, "alphas", (0.1, 0.3, 1.0, 10.0))),
                       seeds=tuple(args.seeds),
                       protocols=tuple(args.protocols) if getattr(args, "protocols", None) else None,
                       params=parse_param_overrides(getattr(args, "param", None)),
                       secure=secure, secure_queries=getattr(args, "secure_queries", None),
                       secure_repeats=getattr(args, "secure_repeats", 5),
                       samples=getattr(args, "samples", None))
    rows = run_noniid(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "noniid.csv")
    _emit("noniid", markdown_report(rows), out)
    if not args.no_plots:
        from .plots import noniid_plots  # noqa: PLC0415

        noniid_plots(rows, out)


def _shapley(args: argparse.Namespace, out: Path) -> None:
    from .common import write_csv  # noqa: PLC0415
    from .contribution import ShapleyConfig, markdown_report, run_shapley  # noqa: PLC0415

    cfg = ShapleyConfig(seeds=tuple(args.seeds))
    if args.study == "shapley":
        cfg = ShapleyConfig(dataset=args.dataset, arch=args.arch, owners=tuple(args.owners),
                            alphas=tuple(args.alphas), seeds=tuple(args.seeds),
                            protocol=args.protocol,
                            secure=not args.plaintext, method=args.method,
                            permutations=args.permutations, empty=args.empty,
                            validation=args.validation, timeout_s=args.timeout)
    rows, reports = run_shapley(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "shapley.csv")
    _emit("shapley", markdown_report(reports), out)
    if not args.no_plots:
        from .plots import shapley_plot  # noqa: PLC0415

        shapley_plot(reports, out)


def _leakage(args: argparse.Namespace, out: Path) -> None:
    from .common import write_csv  # noqa: PLC0415
    from .leakage import LeakageConfig, markdown_report, run_leakage  # noqa: PLC0415

    cfg = LeakageConfig(seeds=tuple(args.seeds))
    if args.study == "leakage":
        cfg = LeakageConfig(dataset=args.dataset, num_owners=args.owners, alpha=args.alpha,
                            seeds=tuple(args.seeds), budgets=tuple(args.budgets),
                            sigma=args.sigma,
                            queries_per_candidate=tuple(args.queries_per_candidate))
    rows = run_leakage(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "leakage.csv")
    _emit("leakage", markdown_report(rows), out)
    if not args.no_plots:
        from .plots import leakage_plot  # noqa: PLC0415

        leakage_plot(rows, out)


def _valuation_leakage(args: argparse.Namespace, out: Path) -> None:
    from .common import write_csv  # noqa: PLC0415
    from .valuation_leakage import ValuationLeakageConfig, markdown_report, \
        run_valuation_leakage  # noqa: PLC0415

    cfg = ValuationLeakageConfig(seeds=tuple(args.seeds))
    if args.study == "valuation-leakage" and args.on_shares:
        _valuation_leakage_on_shares(args, out)
        return
    if args.study == "valuation-leakage":
        cfg = ValuationLeakageConfig(dataset=args.dataset, owners=tuple(args.owners or (3, 5)),
                                     alphas=tuple(args.alphas or (0.1, 1.0)),
                                     seeds=tuple(args.seeds),
                                     min_validation=args.min_validation,
                                     sigmas=tuple(args.sigmas), budget=args.budget)
    rows = run_valuation_leakage(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "valuation_leakage.csv")
    _emit("valuation_leakage", markdown_report(rows), out)


def _valuation_leakage_on_shares(args: argparse.Namespace, out: Path) -> None:
    from .common import write_csv  # noqa: PLC0415
    from .valuation_leakage import SecureLeakageConfig, markdown_secure_report, \
        run_secure_valuation_leakage  # noqa: PLC0415

    owners, alphas = args.owners or [3], args.alphas or [0.1]
    for key, values in (("--owners", owners), ("--alphas", alphas)):
        if len(values) != 1:
            raise ConfigError(f"--on-shares runs one setting: give one value, got {values}",
                              key=key)
    cfg = SecureLeakageConfig(dataset=args.dataset, owners=owners[0], alpha=alphas[0],
                              seeds=tuple(args.seeds), min_validation=args.min_validation,
                              min_pool=args.min_pool, sample=args.sample,
                              sigma=args.count_sigma, budget=args.budget)
    rows = run_secure_valuation_leakage(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "valuation_leakage_shares.csv")
    _emit("valuation_leakage_shares", markdown_secure_report(rows), out)


def _local_dp(args: argparse.Namespace, out: Path) -> None:
    from .common import write_csv  # noqa: PLC0415
    from .local_dp import LocalDpConfig, calibration_rows, markdown_report, \
        run_local_dp  # noqa: PLC0415

    cfg = LocalDpConfig(seeds=tuple(args.seeds))
    if args.study == "local-dp":
        if args.samples is not None and args.dataset != "mnist1d":
            raise ConfigError("a sample count applies to --dataset mnist1d only", key="--samples")
        cfg = LocalDpConfig(dataset=args.dataset, samples=args.samples,
                            owners=tuple(args.owners), epsilons=tuple(args.epsilons),
                            delta=args.delta, seeds=tuple(args.seeds), queries=args.queries,
                            confident=not args.no_confident,
                            threshold_fraction=args.confident_threshold,
                            ratio=args.confident_ratio, secure=not args.no_secure,
                            secure_owners=tuple(args.secure_owners),
                            secure_epsilons=tuple(args.secure_epsilons),
                            secure_repeats=args.secure_repeats, timeout_s=args.timeout)
    rows, calibrations = run_local_dp(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "local_dp.csv")
    write_csv(calibration_rows(calibrations), out / "local_dp_calibration.csv")
    _emit("local_dp", markdown_report(rows, calibrations), out)
    if not args.no_plots:
        from .plots import local_dp_plot  # noqa: PLC0415

        local_dp_plot(rows, out)


def _attacks(args: argparse.Namespace, out: Path) -> None:
    import json  # noqa: PLC0415

    from .attacks import AttacksConfig, markdown_report, run_attacks, summary  # noqa: PLC0415
    from .common import write_csv  # noqa: PLC0415

    cfg = AttacksConfig(seeds=tuple(args.seeds))
    if args.study == "attacks":
        cfg = AttacksConfig(seeds=tuple(args.seeds), experiments=tuple(args.experiments),
                            num_owners=args.owners, alpha=args.alpha, shadows=args.shadows,
                            nonmembers=args.nonmembers, label_queries=args.label_queries,
                            sigma=args.sigma, budgets=tuple(args.budgets),
                            sources=tuple(args.sources), skew_owners=tuple(args.skew_owners),
                            skew_alphas=tuple(args.skew_alphas),
                            secure_check=not args.no_secure, timeout_s=args.timeout)
    rows = run_attacks(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "attacks.csv")
    (out / "attacks.json").write_text(json.dumps(summary(rows), indent=1) + "\n")
    _emit("attacks", markdown_report(rows), out)
    if not args.no_plots:
        from .plots import attacks_plot  # noqa: PLC0415

        attacks_plot(rows, out)


def _split_inference(args: argparse.Namespace, out: Path) -> None:
    from .common import write_csv  # noqa: PLC0415
    from .split_inference import SplitConfig, markdown_report, \
        run_split_inference  # noqa: PLC0415

    cfg = SplitConfig(seeds=tuple(args.seeds))
    if args.study == "split-inference":
        cfg = SplitConfig(backbones=tuple(args.backbones), seeds=tuple(args.seeds),
                          num_owners=args.owners, queries=args.queries,
                          inverter_epochs=args.inverter_epochs, secure=not args.no_secure,
                          timeout_s=args.timeout)
    rows = run_split_inference(cfg, show_progress=not args.quiet)
    write_csv(rows, out / "split_inference.csv")
    _emit("split_inference", markdown_report(rows), out)
    if not args.no_plots:
        from .plots import split_inference_plot  # noqa: PLC0415

        split_inference_plot(rows, out)


def study_main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpc-fi study``; returns the process exit code.

    ``argv`` is what follows ``study`` on the command line (``None``: ``sys.argv[1:]``).
    """
    args = build_study_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="crypten")
    try:
        return run_study(args)
    except MpcFiError as exc:
        print(f"mpc-fi study: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mpc-fi study: interrupted; every party was stopped", file=sys.stderr)
        return 130


def run_study(args: argparse.Namespace) -> int:
    """Run the studies a parsed namespace asks for; raises MpcFiError on failure."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {out}: {exc}", key="--out") from None
    if args.study in ("noniid", "all"):
        _noniid(args, out)
    if args.study in ("shapley", "all"):
        _shapley(args, out)
    if args.study in ("leakage", "all"):
        _leakage(args, out)
    if args.study in ("valuation-leakage", "all"):
        _valuation_leakage(args, out)
    if args.study in ("local-dp", "all"):
        _local_dp(args, out)
    if args.study in ("attacks", "all"):
        _attacks(args, out)
    if args.study in ("split-inference", "all"):
        _split_inference(args, out)
    print(f"results in {out}/", file=sys.stderr)
    return 0

