"""Run every benchmark one after the other and write benchmarks/results.json.

    python benchmarks/run_all.py            # ~6 min on 2 idle cores (first run: + ~2 min for each TRL venv)
    python benchmarks/run_all.py --quick    # smoke test: a few iterations of everything

Each benchmark is a separate process (see README.md); this script records the machine, the date, the package
versions and the 1-minute load average before and after each figure, because the 2-core machine may be shared:
a load above ~2 means other work took CPU time from the measurement, and every time is then an overestimate.
"""
import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, ROOT, cpu_seconds, ensure_checkpoint, foreign_cpu, loadavg, machine,  # noqa: E402
                    run_quiet, same_length_prompts, wait_quiet)

RESULTS = ROOT / "benchmarks" / "results.json"
TARGETS = {"ppo_speedup_vs_trl": 2.0, "grpo_speedup_vs_trl": 2.0, "sample_vs_generate_rate": 0.95,
           "sft_mfu_tiny": 0.40, "reward_programs_per_s": 500.0}


def versions():
    import tokenizers
    import torch
    import transformers
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
           "python": sys.version.split()[0]}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
        out["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                               capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return out


def figure(name, cmd, max_wait, threads=2, retries=2, parts_measured=False):
    """Run one benchmark script with --json; returns its figures plus the load around it: the 1-minute load
    average at start and end, and foreign_cpu, the share of the CPUs other processes used meanwhile (a run with
    more is repeated up to `retries` times). Scripts with parts_measured wait, measure and retry each of their
    parts themselves (retries=0 here)."""
    out = BENCH_DIR / f"{name}.json"
    start = loadavg()
    waited, foreign, runs = run_quiet([*cmd, "--json", out], max_wait, threads=threads, retries=retries)
    with open(out) as f:
        res = json.load(f)
    # Scripts that retry their parts also wait inside, and other work during those waits is no harm: their parts
    # carry their own foreign_cpu.
    key = "foreign_cpu_whole_script" if parts_measured else "foreign_cpu"
    return {"loadavg_start": start, "loadavg_end": loadavg(), key: foreign, "waited_for_quiet_s": waited,
            "runs": runs, **res}


def reward_figure(quick, max_wait):
    waited = wait_quiet(max_wait)
    start, since = loadavg(), cpu_seconds()
    cmd = [sys.executable, "benchmarks/reward_throughput.py", *(["--repeats", "1"] if quick else [])]
    print("$", " ".join(cmd), flush=True)
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    print(text, end="", flush=True)
    rate = float(re.search(r"throughput: ([\d.]+) programs/s", text).group(1))
    return {"loadavg_start": start, "loadavg_end": loadavg(), "foreign_cpu": foreign_cpu(since),
            "waited_for_quiet_s": waited, "programs_per_s": rate,
            "workers": int(re.search(r"(\d+) sandbox workers", text).group(1))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="smoke test: few iterations, results not meant to be kept")
    p.add_argument("--out", help=f"where to write the results JSON (None: {RESULTS.relative_to(ROOT)}, or "
                                 f"{(BENCH_DIR / 'results_quick.json').relative_to(ROOT)} with --quick)")
    p.add_argument("--max_wait", type=float, default=120,
                   help="seconds to wait for a quiet machine before each figure (0: never wait)")
    p.add_argument("--retries", type=int, default=2, help="reruns of a figure measured on a busy machine")
    args = p.parse_args()
    args.out = args.out or (BENCH_DIR / "results_quick.json" if args.quick else RESULTS)
    q = args.quick
    res = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
           "versions": versions(), "loadavg_start": loadavg(), "quick": q, "targets": TARGETS}
    py = sys.executable
    ckpt = ensure_checkpoint()
    prompts, _ = same_length_prompts(ckpt)

    w, r = args.max_wait, args.retries
    few_iters = ["--iters", "2", "--warmup", "1"] if q else []
    ppo = [py, "benchmarks/ppo_vs_trl.py", "--max_wait", w, "--retries", r, *few_iters]
    res["ppo_vs_trl"] = figure("ppo_vs_trl", ppo, w, retries=0, parts_measured=True)
    res["versions"]["trl"] = res["ppo_vs_trl"]["trl"]["trl"]
    res["ppo_vs_trl_4_epochs"] = figure("ppo_vs_trl_4_epochs", [*ppo, "--ppo_epochs", "4", "--skip_separate"], w,
                                        retries=0, parts_measured=True)
    res["grpo_vs_trl"] = figure("grpo_vs_trl", [py, "benchmarks/grpo_vs_trl.py", "--max_wait", w, "--retries", r,
                                                *(["--pairs", "1", *few_iters] if q else [])], w, retries=0,
                                parts_measured=True)
    res["versions"]["trl_grpo"] = res["grpo_vs_trl"]["trl"]["trl"]  # its own venv: GRPOTrainer's newest release
    res["reft_profile"] = figure("reft_profile", [py, "benchmarks/reft_profile.py",
                                                  *(["--steps", "1", "--pairs", "2"] if q else [])], w, retries=r)
    res["mfu"] = figure("mfu", [py, "benchmarks/mfu.py", "--max_wait", w, "--retries", r,
                                *(["--steps", "6", "--skip", "2", "--wide_steps", "4"] if q else [])], w,
                        retries=0, parts_measured=True)
    res["reward_throughput"] = reward_figure(q, w)
    torchrun = [Path(py).parent / "torchrun", "--standalone", "--nproc_per_node", "2"]
    res["fsdp_rollout"] = figure("fsdp_rollout", [*torchrun, "benchmarks/fsdp_rollout.py", "--ckpt", ckpt, "--prompts",
                                                  prompts, *(["--repeats", "1"] if q else [])], w, threads=1, retries=r)
    # --quick: 1024 wide and 256 tokens for 8 rows (~0.1 GB of cache) in place of 7B width's 1.05 GB, a few seconds
    kv_small = ["--hidden", "1024", "--heads", "8", "--intermediate", "2816", "--batch", "8", "--cached", "256",
                "--copy_mb", "64", "--repeats", "2"]
    res["kv_cache_bytes"] = figure("kv_cache_bytes", [py, "benchmarks/kv_cache_bytes.py", *(kv_small if q else [])],
                                   w, retries=r)
    res["loadavg_end"] = loadavg()

    figs = {k: v for k, v in res.items() if isinstance(v, dict) and "loadavg_start" in v}
    loads = [res["loadavg_start"], res["loadavg_end"]] + [f[k] for f in figs.values() for k in ("loadavg_start",
                                                                                                "loadavg_end")]
    foreign = {k: f["foreign_cpu"] for k, f in figs.items() if "foreign_cpu" in f}
    for fig, parts in (("ppo_vs_trl", ("reft", "reft_separate_value", "trl")), ("ppo_vs_trl_4_epochs", ("reft", "trl")),
                       ("grpo_vs_trl", ("reft", "trl")), ("mfu", ("tiny", "wide"))):
        foreign.update({f"{fig}.{part}": res[fig][part]["foreign_cpu"] for part in parts if part in res[fig]})
    figures = {"ppo_speedup_vs_trl": res["ppo_vs_trl"]["speedup"],
               "grpo_speedup_vs_trl": res["grpo_vs_trl"]["speedup"],
               "sample_vs_generate_rate": res["reft_profile"]["generation"]["rate_ratio"],
               "sft_mfu_tiny": res["mfu"]["tiny"]["mfu"],
               "reward_programs_per_s": res["reward_throughput"]["programs_per_s"]}
    res["summary"] = {
        "reft_s_per_ppo_iter": res["ppo_vs_trl"]["reft"]["s_per_iter"],
        "trl_s_per_ppo_iter": res["ppo_vs_trl"]["trl"]["s_per_iter"],
        "reft_s_per_grpo_iter": res["grpo_vs_trl"]["reft"]["s_per_iter"],
        "trl_s_per_grpo_iter": res["grpo_vs_trl"]["trl"]["s_per_iter"],
        **figures,
        "compiled_sample_vs_generate_rate": res["reft_profile"]["generation"]["compiled_rate_ratio"],
        "compiled_sample_compile_s": res["reft_profile"]["generation"]["compile_s"],
        "ppo_speedup_vs_trl_separate_value": res["ppo_vs_trl"].get("speedup_separate_value"),
        "ppo_speedup_vs_trl_4_epochs": res["ppo_vs_trl_4_epochs"]["speedup"],
        "sft_mfu_wide": res["mfu"].get("wide", {}).get("mfu"),
        "fsdp_gathered_vs_per_token_speedup": res["fsdp_rollout"]["speedup"],
        "kv_cache_extra_bytes_measured_gb": res["kv_cache_bytes"]["extra_bytes_measured"] / 1e9,
        "kv_cache_extra_bytes_measured_fresh_gb": res["kv_cache_bytes"]["extra_bytes_measured_fresh"] / 1e9,
        "kv_cache_extra_bytes_arithmetic_gb": res["kv_cache_bytes"]["cat_bytes"] / 1e9,
        "targets_met": {k: figures[k] >= v for k, v in TARGETS.items()},
        "max_loadavg": max(loads),
        "foreign_cpu": foreign,
        "busy_machine": max(loads) > 2.5 or max(foreign.values()) > 0.1,
    }
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res["summary"], indent=2))
    print(f"load average {res['loadavg_start']} at start, {res['loadavg_end']} at end; wrote {args.out}")


if __name__ == "__main__":
    main()
