"""Wall time of one-shot ``Federation.run`` calls: 32 output-mode queries, 3 random MLP owners.

The first call in a process also starts the local launcher's fork server (torch, CrypTen and
the engine preloaded once); later calls fork parties from it. Prints every call's wall time
and the parties' set-up and inference times from their results::

    python benchmarks/cold_call.py --repeats 3
    python benchmarks/cold_call.py --queries 10000 --batch-size 256   # against the default plan
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import random_federation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--protocol", default="soft_vote")
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    from mpc_fi import Federation

    with tempfile.TemporaryDirectory() as tmp:
        fed, _ = random_federation(tmp, num_owners=3, num_classes=10, in_features=64,
                                   protocol=args.protocol, batch_size=args.batch_size)
        x = np.random.default_rng(0).random((args.queries, 64), dtype=np.float32)
        for i in range(args.repeats):
            t0 = time.perf_counter()
            result = Federation(fed).run(x)
            wall = time.perf_counter() - t0
            infer = max(c.wall_s for c in result.costs)
            rounds = max(c.rounds for c in result.costs)
            print(f"call {i + 1}: {wall:.2f} s wall ({'first: starts the fork server' if i == 0 else 'fork server warm'}); "
                  f"inference {infer:.2f} s, {rounds} rounds; {len(result.prediction.labels)} labels", flush=True)


if __name__ == "__main__":
    main()
