"""Test-only userspace link emulator: a star switch over TUN devices (netem without sch_netem).

Creates TUN devices ``<prefix>0..<prefix>{count-1}`` (IPv4, no packet info) in the current
namespace and forwards every IPv4 packet read from device ``k`` to the device whose host owns the
destination address ``10.231.<net>.<j+1>``. Each device's egress is a link of ``--rate-mbit``
(packets are serialised one after the other, as ``netem rate``) followed by ``--delay-ms`` of
one-way delay (``netem delay``); with every host's link shaped the same way a request and its
answer see twice the delay: RTT = 2 x delay. Queues are unbounded (no loss).

Run by :class:`netns.Topology`; it writes ``--ready`` once the devices exist, then runs until
killed. The devices are moved into the party namespaces by the caller; the file descriptors held
here keep working across the move.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import select
import struct
import time
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def serve(fds: list[int], delay_s: float, rate_bps: float | None) -> None:
    index = {fd: k for k, fd in enumerate(fds)}
    busy = [0.0] * len(fds)  # when each host's egress link is free again
    queue: list[tuple[float, int, int, bytes]] = []
    seq = 0
    while True:
        now = time.monotonic()
        timeout = max(0.0, queue[0][0] - now) if queue else None
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            src = index[fd]
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    continue  # IPv4 only (drops IPv6 router solicitations and the like)
                dst = pkt[19] - 1
                if not 0 <= dst < len(fds) or dst == src:
                    continue
                depart = max(now, busy[src])
                if rate_bps:
                    depart += len(pkt) * 8 / rate_bps
                busy[src] = depart
                seq += 1
                heapq.heappush(queue, (depart + delay_s, seq, dst, pkt))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(queue)
            try:
                os.write(fds[dst], pkt)
            except OSError:
                pass  # the destination's link is down: the packet is lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="eth")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per packet")
    parser.add_argument("--rate-mbit", type=float, default=None, help="egress rate of each host")
    parser.add_argument("--ready", required=True, help="file written once the devices exist")
    parser.add_argument("--realtime", action="store_true",
                        help="run under SCHED_FIFO so that forwarding is not delayed behind the "
                             "parties' computation on a busy machine (it sleeps in select())")
    args = parser.parse_args()
    if args.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except (OSError, AttributeError):
            pass  # not permitted: ordinary scheduling
    fds = [open_tun(f"{args.prefix}{k}") for k in range(args.count)]
    Path(args.ready).write_text(str(os.getpid()))
    serve(fds, args.delay_ms / 1000.0, args.rate_mbit * 1e6 if args.rate_mbit else None)


if __name__ == "__main__":
    main()
