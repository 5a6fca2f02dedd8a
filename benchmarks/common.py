"""Pieces shared by the benchmarks: paths, the one checkpoint and prompt set every benchmark uses, machine facts.

Imports only the stdlib and torch at module level, so the TRL side (a separate venv) can import it too.
"""
import collections
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "runs" / "bench"  # scratch space; runs/ is git-ignored
TRL_VENV = ROOT / "benchmarks" / ".venv-trl"
sys.path.insert(0, str(ROOT))


def loadavg():
    """1-minute load average (the machine has 2 cores: above ~2 other work shares them)."""
    return round(os.getloadavg()[0], 2)


def median(xs):
    return statistics.median(xs)


def machine():
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        mem_gib = None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "mem_gib": mem_gib, "python": platform.python_version()}


def matmul_gflops(n=2048, repeats=10, threads=2):
    """Best fp32 n×n matmul rate (GFLOP/s) over `repeats` runs at `threads` threads: the peak MFU divides by."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool start, page faults
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    torch.set_num_threads(old)
    return best


def cpu_seconds():
    """(CPU seconds used by all processes on the machine, by this process and its waited-for children, elapsed)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, own, time.monotonic()


def foreign_cpu(since):
    """Share of the machine's CPU time used by *other* processes since `since` (a cpu_seconds() reading):
    0 on a quiet machine; 0.5 on 2 cores means one core's worth of other work ran during the measurement."""
    busy0, own0, t0 = since
    busy1, own1, t1 = cpu_seconds()
    return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / (os.cpu_count() * (t1 - t0)), 3)


def wait_quiet(max_wait=180, threshold=0.15, window=3.0):
    """Wait (up to max_wait s) until other processes use < threshold of the CPUs over a `window`-second look;
    OpenMP threads time-sliced against other work slow down far more than their share. Returns seconds waited."""
    start = time.monotonic()
    while True:
        t = cpu_seconds()
        time.sleep(window)
        busy = foreign_cpu(t)
        waited = time.monotonic() - start
        if busy < threshold or waited >= max_wait:
            if busy >= threshold:
                print(f"machine still busy ({100 * busy:.0f}% of CPUs used by others) after {waited:.0f} s: "
                      f"measuring anyway", flush=True)
            return round(waited, 1)
        time.sleep(5)


def run(cmd, threads=2, env=None, log=None):
    """Run a command with OMP_NUM_THREADS=threads; its output goes to `log` (a file) or to ours. Raises on failure.
    Returns the share of CPU time other processes took meanwhile (foreign_cpu)."""
    full_env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", **(env or {}))
    print("$", " ".join(str(c) for c in cmd), flush=True)
    since = cpu_seconds()
    if log is None:
        subprocess.run([str(c) for c in cmd], cwd=ROOT, env=full_env, check=True)
        return foreign_cpu(since)
    Path(log).parent.mkdir(parents=True, exist_ok=True)  # runs/bench/ does not exist in a fresh checkout
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(str(c) for c in cmd)} failed (exit {r.returncode}); see {log}")
    return foreign_cpu(since)


def run_quiet(cmd, max_wait, threads=2, log=None, retries=2, limit=0.1):
    """run() on a quiet machine: wait for one, run, and run again (up to `retries` times) when other processes took
    more than `limit` of the CPUs meanwhile. Returns (seconds waited in total, foreign_cpu of the kept run, runs)."""
    waited = 0.0
    for attempt in range(retries + 1):
        waited += wait_quiet(max_wait)
        foreign = run(cmd, threads, log=log)
        if foreign <= limit or attempt == retries:
            return waited, foreign, attempt + 1
        print(f"other processes used {100 * foreign:.0f}% of the CPUs meanwhile: measuring again", flush=True)


def ensure_minigsm():
    """The prepared minigsm splits every benchmark reads: made with data/minigsm/prepare.py's defaults when a
    fresh clone has none yet (the prepared files are not in git)."""
    if not (ROOT / "data" / "minigsm" / "train_nl.jsonl").is_file():
        run([sys.executable, "data/minigsm/prepare.py"])


def ensure_checkpoint(out=BENCH_DIR / "ckpt"):
    """The `tiny` policy both PPO sides start from: `sft.py --model tiny` after 1 step (tokenizer trained on
    minigsm, weights essentially random, so it almost never samples EOS and responses run to the length cap)."""
    ensure_minigsm()
    final = out / "final"
    if not (final / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "sft.py", "--model", "tiny", "--data", "minigsm", "--cot", "nl", "--max_steps", "1",
             "--output_dir", out, "--overwrite"], log=out.parent / "ckpt.log")  # over a killed attempt
    return final


def same_length_prompts(ckpt, n_min=320):
    """Write minigsm training records whose prompts all have the most common token length L, repeated (with
    distinct item_ids) to at least n_min records; returns (path, L).

    Equal prompt lengths mean no padding on either side and a response budget of exactly max_length - L tokens
    for reft.py, the same as TRL's response_length."""
    import reward
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    records = reward.load_records("minigsm", "train", "nl")
    lengths = [len(tok(reward.build_prompt(r["question"], "nl", sampling=True), add_special_tokens=False).input_ids)
               for r in records]
    L = collections.Counter(lengths).most_common(1)[0][0]
    pool = [r for r, n in zip(records, lengths) if n == L]
    out = [dict(r, item_id=f"{r['item_id']}_{k}") for k in range(-(-n_min // len(pool))) for r in pool]
    path = BENCH_DIR / f"prompts_len{L}.jsonl"
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    return path, L


def write_json(path, obj):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
