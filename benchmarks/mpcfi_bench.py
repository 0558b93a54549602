"""Shared code of the benchmark suites: the grid, the workloads, and the two baselines.

Imported by file name from ``benchmarks/conftest.py`` (never as ``benchmarks.…``: CrypTen's
wheel installs an unrelated top-level package called ``benchmarks``).

Baselines, measured in the same pytest session as the engine:

* **plaintext** -- every owner's model and the protocol's plaintext twin in one process;
* **direct CrypTen** -- what a CrypTen user writes without mpc-fi: owners secret-share their
  logits one after another with ``cryptensor`` and the aggregation runs on CrypTen's own
  ``argmax``/``softmax`` on shares (``full`` mode: the querier shares the query and every owner's
  MLP runs on shares as ``crypten.nn`` modules). Same parties (N owners + querier + TTP dealer)
  started the same way (:func:`launchers.local.run_functions`, fresh rendezvous), same cost
  counters (CrypTen's communicator, inference phase only).
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from launchers.local import run_functions

IN_FEATURES = 64
HIDDEN = 32

#: protocol -> the direct CrypTen computation of the same aggregate
DIRECT_EQUIVALENT = {"soft_vote": "softmax_avg", "hard_vote": "hard_vote",
                     "logit_average": "logit_avg"}
DIRECT_VARIANTS = ("hard_vote", "softmax_avg", "logit_avg")


@dataclass(frozen=True)
class Case:
    """One grid point."""

    protocol: str
    mode: str
    owners: int
    classes: int
    batch: int
    dealer: str = "ttp"
    workload: str = "random"  # "random" MLPs, or "digits" (trained demo owners, C=10)
    direct: str | None = None  # the direct CrypTen aggregation to compare with ("none": skip)
    queries: int | None = None  # number of queries, answered in batches of ``batch`` (default: B)
    #: full mode's public activation bound (random owners then declare inputs in [-5, 5])
    activation_bound: float | None = None

    @property
    def id(self) -> str:
        return (f"{self.protocol}-{self.mode}-N{self.owners}-C{self.classes}-B{self.batch}"
                + ("" if self.queries is None else f"-Q{self.queries}")
                + ("" if self.workload == "random" else f"-{self.workload}")
                + ("" if self.dealer == "ttp" else f"-{self.dealer}")
                + ("" if self.activation_bound is None else f"-A{self.activation_bound:g}"))

    @property
    def num_queries(self) -> int:
        return self.batch if self.queries is None else self.queries

    @property
    def direct_variant(self) -> str:
        return self.direct or DIRECT_EQUIVALENT.get(self.protocol, "softmax_avg")


FULL_OWNERS = (2, 3, 5, 8, 16)
FULL_CLASSES = (2, 10, 100)
FULL_BATCHES = (1, 32, 1024)


def grid(name: str, protocols: tuple[str, ...]) -> list[Case]:
    """The grid points of the protocol suite.

    ``smoke``: one tiny case (the test suite runs it). ``quick`` (default): the targets'
    configuration, N=3 owners, C=10, B=32, every protocol in both modes. ``targets``: quick, plus
    owners N in {2, 5, 8, 16} in output mode (growth in N), full mode on the digits demo (label
    agreement), and 10,000 queries in batches of 1,024 (memory; engine only). ``full``: protocol
    x mode x N {2,3,5,8,16} x C {2,10,100} x B {1,32,1024}.
    """
    if name == "smoke":  # the cheapest direct aggregation keeps it short: not a fair ratio
        return [Case("hard_vote", "output", 2, 2, 1, direct="logit_avg")]
    quick = [Case(p, m, 3, 10, 32) for p in protocols for m in ("output", "full")]
    if name == "quick":
        return quick
    if name == "targets":
        return quick + [Case(p, "output", n, 10, 32) for p in protocols for n in (2, 5, 8, 16)] \
            + [Case("soft_vote", "full", 3, 10, 540, workload="digits"),
               Case("soft_vote", "full", 3, 10, 32, workload="digits", activation_bound=64.0),
               Case("soft_vote", "full", 3, 10, 32, workload="digits-cnn", direct="none"),
               Case("soft_vote", "full", 3, 10, 32, workload="digits-cnn", direct="none",
                    activation_bound=64.0),
               Case("soft_vote", "full", 3, 100, 32, direct="none", queries=320,
                    activation_bound=256.0),
               Case("soft_vote", "full", 3, 1000, 32, direct="none", queries=320,
                    activation_bound=256.0),
               Case("soft_vote", "output", 3, 10, 1024, direct="none", queries=10_000),
               Case("hard_vote", "output", 16, 10, 1024, direct="none", queries=10_000)]
    if name == "full":
        return [Case(p, m, n, c, b) for p in protocols for m in ("output", "full")
                for n in FULL_OWNERS for c in FULL_CLASSES for b in FULL_BATCHES]
    raise ValueError(f"unknown grid {name!r}: smoke, quick, targets or full")


# ---------------------------------------------------------------------------------------
# Workloads: deterministic owners and queries (every process can rebuild them from the case)
# ---------------------------------------------------------------------------------------
def owner_model(case: Case, k: int, seed: int = 0) -> torch.nn.Module:
    from mpc_fi.demo import mlp

    torch.manual_seed(seed * 1000 + k)
    model = mlp(in_features=IN_FEATURES, hidden=HIDDEN, num_classes=case.classes).eval()
    with torch.no_grad():  # spread the logits a little so that margins vary
        model[2].weight.mul_(3.0)
    return model


def queries(case: Case, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 17)
    return rng.normal(size=(case.num_queries, IN_FEATURES)).astype(np.float32)


@dataclass
class Workload:
    federation: Any
    x: np.ndarray
    models: list[torch.nn.Module]
    y: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def workload(case: Case, workdir: Path) -> Workload:
    """The federation of ``case`` (owners' weights saved under ``workdir``) and its queries."""
    from mpc_fi.config import (FederationConfig, ModelSource, OwnerConfig, ProtocolConfig,
                               QuerierConfig)

    workdir.mkdir(parents=True, exist_ok=True)
    if case.workload in ("digits", "digits-cnn"):
        import demos as demo

        setup = demo.prepare(workdir, num_owners=case.owners, mode=case.mode,
                             protocol=case.protocol, dealer=case.dealer, batch_size=case.batch,
                             arch="cnn" if case.workload == "digits-cnn" else "mlp",
                             activation_bound=case.activation_bound)
        x = setup.x_test if case.queries is None and case.batch >= len(setup.x_test) \
            else setup.x_test[:case.num_queries]
        return Workload(setup.federation, x, setup.models, setup.y_test[:len(x)])
    owners, models = [], []
    for k in range(case.owners):
        model = owner_model(case, k)
        path = workdir / f"owner{k}.pt"
        torch.save(model.state_dict(), path)
        models.append(model)
        owners.append(OwnerConfig(name=f"owner{k}", model=ModelSource(
            factory="mpc_fi.demo:mlp", weights=str(path),
            kwargs={"in_features": IN_FEATURES, "hidden": HIDDEN, "num_classes": case.classes})))
    x, querier = queries(case), QuerierConfig()
    if case.activation_bound is not None:  # a declared input range keeps the bound provable
        x, querier = np.clip(x, -5.0, 5.0), QuerierConfig(input_range=(-5.0, 5.0))
    fed = FederationConfig(owners=tuple(owners), querier=querier, mode=case.mode,
                           protocol=ProtocolConfig(name=case.protocol), dealer=case.dealer,
                           batch_size=case.batch, activation_bound=case.activation_bound)
    return Workload(fed, x, models)


def plaintext_labels(case: Case, wl: Workload) -> np.ndarray:
    """The protocol's plaintext twin on every owner's logits (the exactness reference)."""
    from mpc_fi.plugins import build_protocol

    protocol = build_protocol(wl.federation, num_classes=_classes(case))
    with torch.no_grad():
        logits = [m(torch.from_numpy(wl.x)).to(torch.float64) for m in wl.models]
    return protocol.plaintext(logits).labels


def _classes(case: Case) -> int:
    return 10 if case.workload.startswith("digits") else case.classes


# ---------------------------------------------------------------------------------------
# Parties for the direct CrypTen path (the same local parties as the tests and the studies)
# ---------------------------------------------------------------------------------------
def spawn(fn: Callable[..., Any], world: int, *args: Any, dealer: str = "ttp",
          timeout_s: float = 900.0) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` CrypTen parties (+ a TTP); results by rank."""
    return run_functions(fn, [args] * world, dealer=dealer, timeout_s=timeout_s, star=True)


# ---------------------------------------------------------------------------------------
# The direct CrypTen path, inside one party
# ---------------------------------------------------------------------------------------
def _crypten_mlp(crypten: Any, model: torch.nn.Module) -> Any:
    layers = []
    for module in model:
        if isinstance(module, torch.nn.Linear):
            lin = crypten.nn.Linear(module.in_features, module.out_features)
            lin.set_parameter("weight", module.weight.detach().clone())
            lin.set_parameter("bias", module.bias.detach().clone())
            layers.append(lin)
        elif isinstance(module, torch.nn.ReLU):
            layers.append(crypten.nn.ReLU())
        else:
            raise TypeError(f"direct baseline: unsupported layer {type(module).__name__}")
    return crypten.nn.Sequential(*layers)


def direct_party(rank: int, case: Case, variant: str, x: np.ndarray, weight_files: list[str]
                 ) -> dict[str, Any]:
    """One party of the direct CrypTen path; returns its cost (and the querier's labels)."""
    from mpc_fi import compare, truncation
    from mpc_fi._crypten import load_crypten
    from mpc_fi.demo import mlp

    crypten = load_crypten()
    truncation.uninstall(crypten)  # CrypTen's own truncation (party 0 gathers every time)
    compare.use_crypten_relu(crypten)  # and its ReLU (a Beaver product with the sign)
    comm = crypten.communicator.get()
    n, q, classes = case.owners, case.owners, _classes(case)
    in_features = x.shape[1]

    def model_of(k: int) -> torch.nn.Module:
        # Owner k loads its own weights; other parties hold a random placeholder of that shape.
        model = mlp(in_features=in_features, hidden=HIDDEN, num_classes=classes).eval()
        if rank == k:
            model.load_state_dict(torch.load(weight_files[k], weights_only=True))
        return model

    encrypted = []
    if case.mode == "full":  # set-up: owners share their parameters (not counted, as in mpc-fi)
        for k in range(n):
            net = _crypten_mlp(crypten, model_of(k))
            net.encrypt(src=k)
            net.eval()
            encrypted.append(net)
    own = model_of(rank) if rank < n else None

    comm.reset_communication_stats()
    start = time.perf_counter()
    batch = x.shape[0]
    if case.mode == "output":
        # The query reaches the owners in plaintext (raw float32, as mpc-fi sends it).
        flat = torch.from_numpy(x).flatten()
        padded = torch.zeros(flat.numel() + flat.numel() % 2, dtype=torch.float32)
        if rank == q:
            padded[:flat.numel()] = flat
        xs = comm.broadcast(padded.view(torch.int64), q).view(torch.float32)[:flat.numel()]
        xs = xs.view(x.shape)
        shared_logits = []
        for k in range(n):  # owners share one after another
            local = own(xs).to(torch.float64).detach() if rank == k else \
                torch.zeros(batch, classes, dtype=torch.float64)
            shared_logits.append(crypten.cryptensor(local, src=k))
    else:
        x_enc = crypten.cryptensor(torch.from_numpy(x).to(torch.float64) if rank == q
                                   else torch.zeros(x.shape, dtype=torch.float64), src=q)
        shared_logits = [net(x_enc) for net in encrypted]
    if variant == "hard_vote":
        total = sum(lg.argmax(dim=1, one_hot=True) for lg in shared_logits)
    elif variant == "softmax_avg":
        total = sum(lg.softmax(1) for lg in shared_logits) / n
    elif variant == "logit_avg":
        total = sum(shared_logits) / n
    else:
        raise ValueError(variant)
    one_hot = total.argmax(dim=1, one_hot=True)
    index = (one_hot * torch.arange(classes, dtype=torch.long)).sum(dim=1)
    opened = index.get_plain_text(dst=q)
    wall = time.perf_counter() - start
    stats = comm.get_communication_stats()
    out = {"cost": {"party": "querier" if rank == q else f"owner{rank}",
                    "role": "querier" if rank == q else "owner", "wall_s": wall,
                    "rounds": int(stats["rounds"]), "bytes_sent": int(stats["bytes"]),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}}
    if rank == q:
        out["labels"] = opened.round().long().numpy()
    return out


def run_direct(case: Case, wl: Workload, workdir: Path, variant: str | None = None, *,
               timeout_s: float = 900.0) -> dict[str, Any]:
    """Run the direct CrypTen path for ``case``; per-party costs and the querier's labels."""
    variant = variant or case.direct_variant
    files = []
    workdir.mkdir(parents=True, exist_ok=True)
    for k, model in enumerate(wl.models):
        path = workdir / f"direct-owner{k}.pt"
        torch.save(model.state_dict(), path)
        files.append(str(path))
    x = wl.x
    results = spawn(direct_party, case.owners + 1, case, variant, x, files, dealer=case.dealer,
                    timeout_s=timeout_s)
    return {"costs": [r["cost"] for r in results], "labels": results[case.owners]["labels"],
            "variant": variant}


def cost_summary(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-party figures and the maxima over parties."""
    return {
        "per_party": costs,
        "max_rounds": max(c["rounds"] for c in costs),
        "max_bytes": max(c["bytes_sent"] for c in costs),
        "max_rss_mb": max(c["peak_rss_mb"] for c in costs),
        "max_wall_s": max(c["wall_s"] for c in costs),
        "querier_rounds": next(c["rounds"] for c in costs if c["role"] == "querier"),
        "querier_bytes": next(c["bytes_sent"] for c in costs if c["role"] == "querier"),
    }


def as_dicts(costs: Any) -> list[dict[str, Any]]:
    return [asdict(c) if not isinstance(c, dict) else c for c in costs]


def timed_federation_runs(benchmark: Any, federation: Any, x: np.ndarray, *, timeout_s: float,
                          run_dir: Callable[[int], Path | None] = lambda k: None,
                          rounds: int = 5) -> dict[str, Any]:
    """``Federation(federation).run(x)`` under pytest-benchmark, one warm-up run not counted.

    Returns the medians (inference wall time, max over parties; whole-call wall time), the last
    run's cost summary and its labels.
    """
    from mpc_fi import Federation  # noqa: PLC0415

    runs: list[tuple[float, dict[str, Any], np.ndarray]] = []

    def once() -> Any:
        t0 = time.perf_counter()
        result = Federation(federation, timeout_s=timeout_s, run_dir=run_dir(len(runs))).run(x)
        runs.append((time.perf_counter() - t0, cost_summary(as_dicts(result.costs)),
                     result.prediction.labels))
        return result

    benchmark.pedantic(once, rounds=rounds, warmup_rounds=1)
    measured = runs[1:]  # the warm-up run is not counted
    infer = sorted(c["max_wall_s"] for _, c, _ in measured)
    calls = sorted(t for t, _, _ in measured)
    return {"inference_s": infer[len(infer) // 2], "call_s": calls[len(calls) // 2],
            "runs": len(measured), "cost": measured[-1][1], "labels": measured[-1][2]}


# ---------------------------------------------------------------------------------------
# Argmax ablation: CrypTen's argmax against each step of mpc_fi.compare, on the same values
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArgmaxCase:
    """One argmax on shares: ``method`` x value ``kind`` x classes x batch x group size."""

    method: str  # crypten | full64 | bounded | bounded_lowbits
    kind: str  # votes (sums of N one-hot votes) | probs (sums of N encoded probabilities)
    classes: int
    batch: int
    owners: int = 3
    group_size: int | None = None  # None: the cost model's choice on a LAN

    @property
    def id(self) -> str:
        g = "auto" if self.group_size is None else f"g{self.group_size}"
        return f"{self.method}-{self.kind}-N{self.owners}-C{self.classes}-B{self.batch}-{g}"


def argmax_grid(name: str) -> list[ArgmaxCase]:
    """``quick``/``targets``: C=10, B=32, N=3; ``full`` adds C=100, B in {1, 1024}, N up to 16."""
    if name == "smoke":
        return []
    cases = [ArgmaxCase("crypten", "votes", 10, 32), ArgmaxCase("full64", "votes", 10, 32),
             ArgmaxCase("bounded", "votes", 10, 32), ArgmaxCase("bounded_lowbits", "votes", 10, 32),
             ArgmaxCase("crypten", "probs", 10, 32), ArgmaxCase("bounded", "probs", 10, 32)]
    cases += [ArgmaxCase("bounded", "probs", 10, 32, group_size=g) for g in (2, 5)]
    if name == "full":
        cases += [ArgmaxCase("crypten", "probs", 100, 32)]
        cases += [ArgmaxCase("bounded", "probs", 100, 32, group_size=g) for g in (2, 4, 10, 100)]
        cases += [ArgmaxCase("bounded", "probs", 10, b) for b in (1, 1024)]
        cases += [ArgmaxCase("bounded_lowbits", "votes", 10, 32, owners=n) for n in (2, 5, 8, 16)]
    return cases


def argmax_values(case: ArgmaxCase, seed: int = 0) -> tuple[np.ndarray, Any]:
    """Encoded aggregates (integers at 16 fractional bits) and their public range."""
    from mpc_fi.compare import ValueRange

    rng = np.random.default_rng(seed)
    n, shape = case.owners, (case.batch, case.classes)
    if case.kind == "votes":
        counts = np.zeros(shape, dtype=np.int64)
        for _ in range(n):
            counts[np.arange(case.batch), rng.integers(0, case.classes, case.batch)] += 1
        values = counts << 16
        bound = ValueRange(0, n << 16, 16 if case.method == "bounded_lowbits" else 0)
    else:
        probs = rng.dirichlet(np.ones(case.classes), size=(n, case.batch))
        values = (probs * 65536).astype(np.int64).sum(axis=0)
        bound = ValueRange(0, n << 16)
    return values, (bound if case.method.startswith("bounded") else None)


def argmax_party(rank: int, case: ArgmaxCase, values: np.ndarray, bound: Any) -> dict[str, Any]:
    from mpc_fi import secure
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    comm = crypten.communicator.get()
    q = case.owners
    x = crypten.cryptensor(torch.from_numpy(values).to(torch.float64) / 65536.0, src=0)
    comm.reset_communication_stats()
    start = time.perf_counter()
    if case.method == "crypten":  # tie-free values, CrypTen's argmax (its default: log_reduction)
        one_hot = secure.distinct(x, case.classes).argmax(dim=-1, one_hot=True)
        index = secure.one_hot_to_index(one_hot, case.classes)
    else:
        index = secure.argmax_index(x, case.classes, value_range=bound,
                                    group_size=case.group_size)
    opened = index.get_plain_text(dst=q)
    wall = time.perf_counter() - start
    stats = comm.get_communication_stats()
    out = {"cost": {"party": f"owner{rank}" if rank < q else "querier",
                    "role": "owner" if rank < q else "querier", "wall_s": wall,
                    "rounds": int(stats["rounds"]), "bytes_sent": int(stats["bytes"]),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}}
    if rank == q:
        out["labels"] = opened.round().long().numpy()
    return out
