"""``mpc-fi``: the command line.

``mpc-fi run`` runs a local federated inference (the embedded digits demo by default, or a
federation file), ``mpc-fi party`` runs one party of a multi-host federation (``mpc-fi serve``:
as a long-lived service, asked with ``mpc-fi ask``), ``mpc-fi keygen`` makes a party's key
pair, ``mpc-fi protocols`` lists the aggregation protocols, ``mpc-fi validate`` checks a
federation file, ``mpc-fi budget`` reads the owners' privacy ledgers on this host, ``mpc-fi
study`` runs the collaboration-value, contribution and leakage experiments. Protocol cost is
measured by
the benchmark suites of the source checkout (``make bench``, ``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import EXIT_CODES, ConfigError, InsecureSettingWarning, MpcFiError, Terminated

EPILOG = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


def _step(msg: str) -> None:
    print(msg, flush=True)


def _print_costs(costs) -> None:
    print(f"\n{'party':<12} {'role':<8} {'wall s':>8} {'rounds':>8} {'bytes sent':>12} {'peak RSS MB':>12}")
    for c in costs:
        print(f"{c.party:<12} {c.role:<8} {c.wall_s:>8.2f} {c.rounds:>8d} {c.bytes_sent:>12,d} "
              f"{c.peak_rss_mb:>12.0f}")
    print("(rounds = CrypTen collective calls; bytes = elements x 8 as CrypTen counts them; "
          "inference phase only, after set-up)")


def _emit_labels(labels: np.ndarray, output: str | None) -> None:
    """The querier's labels: saved as .npy when asked, printed otherwise."""
    if output:
        np.save(output, labels)
        _step(f"labels written to {output}")
    else:
        print("labels:", " ".join(map(str, labels.tolist())))


def check_output(output: str | None) -> None:
    """Refuse an unusable ``--output`` before any party starts.

    Found only when the labels are written, it would lose the run's answers, and a
    differentially private run would have been charged for them already.
    """
    if not output:
        return
    path = Path(output)
    if path.is_dir():
        raise ConfigError(f"{output} is a folder; give the labels file, e.g. "
                          f"{path / 'labels.npy'}", key="--output")
    if path.suffix != ".npy":
        raise ConfigError(f"the labels are saved as a NumPy array: name the file *.npy, got "
                          f"{output!r}", key="--output")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"folder {folder} does not exist; create it first", key="--output")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists()
                                                    and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write {output}: no permission (or a read-only file system)",
                          key="--output")


