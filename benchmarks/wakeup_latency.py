"""How long one process takes to wake another on this machine, idle and busy.

    python benchmarks/wakeup_latency.py [--rounds 200] [--out wakeup.json]

A served request crosses processes four times before its first token reaches the client
(client -> HTTP process -> engine process -> HTTP process -> client). On the lent H100 the
server's TTFT at one client was 27 ms against 5 ms in process, and the handler itself
accounted for ~1 ms of the 13.7 ms before the headers (Server-Timing), while at 16
clients the time outside the handler was smaller (4.9 ms), which points at waking idle
processes. This times a pipe round trip between two processes: back to back (the other
side is awake), and after a pause of `--pause-ms` (both sides have gone idle), the
median and p99 of each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time


def echo(conn) -> None:
    while (message := conn.recv()) is not None:
        conn.send(message)


def round_trips(conn, rounds: int, pause_s: float) -> list[float]:
    times = []
    for _ in range(rounds):
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        conn.send(b"x")
        conn.recv()
        times.append((time.perf_counter() - start) * 1e6)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_us": round(statistics.median(ordered), 1), "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--pause-ms", type=float, default=20.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    here, there = mp.Pipe()
    child = mp.get_context("spawn").Process(target=echo, args=(there,), daemon=True)
    child.start()
    round_trips(here, 20, 0)  # warm-up
    result = {"command": "python " + " ".join(sys.argv), "cpus": mp.cpu_count(),
              "back_to_back": summary(round_trips(here, args.rounds, 0)),
              f"after_{args.pause_ms:g}_ms_idle": summary(round_trips(here, args.rounds, args.pause_ms / 1000))}
    here.send(None)
    child.join(5)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
