"""Programs scored per second by reward.py's sandbox pool, on the 3,043 SVAMP gold programs.

    python benchmarks/reward_throughput.py                 # pool size = usable CPUs
    python benchmarks/reward_throughput.py --workers 1 --repeats 5

Uses ../shared/data/mwp_reft/svamp_python_sdp.json beside the repo when present, else 3,043 generated
programs of the same shape. Times compute_rewards (program extraction, sandboxed execution, comparison) after
one warm-up pass, so worker start-up is not counted. Target: >= 500 programs/s on 2 cores.
"""
import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import reward  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "mwp_reft" / "svamp_python_sdp.json"


def generated_records(n, seed=0):
    """Records like SVAMP's: a question, a short straight-line program, its value."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b, c = rng.randint(1, 500), rng.randint(1, 500), rng.randint(1, 20)
        question = f"Sam has {a} apples and buys {b} more. He shares them among {c} friends. How many does each get?"
        program = (f'def solution():\n    """{question}"""\n    apples = {a}\n    bought = {b}\n'
                   f'    friends = {c}\n    total = apples + bought\n    result = total / friends\n    return result')
        records.append({"item_id": f"gen_{i}", "question": question, "answer_cot": program,
                        "answer_value": str((a + b) / c)})
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--workers", type=int, default=None, help="sandbox processes (None: usable CPUs)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all programs")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per program")
    args = parser.parse_args()
    if DATA.is_file():
        records, source = reward.load_records(str(DATA), cot="python", require_cot=True), str(DATA)
    else:
        records, source = generated_records(3043), "generated programs (SVAMP data not found)"
    completions = [r["answer_cot"] for r in records]
    golds = [r["answer_value"] for r in records]
    questions = [r["question"] for r in records]
    start = time.perf_counter()
    reward.start_pool(args.workers)
    reward.compute_rewards(completions[:50], golds[:50], "python", questions[:50], timeout=args.timeout)
    startup = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rewards = reward.compute_rewards(completions, golds, "python", questions, timeout=args.timeout)
        rates.append(len(completions) / (time.perf_counter() - start))
        assert rewards.count(1.0) == len(records), f"only {rewards.count(1.0)}/{len(records)} gold programs scored 1"
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, Python {platform.python_version()}")
    print(f"programs: {len(records)} from {source}; {len(reward.worker_pids())} sandbox workers, "
          f"start-up {startup:.2f} s")
    print(f"per pass: {', '.join(f'{r:.0f}' for r in rates)} programs/s")
    print(f"throughput: {statistics.median(rates):.0f} programs/s (median of {len(rates)} passes)")


if __name__ == "__main__":
    main()