class _ProgressBar:
    """A tqdm bar over the querier's batches, on a terminal only (quiet when stderr is not a
    TTY: logs, pipes, CI). Used as ``Federation(..., progress=bar)``."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, unit="batch", desc="secure inference", file=sys.stderr,
                            leave=False)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _report_run_dir(result) -> None:  # noqa: ANN001 - a RunResult
    if result.run_dir_kept:
        _step(f"party logs in {result.run_dir}")
    else:
        _step(f"party logs removed with their temporary folder {result.run_dir} after the "
              "successful run (--keep-run-dir keeps them)")


def _federation_kwargs(args: argparse.Namespace, bar: _ProgressBar) -> dict:
    return {"timeout_s": args.timeout, "run_dir": args.run_dir,
            "memory_limit_mb": args.memory_limit_mb, "keep_run_dir": args.keep_run_dir,
            "progress": bar}


def cmd_run(args: argparse.Namespace) -> int:
    from .federation import Federation  # noqa: PLC0415

    if args.federation:
        from .config import FederationConfig  # noqa: PLC0415

        check_output(args.output)
        fed = FederationConfig.load(args.federation)
        _step(f"running federation {args.federation}: {fed.num_owners} owners, mode {fed.mode}, "
              f"protocol {fed.protocol.name}")
        bar = _ProgressBar()
        try:
            result = Federation(fed, **_federation_kwargs(args, bar)).run()
        finally:
            bar.close()
        _emit_labels(result.prediction.labels, args.output)
        _print_costs(result.costs)
        _report_budget(result.budget)
        _report_run_dir(result)
        return 0
    return _run_demo(args, Federation)


def _report_budget(report) -> None:  # noqa: ANN001 - a BudgetReport or None
    if report is not None:
        _step(f"privacy budget, as the owners record it: {report.describe()}")


def _run_demo(args: argparse.Namespace, Federation) -> int:  # noqa: N803 - a class
    from .plugins import PROTOCOLS, demo_module, lookup  # noqa: PLC0415

    demo = demo_module()  # the demos package, beside the engine (entry point mpc_fi.demo)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpc-fi-demo-"))
    _step(f"[1/4] training {args.owners} owners on {args.dataset} (non-IID Dirichlet alpha="
          f"{args.alpha}, seed {args.seed}) ...")
    t0 = time.perf_counter()
    setup = demo.prepare(workdir, dataset=args.dataset, num_owners=args.owners, alpha=args.alpha,
                         seed=args.seed, arch=args.arch, mode=args.mode, protocol=args.protocol,
                         reveal=args.reveal, dealer=args.dealer, batch_size=args.batch_size)
    x, y = setup.x_test, setup.y_test
    if args.queries:
        x, y = x[:args.queries], y[:args.queries]
    logits = demo.owner_logits(setup.models, x)
    _step(f"      done in {time.perf_counter() - t0:.1f} s; owners hold {setup.owner_sizes} "
          f"training examples; weights in {workdir}")
    for k, lg in enumerate(logits):
        acc = float((lg.argmax(-1).numpy() == y).mean())
        print(f"      owner{k} accuracy: {acc:.4f}")
    mean_owner = float(np.mean([(lg.argmax(-1).numpy() == y).mean() for lg in logits]))

    _step(f"[2/4] plaintext reference ({args.protocol}) ...")
    cls = lookup(PROTOCOLS, args.protocol, key="--protocol")
    twin = cls(num_classes=len(np.unique(setup.y_test)), num_owners=args.owners,
               reveal=args.reveal, precision_bits=setup.federation.precision_bits)
    ref = twin.plaintext(logits).labels
    ref_acc = float((ref == y).mean())

    _step(f"[3/4] secure federated inference on {len(x)} queries (mode {args.mode}, dealer "
          f"{args.dealer}, {args.owners} owners + querier"
          + (" + dealer" if args.dealer == "ttp" else "") + " as processes) ...")
    t1 = time.perf_counter()
    bar = _ProgressBar()
    try:
        result = Federation(setup.federation, **_federation_kwargs(args, bar)).run(x)
    finally:
        bar.close()
    secure = result.prediction.labels
    kept = f"party logs in {result.run_dir}" if result.run_dir_kept else \
        "party logs removed after the successful run; --keep-run-dir keeps them"
    _step(f"      done in {time.perf_counter() - t1:.1f} s ({kept})")

    _step("[4/4] results")
    answered = secure != -1
    sec_acc = float((secure[answered] == y[answered]).mean()) if answered.any() else float("nan")
    agree = float((secure == ref).mean())
    print(f"      mean owner accuracy        {mean_owner:.4f}")
    print(f"      plaintext ensemble         {ref_acc:.4f}")
    print(f"      secure ensemble            {sec_acc:.4f}"
          + ("" if answered.all() else f"  ({int((~answered).sum())} abstentions)"))
    print(f"      secure/plaintext agreement {agree:.4f} ({int((secure == ref).sum())}/{len(x)} labels)")
    _print_costs(result.costs)
    return 0


def cmd_party(args: argparse.Namespace) -> int:
    from .config import FederationConfig  # noqa: PLC0415
    from .plugins import LAUNCHERS, lookup  # noqa: PLC0415

    check_output(args.output)
    fed = FederationConfig.load(args.federation)
    launcher = lookup(LAUNCHERS, "host", key="launcher")(
        fed, party=args.party, run_dir=args.run_dir, timeout_s=args.timeout,
        memory_limit_mb=args.memory_limit_mb, keep_run_dir=args.keep_run_dir,
        **({"key": args.key} if args.key else {}))
    results = launcher.run()
    out = results.get(fed.querier_rank)
    if out is not None and "labels" in out:
        _emit_labels(out["labels"], args.output)
        if out.get("budget") is not None:
            from .result import BudgetReport  # noqa: PLC0415

            _report_budget(BudgetReport.from_dict(out["budget"]))
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    from .budget import open_ledger, querier_identity  # noqa: PLC0415
    from .config import FederationConfig  # noqa: PLC0415
    from .privacy import PrivacyBudget  # noqa: PLC0415

    fed = FederationConfig.load(args.federation)
    if fed.privacy is None:
        raise ConfigError(f"{args.federation} has no privacy section: no budget is kept",
                          key="privacy")
    owners = [o.name for o in fed.owners]
    for name in args.party or []:
        if name not in owners:
            raise ConfigError(f"{name!r} is not an owner of this federation; the owners keep the "
                              f"binding ledgers: {', '.join(owners)}", key="--party")
    eps, delta = fed.privacy.epsilon, fed.privacy.delta
    ours = querier_identity(fed)
    print(f"privacy budget epsilon={eps:g}, delta={delta:g} per querier; this federation's "
          f"querier is {ours}")

    def show(budget: PrivacyBudget, queriers: list[str]) -> None:
        if not queriers:
            print("  nothing recorded for " + (args.querier or "any querier"))
        for who in queriers:
            history = budget.history(who)
            spent = budget.spent(who)
            mark = "  (this federation's querier)" if who == ours else ""
            print(f"  {who}: spent epsilon={spent:.6g} of {eps:g}, remaining "
                  f"{max(0.0, eps - spent):.6g}, in {len(history)} charge(s){mark}")

    for index, owner in enumerate(fed.owners):
        if args.party and owner.name not in args.party:
            continue
        path = owner.ledger_path()
        if not path.exists():
            print(f"{owner.name}: no ledger at {path} on this host (nothing recorded here)")
            continue
        budget = open_ledger(fed, index)
        print(f"{owner.name}: ledger {path}")
        show(budget, [args.querier] if args.querier else budget.queriers())
    if not args.party and fed.privacy.budget_file:
        path = Path(fed.privacy.budget_file)
        print("querier's own ledger (a convenience of the Python API; the owners' ledgers "
              "bind): " + (str(path) if path.exists() else f"none at {path}"))
        if path.exists():
            budget = PrivacyBudget(path, epsilon=eps, delta=delta)
            show(budget, [args.querier] if args.querier else budget.queriers())
    return 0


def cmd_protocols(args: argparse.Namespace) -> int:
    from .plugins import PROTOCOLS, registry  # noqa: PLC0415

    for name, cls in sorted(registry(PROTOCOLS).items()):
        print(f"{name:<22} {cls.summary}")
        for kind, what in cls.releases.items():
            print(f"{'':<22}   reveal={kind}: the querier learns {what}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import FederationConfig  # noqa: PLC0415

    fed = FederationConfig.load(args.federation)
    low, high = fed.querier.value_range
    declared = "" if fed.querier.input_range else " (undeclared: the widest allowed)"
    print(f"ok: {fed.num_owners} owners ({', '.join(o.name for o in fed.owners)}), querier "
          f"{fed.querier.name}, mode {fed.mode}, protocol {fed.protocol.name}, reveal {fed.reveal}, "
          f"dealer {fed.dealer}, query values in [{low:g}, {high:g}]{declared}, fingerprint "
          f"{fed.fingerprint()}")
    print("ranks: " + ", ".join(f"{rank} {fed.role_of(rank)} {name}"
                                for rank, name in enumerate(fed.party_names)))
    if not args.no_files:
        from .preflight import check_files  # noqa: PLC0415

        for line in check_files(fed, parties=args.party):
            print(f"ok: {line}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import FederationConfig  # noqa: PLC0415
    from .plugins import LAUNCHERS, lookup  # noqa: PLC0415

    environ = dict(os.environ)  # the party's run sets its rank's variables: rejoin without them
    fed = FederationConfig.load(args.federation)
    socket_path = str(Path(args.socket).resolve())
    launcher = lookup(LAUNCHERS, "host", key="launcher")(
        fed, party=args.party, run_dir=args.run_dir, memory_limit_mb=args.memory_limit_mb,
        keep_run_dir=args.keep_run_dir, serve_socket=socket_path,
        **({"key": args.key} if args.key else {}))
    if launcher.rank == fed.querier_rank:
        print(f"mpc-fi: the querier's requests: unix socket {socket_path} (mode 0600; "
              "mpc_fi.connect() or `mpc-fi ask`)", file=sys.stderr, flush=True)
    from .errors import SessionLost  # noqa: PLC0415

    try:
        results = launcher.run()
    except SessionLost as exc:
        # A peer was lost: rejoin a new session as a fresh process (same command, same PID), so
        # nothing of the old session's state (CrypTen, the channels, the shares) carries over.
        print(f"mpc-fi: {launcher.party}: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    served = next(iter(results.values())).get("served", 0)
    _step(f"served {served} request(s)")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .data import load_queries  # noqa: PLC0415
    from .serve import connect  # noqa: PLC0415

    check_output(args.output)
    with connect(args.socket, timeout_s=args.timeout, wait_s=args.wait) as fed:
        if args.health:
            print(fed.health())
        if args.queries:
            _emit_labels(fed.predict(load_queries(args.queries)), args.output)
        if args.stop:
            fed.stop()
            _step("the served federation stopped")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .keys import fingerprint, generate, read_public  # noqa: PLC0415

    public, secret = generate(args.dir, args.name, force=args.force)
    key = read_public(str(public))
    print(f"public key  {public}  (share it: identities: {{{args.name}: {public.name}}})")
    print(f"secret key  {secret}  (mode 0600; keep it on this host, never share it)")
    print(f"{args.name}: {key}  fingerprint {fingerprint(key)}")
    return 0


def _host_party_arguments(cmd: argparse.ArgumentParser) -> None:
    """What ``mpc-fi party`` and ``mpc-fi serve`` both take: which party, its key, its files."""
    cmd.add_argument("--federation", metavar="FILE", required=True)
    cmd.add_argument("--party", metavar="NAME", help="this host's party (default: from RANK)")
    cmd.add_argument("--key", metavar="NAME.key_secret",
                     help="this party's secret key (mpc-fi keygen), when the federation names "
                          "identities (default: NAME.key_secret beside the NAME.key file the "
                          "federation names for this party)")
    cmd.add_argument("--run-dir", help="folder for this party's log and result (default: a "
                                       "temporary folder, removed after a successful run)")
    cmd.add_argument("--keep-run-dir", action="store_true",
                     help="keep the temporary run folder after a successful run too")
    cmd.add_argument("--memory-limit-mb", type=float, metavar="MIB",
                     help="working memory of this party for one batch; larger batches are "
                          "split, a query that cannot fit is refused on every party (default: "
                          "half of this host's available memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpc-fi", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Secure multiparty computation for federated inference: owners' classifiers "
                    "answer a query together on secret shares; only the aggregate reaches the querier.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        help="run a local federated inference (the embedded digits demo by default)",
        description="Run every party as a local process. Without --federation: the embedded demo "
                    "(scikit-learn's bundled digits, owners trained at start-up on a non-IID split, "
                    "the querier holding the held-out split); it prints each owner's accuracy, the "
                    "plaintext and secure ensemble accuracies, their label agreement and the cost "
                    "per party. On a terminal, a progress bar follows the querier's batches; the "
                    "output names the folder of the party logs.")
    run.add_argument("--federation", metavar="FILE", help="run this federation file instead of the demo")
    run.add_argument("--output", metavar="FILE.npy", help="with --federation: save the labels here")
    demo = run.add_argument_group("demo options (ignored with --federation)")
    demo.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    demo.add_argument("--owners", type=int, default=3, help="number of model owners (default 3)")
    demo.add_argument("--alpha", type=float, default=0.5,
                      help="Dirichlet concentration of the non-IID split (default 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="data split and training seed (default 0)")
    demo.add_argument("--arch", default="mlp", choices=["mlp", "cnn"], help="owner model (default mlp)")
    demo.add_argument("--mode", default="output", choices=["output", "full"],
                      help="output: owners see the query, predictions stay secret; full: the query "
                           "and the owners' weights are secret-shared too (default output)")
    demo.add_argument("--protocol", default="soft_vote", help="aggregation protocol (see `mpc-fi protocols`)")
    demo.add_argument("--reveal", default="label", choices=["label", "scores"],
                      help="what the querier learns (default: the label only)")
    demo.add_argument("--dealer", default="ttp", choices=["ttp", "insecure-party-dealer"],
                      help="source of correlated randomness (default: a separate trusted dealer)")
    demo.add_argument("--queries", type=int, help="answer only the first N held-out queries")
    demo.add_argument("--batch-size", type=int, default=None,
                      help="queries per secure batch (default: as few batches as the parties' "
                           "memory allows)")
    demo.add_argument("--workdir", help="where owners' weight files go (default: a temporary folder)")
    run.add_argument("--timeout", type=float, default=900.0, help="bound on the run in seconds (default 900)")
    run.add_argument("--run-dir", help="folder for party logs and results, kept after the run "
                                       "(default: a temporary folder, removed after a successful "
                                       "run; a failed run keeps it and the error names it)")
    run.add_argument("--keep-run-dir", action="store_true",
                     help="keep the temporary run folder (party logs) after a successful run too")
    run.add_argument("--memory-limit-mb", type=float, metavar="MIB",
                     help="working memory per party for one batch; larger batches are split "
                          "(default: half of this host's available memory, shared by the parties)")
    run.set_defaults(func=cmd_run)

    party = sub.add_parser(
        "party", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        help="run one party of a multi-host federation on this host",
        description="Run the named party of FILE on this host; every party runs the same command "
                    "with its own --party. Rendezvous at network.address:network.port of the "
                    "federation file, or at MASTER_ADDR/MASTER_PORT with RANK/WORLD_SIZE when "
                    "started by torchrun or a scheduler.")
    _host_party_arguments(party)
    party.add_argument("--output", metavar="FILE.npy", help="querier only: save the labels here")
    party.add_argument("--timeout", type=float, default=900.0, help="bound on the run in seconds (default 900)")
    party.set_defaults(func=cmd_party)

    serve = sub.add_parser(
        "serve", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        help="run one party of a federation as a long-lived service on this host",
        description="Like `mpc-fi party`, but the party stays up and answers many query batches: "
                    "it joins once, loads its model once (full mode: shares its weights once), "
                    "and serves until the querier says stop (`mpc-fi ask --stop`) or receives "
                    "SIGTERM (the request in flight is finished first). The querier's party "
                    "takes requests on a Unix socket (--socket, mode 0600) from mpc_fi.connect() "
                    "or `mpc-fi ask`. When another party stops, the request in flight fails "
                    "naming it and this party rejoins a new session (it re-executes itself and "
                    "waits for the lost party; the querier refuses requests meanwhile, naming "
                    "it); start the lost party again with its usual command.")
    _host_party_arguments(serve)
    serve.add_argument("--socket", default="mpc-fi-querier.sock", metavar="PATH",
                       help="querier only: where its requests arrive (default: "
                            "./mpc-fi-querier.sock)")
    serve.set_defaults(func=cmd_serve)

    ask = sub.add_parser(
        "ask", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        help="send queries to a served federation (the querier's socket)",
        description="Send QUERIES (.npy, .pt or .csv) to the federation served by `mpc-fi "
                    "serve` through the querier's socket; print or save the labels.")
    ask.add_argument("queries", nargs="?", metavar="QUERIES")
    ask.add_argument("--socket", default="mpc-fi-querier.sock", metavar="PATH")
    ask.add_argument("--output", metavar="FILE.npy", help="save the labels here")
    ask.add_argument("--health", action="store_true", help="print the session's status")
    ask.add_argument("--stop", action="store_true", help="end the session (every party leaves)")
    ask.add_argument("--timeout", type=float, default=600.0, help="bound on one request (s)")
    ask.add_argument("--wait", type=float, default=0.0, metavar="S",
                     help="wait up to S seconds for the socket to appear and every party to join")
    ask.set_defaults(func=cmd_ask)

    keygen = sub.add_parser(
        "keygen", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        help="make a party's key pair (its identity in a federation)",
        description="Write NAME.key (the public key: give it to the federation's other parties, "
                    "who list it under identities.NAME) and NAME.key_secret (the secret key, "
                    "readable by you only: it never leaves this host) in --dir. With identities "
                    "in the federation file, every party proves it holds its secret key before "
                    "any protocol byte, and every message between parties is encrypted and "
                    "authenticated (ZeroMQ CurveZMQ).")
    keygen.add_argument("name", metavar="NAME", help="the party's name in the federation")
    keygen.add_argument("--dir", default=".", help="where to write the two files (default: here)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(func=cmd_keygen)

    protocols = sub.add_parser("protocols", help="list the aggregation protocols and what each reveals")
    protocols.set_defaults(func=cmd_protocols)

    validate = sub.add_parser(
        "validate", help="check a federation file and the files it names, without starting anything",
        description="Check a federation file (every key, the protocol and its parameters), then "
                    "load what it names the way the parties would: each owner's model (factory, "
                    "weights or ONNX file), the query file, the owners' class counts and, in full "
                    "mode, the supported layers and fixed-point range. On a host that runs only "
                    "some parties, name them with --party: the others' files are not checked.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    validate.add_argument("federation", metavar="FILE")
    validate.add_argument("--party", action="append", metavar="NAME",
                          help="check only this party's files (repeatable; default: every party)")
    validate.add_argument("--no-files", action="store_true",
                          help="check the file's settings only, not the files it names")
    validate.set_defaults(func=cmd_validate)

    budget = sub.add_parser(
        "budget", help="show the privacy budget the owners' ledgers on this host record",
        description="Read the privacy ledgers of the owners of FILE that are on this host (each "
                    "owner keeps its own, at owners[i].ledger or under $XDG_STATE_HOME/mpc-fi/"
                    "ledgers/) and print, per querier identity, the epsilon spent and what is "
                    "left of the federation's privacy budget. Each owner enforces its own "
                    "ledger: the owner that has recorded the most decides. On a host that runs "
                    "one owner, name it with --party. Reading never creates or changes a ledger.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    budget.add_argument("--federation", metavar="FILE", required=True)
    budget.add_argument("--party", action="append", metavar="OWNER",
                        help="read only this owner's ledger (repeatable; default: every owner's "
                             "ledger found on this host, and the querier's own budget_file)")
    budget.add_argument("--querier", metavar="ID",
                        help="show only this querier identity (key:<fingerprint> or "
                             "name:<querier name>; default: every querier a ledger records)")
    budget.set_defaults(func=cmd_budget)


    # Commands that live beside the engine (``mpc-fi study``: the studies package) come through
    # the ``mpc_fi.commands`` entry point group: mpc_fi never imports them itself.
    from importlib.metadata import entry_points  # noqa: PLC0415

    for ep in sorted(entry_points(group="mpc_fi.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    warnings.simplefilter("always", InsecureSettingWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"WARNING ({cat.__name__}): {msg}\n"
    try:
        code = args.func(args)
    except MpcFiError as exc:
        print(f"mpc-fi: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("mpc-fi: interrupted; every party was stopped", file=sys.stderr)
        code = 130
    except Terminated as exc:  # SIGTERM during a run: the launcher stopped the parties first
        print("mpc-fi: terminated (SIGTERM); every party was stopped", file=sys.stderr)
        code = exc.exit_code
    if args.func in (cmd_party, cmd_serve):
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End a party process without interpreter teardown.

    ``mpc-fi party`` ran the party in this process: after a failed run, gloo's threads and
    sockets are still there, and destroying them at interpreter exit can abort the process
    (SIGABRT, seen after a link dropped) or hang it, so the exit code would not be the one the
    party reported. The local launcher's party processes leave the same way.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
