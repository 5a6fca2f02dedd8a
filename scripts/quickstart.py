"""The offline quickstart: the SFT baseline against ReFT, end to end on a CPU, ending with the paper's table.

    bash run.sh quickstart               # = .venv/bin/python scripts/quickstart.py (about 28 minutes on 2 cores)
    python scripts/quickstart.py --fast  # a few steps per stage: checks the plumbing (CI runs this)

The pipeline, as in the paper but on the `minigsm` word problems and a tiny Llama trained from scratch:
  1. data      prepare minigsm: a fixed, small pool of training questions (one gold CoT each), validation, test
  2. sft       one SFT run on the pool with greedy validation accuracy every epoch. Its early epoch
               `--warmup_epoch` is the ReFT warm-up W (the paper: epoch 2 of its 40-epoch run); its best epoch on
               validation is the SFT baseline S (the paper picks its best epoch too, on test).
  3. reft      PPO from W on the same questions; the best evaluation on validation is R.
  4. verifiers k samples per training question from W, labelled by reward.py; one verifier initialised from S
               and one from R, trained on those samples (rerank.py), as in the paper.
  5. evaluate  S and R on the held-out test split: greedy top-1, voting@k and rerank@k (evaluate.py --mode all).
  6. report    {out_dir}/results.json, the table (printed and in results.md) and PNG plots.
A stage whose output exists is skipped when the command runs again; an interrupted stage resumes (--resume).

    python scripts/quickstart.py --compare   # the above, then the paper's baselines and variants (~2 h on 2 cores)

--compare adds, in the same out_dir and from the same W (scripts/compare_methods.py runs it for several seeds):
  7. offline_st   the paper's Offline-ST: SFT from scratch (as the paper's code starts from the base model) for
                  --offline_st_epochs on the gold CoTs plus the correct, distinct samples that stage 4 drew from W
                  (verifier_sft/samples.jsonl; sft.py --extra_samples); its best epoch on validation
  8. online_st    the paper's Online-ST from W (reft.py --objective online_st), with ReFT's steps, lr and samples
     reft_grpo    ReFT with GRPO's group-normalised advantage instead of GAE and the KL in the loss, as DeepSeekMath
                  (reft.py --advantage grpo --kl_in_loss)
     reft_binary  ReFT with a 1/0 reward instead of the paper's 0.1 partial reward (reft.py --no-partial_reward)
                  each the best evaluation on validation (--save_best)
  9. evaluate     every method's selected checkpoint on test, test_longer and test_larger: greedy top-1, voting@k
                  and pass@k (evaluate.py --mode all without a verifier; SFT's and ReFT's test runs are stage 5's)
 10. report       {out_dir}/compare.json (accuracies, each method − SFT with its paired bootstrap interval per split
                  and metric, stage times) and compare.md.
"""
import argparse
import ast
import dataclasses
import inspect
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

from compare import compare, load_predictions
from compare_methods import METHODS, METRICS, SPLITS, aggregate, markdown, provenance

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    out_dir: str = "runs/quickstart"
    """where every stage writes (data/, sft/, reft/, verifier_*/, eval_*/, results.json, plots)"""
    fast: bool = False
    """a few steps per stage and small splits: checks that the pipeline runs (CI), numbers mean nothing (the verifiers
    also train on the gold CoTs: the few-step warm-up gets no sample right)"""
    seed: int = 0
    """seed of the data and of every stage"""
    cot: Literal["nl", "python"] = "python"
    """chain-of-thought kind: `python` (a program; the sandbox does the arithmetic) or `nl`. Chosen on validation:
    nl SFT kept rising to its last epoch as its arithmetic slowly improved (52% best), and PPO from its epoch 30
    peaked at 43%; python SFT plateaus from epoch ~24 (43-45%), and PPO from there reached 51%"""
    n_train: int = 400
    """size of the fixed training pool shared by SFT and ReFT"""
    max_number: int = 10
    """minigsm difficulty: largest starting count and step number. At 20 the SFT baseline reached only 16% on
    validation (nl; its arithmetic was right in 30% of its steps there); at 10 it lands at ~45-50%"""
    sft_epochs: int = 40
    """epochs of the SFT run (the paper: 40)"""
    sft_lr: float = 2e-3
    """peak learning rate of the SFT run (linear warm-up 10%, then linear decay)"""
    warmup_epoch: int = 24
    """the SFT epoch whose checkpoint starts ReFT, where the python SFT curve flattens. Chosen on validation (300
    questions): PPO from epoch 20 (26%) peaked at 44%, from epoch 24 (43%) at 49% (lr 2e-4) and 51% (1e-4). A model
    trained from scratch needs most of the SFT run to learn what a pretrained model's 2-epoch warm-up brings"""
    reft_steps: int = 50
    """PPO steps (32 questions each); R is the best of the 10 evaluations on validation. From epoch 24 at lr 1e-4
    validation accuracy peaked at step 50 (51%) and then held at 45-49% to step 100; python rollouts and
    evaluations cost more than nl, and 50 steps keep the whole run within 30 minutes (26.9 measured)"""
    reft_lr: float = 1e-4
    """PPO learning rate. On validation (python, from epoch 24) 2e-4 swung between 34% and 49% from one evaluation
    to the next, 1e-4 less so; (nl, numbers <= 20) 5e-5 rose more slowly and 5e-4 peaked lower, KL at 4-6 nats"""
    reft_batch_size: int = 32
    """questions per PPO step (the paper: 32, 8 GPUs × 4)"""
    num_samples: int = 4
    """CoTs per question per PPO step"""
    kl_coef: float = 0.05
    """β of the per-token KL penalty (the paper: 0.05 for nl, 0.01 for python; 0.05 here, not tuned)"""
    vf_coef: float = 0.1
    """value-loss weight (the paper: 5). On this 1.8M-parameter model the value loss's gradient through the shared
    trunk at weight 5 outweighs the policy gradient: in 40-step runs against a frozen-policy control it lowered
    training accuracy by 5-10 points; 0.1 did not"""
    lam: float = 1.0
    """GAE λ (the paper: 0.95). λ < 1 bootstraps from the value head, which is biased while the head is still poor"""
    k: int = 8
    """samples per test question for voting and reranking (the paper: 100)"""
    verifier_samples: int = 8
    """samples per training question drawn from W to train the verifiers"""
    max_new_tokens: int = 48
    """generation budget everywhere (minigsm CoTs are ~20 tokens; an untrained model rambles to the limit)"""
    threads: int = 2
    """torch threads per stage"""
    compare: bool = False
    """after the quickstart, the paper's comparison: Offline-ST, Online-ST, ReFT with GRPO and ReFT with a 1/0 reward
    from the same W, and every method on test and the two shifted test splits (compare.json, compare.md)"""
    offline_st_epochs: int = 20
    """--compare: epochs of the Offline-ST run (the paper's code: 20, against SFT's 40)"""


# a copy kept identical across stage files: tests/test_copies.py
def parse_args(cls, argv=None):
    """Build argparse flags from a dataclass: one `--name` per field (and `-x` for one-letter names). `--help` shows
    each field's docstring, read from the source (attribute docstrings do not exist at run time), its default, and
    its choices when the field is a Literal (a value outside them gets argparse's one-line error)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}"] + ([f"-{f.name}"] if len(f.name) == 1 else [])
        kw = {"default": f.default, "help": docs.get(f.name, "").replace("%", "%%")}
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(f.type) is Literal:
            kw["choices"] = get_args(f.type)
        else:
            kw["type"] = type(f.default)
        p.add_argument(*names, **kw)
    return cls(**vars(p.parse_args(argv)))


# a copy kept identical across stage files: tests/test_copies.py
def check_ranges(args, rules):
    """One error line for the first flag outside its range; `rules` holds (flag, test, the range in words)."""
    for name, ok, words in rules:
        value = getattr(args, name)
        if not ok(value):
            raise SystemExit(f"error: {'-' if len(name) == 1 else '--'}{name} must be {words}, not {value}")


# a copy kept identical across stage files: tests/test_copies.py
def check_output_dir(path, flag="--output_dir"):
    """One error line, before any model loads, when the output folder is a file or cannot be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path}: a file of that name is in the way (it must be a folder)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path}: cannot be created ({parent} is not a writable folder)")


RANGES = [(name, lambda v: v >= 1, "at least 1") for name in ("n_train", "max_number", "sft_epochs", "warmup_epoch",
                                                            "reft_steps", "reft_batch_size", "num_samples", "k",
                                                            "verifier_samples", "max_new_tokens", "threads",
                                                            "offline_st_epochs")] + \
    [(name, lambda v: v >= 0, "at least 0") for name in ("sft_lr", "reft_lr", "kl_coef", "vf_coef")] + \
    [("lam", lambda v: 0 <= v <= 1, "in [0, 1]")]


def quickstart_args(argv=None):
    """The flags; --fast shrinks every stage to a smoke test."""
    args = parse_args(Args, argv)
    check_ranges(args, RANGES)
    check_output_dir(str(ROOT / args.out_dir), "--out_dir")
    if args.fast:
        args = dataclasses.replace(args, n_train=64, sft_epochs=3, warmup_epoch=1, reft_steps=3, reft_batch_size=8,
                                   k=2, verifier_samples=2, max_new_tokens=16, offline_st_epochs=1)
    if args.warmup_epoch > args.sft_epochs:
        raise SystemExit(f"error: --warmup_epoch {args.warmup_epoch} is after the last of --sft_epochs "
                         f"{args.sft_epochs}")
    return args


def stage(name, done, cmd, timings, resume_flag="--resume"):
    """Run one stage unless its output `done` exists; add --resume when an earlier attempt left a run behind (the
    stage continues it, or starts at step 0 when it had saved nothing yet)."""
    if done.exists():
        print(f"[{name}] done already ({done}); skipping", flush=True)
        return
    out = Path(cmd[cmd.index("--output_dir") + 1]) if "--output_dir" in cmd else None
    # A folder that holds a run, as the stages' run_entries see it: a stage refuses it without --resume, and with
    # --resume continues from its newest whole state or, when a kill left none, starts at step 0 and says so.
    if resume_flag and out is not None and out.is_dir() and any(
            p.name in ("args.json", "metrics.jsonl", "samples.jsonl", "final", "init")
            or p.name.startswith(("checkpoint", "epoch_")) for p in out.iterdir()):
        cmd = cmd + [resume_flag]
        print(f"[{name}] resuming an interrupted run in {out}", flush=True)
    print(f"[{name}] {' '.join(str(c) for c in cmd)}", flush=True)
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"error: stage {name} failed (exit {p.returncode}); run the command again to resume")
    timings[name] = timings.get(name, 0.0) + time.time() - t0


def rl_flags(args, key):
    """reft.py's flags that make each reinforcement-learning method what it is: ReFT's PPO coefficients, Online-ST's
    objective (no value head, no KL), GRPO as DeepSeekMath runs it (the group-normalised advantage and the KL as a
    k3 term in the loss: with the per-token KL in the reward, the normalisation would blow a group's tiny KL
    differences up to advantages of ±1 whenever its samples score alike; no value head, so no value-loss weight or
    λ), or the 1/0 reward (--no-partial_reward: 0.1 for a wrong but extractable answer is the paper's)."""
    ppo = ["--kl_coef", args.kl_coef, "--vf_coef", args.vf_coef, "--lam", args.lam]
    return {"reft": ppo, "online_st": ["--objective", "online_st"],
            "reft_grpo": ["--advantage", "grpo", "--kl_in_loss", "--kl_coef", args.kl_coef],
            "reft_binary": ppo + ["--no-partial_reward"]}[key]


def rl_command(py, common, args, W, key, out):
    """reft.py from W for method `key`: the quickstart's steps, lr, samples per question, lengths and 10 validation
    evaluations for every method, so that they differ only by rl_flags; the best evaluation is kept (--save_best)."""
    every = max(1, args.reft_steps // 10)
    return [py, "reft.py", *common, "--model", W, "--max_steps", args.reft_steps, "--lr", args.reft_lr,
            "--batch_size", args.reft_batch_size, "--num_samples", args.num_samples, *rl_flags(args, key),
            "--max_length", 96 + args.max_new_tokens, "--max_prompt_length", 96, "--eval_every", every,
            "--save_steps", every, "--save_best", "--output_dir", out / key]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def best_eval(metrics, key="eval_accuracy"):
    """(row, value) of the best evaluation; the earliest one on ties."""
    rows = [m for m in metrics if key in m]
    best = max(rows, key=lambda m: m[key])
    return best, best[key]


def plots(out, sft_metrics, reft_metrics, table):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([m["step"] for m in sft_metrics], [m["loss"] for m in sft_metrics])
    ax[0].set(title="SFT training loss", xlabel="step", yscale="log")
    ev = [m for m in sft_metrics if "eval_accuracy" in m]
    ax[1].plot([m["epoch"] for m in ev], [m["eval_accuracy"] for m in ev], marker=".")
    ax[1].set(title="SFT greedy accuracy (validation)", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(out / "sft.png", dpi=110)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    steps = [m["step"] for m in reft_metrics]
    for a, key, title in zip(axes, ("score", "accuracy", "kl", "response_length"),
                             ("mean reward", "training accuracy", "KL to reference (nats/seq)", "response length")):
        values = [m[key] for m in reft_metrics]
        a.plot(steps, values, alpha=0.4)
        w = max(1, len(steps) // 20)  # a moving average: single rollout batches are noisy
        a.plot(steps, [statistics.fmean(values[max(0, i - w + 1):i + 1]) for i in range(len(values))])
        a.set(title=f"ReFT {title}", xlabel="PPO step")
    ev = [m for m in reft_metrics if "eval_accuracy" in m]
    axes[1].plot([m["step"] for m in ev], [m["eval_accuracy"] for m in ev], marker=".", label="validation (greedy)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "reft.png", dpi=110)
    fig, a = plt.subplots(figsize=(6, 3.5))
    modes = ["greedy", "vote", "rerank"]
    for j, (name, row) in enumerate(table.items()):
        a.bar([i + 0.38 * j for i in range(3)], [100 * row[m] for m in modes], width=0.38, label=name)
    a.set_xticks([i + 0.19 for i in range(3)], ["top-1", f"voting@{row['k']}", f"rerank@{row['k']}"])
    a.set(ylabel="test accuracy (%)", title="minigsm test")
    a.legend()
    fig.tight_layout()
    fig.savefig(out / "table.png", dpi=110)


def evaluation(key, split):
    """(stage name, folder) of a method's evaluation on a split. SFT's and ReFT's on test are the quickstart's own
    (stage 5: --mode all with a verifier, whose greedy and sampled answers are those of --mode all without one)."""
    name = key if split == "test" and key in ("sft", "reft") else f"{key}_{split}"
    return f"evaluate_{name}", f"eval_{name}"


def compare_stages(args, out, run, timings, common, W, chosen):
    """--compare's stages 7-10 after the quickstart's. `chosen` holds the quickstart's (checkpoint, best validation
    accuracy) of "sft" and "reft"; the other methods' are added here, each selected on validation."""
    py, data = sys.executable, out / "data"
    samples = out / "verifier_sft/samples.jsonl"
    run("offline_st", out / "offline_st/final/config.json",
        [py, "sft.py", *common, "--model", "tiny", "--epochs", args.offline_st_epochs, "--lr", args.sft_lr,
         "--eval_every_epoch", "--max_new_tokens", args.max_new_tokens, "--extra_samples", samples,
         "--output_dir", out / "offline_st"])
    best, value = best_eval(read_jsonl(out / "offline_st/metrics.jsonl"))
    chosen["offline_st"] = (out / f"offline_st/epoch_{round(best['epoch'])}", value)
    for key in ("online_st", "reft_grpo", "reft_binary"):
        run(key, out / f"{key}/final/config.json", rl_command(py, common, args, W, key, out))
        chosen[key] = (out / f"{key}/best", best_eval(read_jsonl(out / f"{key}/metrics.jsonl"))[1])

    for _, key in METHODS:
        for split in SPLITS:
            name, folder = evaluation(key, split)
            run(name, out / folder / "results.json",
                [py, "evaluate.py", "--mode", "all", "--model", chosen[key][0], "--data", data, "--cot", args.cot,
                 "--split", split, "-k", args.k, "--max_new_tokens", args.max_new_tokens, "--seed", args.seed,
                 "--output_dir", out / folder], resume_flag="")

    def seconds(*stages):
        return sum(timings[s] for s in stages) if all(s in timings for s in stages) else None

    methods = {}
    for method, key in METHODS:
        cells = {}
        for split in SPLITS:
            folder = evaluation(key, split)[1]
            res = json.loads((out / folder / "results.json").read_text())
            cells[split] = dict({m: res["accuracy"][m] for m in METRICS}, n=res["n"], k=res["k"], eval_dir=folder)
            if key != "sft":
                c = compare(load_predictions(out / evaluation("sft", split)[1]), load_predictions(out / folder))
                cells[split]["minus_sft"] = {m: {"diff": c[f"{mode}_b_minus_a"], "ci95": c[f"{mode}_b_minus_a_ci95"]}
                                             for m, mode in METRICS.items()}
        train = seconds(key)
        if key == "offline_st":  # + drawing its samples, in the SFT verifier's stage: the ReFT verifier's is the same
            # training without the sampling, so the difference of the two is the sampling's time
            train = None if seconds(key, "verifier_sft", "verifier_reft") is None else \
                train + max(0.0, timings["verifier_sft"] - timings["verifier_reft"])
        methods[method] = {"checkpoint": str(chosen[key][0].relative_to(out)), "validation": chosen[key][1],
                           "train_seconds": train, "eval_seconds": seconds(*(evaluation(key, s)[0] for s in SPLITS)),
                           "splits": cells}
    report = {"seed": args.seed, "k": args.k, "splits": list(SPLITS), "methods": methods,
              "warmup_epoch": args.warmup_epoch, "stage_seconds": timings, "args": dataclasses.asdict(args),
              **provenance()}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    table = markdown(aggregate([out]))
    (out / "compare.md").write_text(table)
    print("\n" + table)
    print(f"comparison: {out / 'compare.json'}, table: {out / 'compare.md'}")


def main(args):
    out = (ROOT / args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t_start = time.time()

    def run(name, done, cmd, **kw):
        stage(name, done, cmd, timings, **kw)
        timings_path.write_text(json.dumps(timings, indent=1))

    data = out / "data"
    sizes = ["--n_validation", 64, "--n_test", 64, "--n_shifted", 32] if args.fast else []
    run("data", data / "test_larger_python.jsonl",  # prepare.py's last file: a killed run leaves it unwritten
        [py, "data/minigsm/prepare.py", "--out_dir", data, "--n_train", args.n_train, "--max_number", args.max_number,
         "--seed", args.seed, *sizes], resume_flag="")

    common = ["--data", data, "--cot", args.cot, "--seed", args.seed]
    run("sft", out / "sft/final/config.json",
        [py, "sft.py", *common, "--epochs", args.sft_epochs, "--lr", args.sft_lr, "--eval_every_epoch",
         "--max_new_tokens", args.max_new_tokens, "--output_dir", out / "sft"])
    sft_metrics = read_jsonl(out / "sft/metrics.jsonl")
    best_sft, _ = best_eval(sft_metrics)
    S = out / f"sft/epoch_{round(best_sft['epoch'])}"
    W = out / f"sft/epoch_{args.warmup_epoch}"

    run("reft", out / "reft/final/config.json", rl_command(py, common, args, W, "reft", out))
    reft_metrics = read_jsonl(out / "reft/metrics.jsonl")
    R = out / "reft/best"

    samples = out / "verifier_sft/samples.jsonl"
    # --fast's warm-up (6 SFT steps) writes no whole program, so every sample is wrong, and a verifier needs both kinds:
    # there the verifiers also train on the gold CoTs as correct samples.
    gold = ["--gold_samples"] if args.fast else []
    run("verifier_sft", out / "verifier_sft/final/config.json",
        [py, "rerank.py", *common, "--model", W, "--init", S, "--num_samples", args.verifier_samples,
         "--max_new_tokens", args.max_new_tokens, *gold, "--output_dir", out / "verifier_sft"])
    run("verifier_reft", out / "verifier_reft/final/config.json",
        [py, "rerank.py", *common, "--model", W, "--init", R, "--samples", samples, *gold,
         "--output_dir", out / "verifier_reft"])

    table = {}
    for name, model, verifier in (("SFT", S, out / "verifier_sft/final"), ("ReFT", R, out / "verifier_reft/final")):
        ev = out / f"eval_{name.lower()}"
        run(f"evaluate_{name.lower()}", ev / "results.json",
            [py, "evaluate.py", "--mode", "all", "--model", model, "--verifier", verifier, "--data", data,
             "--cot", args.cot, "--split", "test", "-k", args.k, "--max_new_tokens", args.max_new_tokens,
             "--seed", args.seed, "--output_dir", ev],
            resume_flag="")
        res = json.loads((ev / "results.json").read_text())
        table[name] = dict(res["accuracy"], k=res["k"], n=res["n"], checkpoint=str(model.relative_to(out)))

    lo, hi = compare(load_predictions(out / "eval_sft"), load_predictions(out / "eval_reft"))["greedy_b_minus_a_ci95"]
    results = {
        "table": table,
        "reft_minus_sft_top1": table["ReFT"]["greedy"] - table["SFT"]["greedy"],
        "reft_minus_sft_top1_ci95": [lo, hi],
        "sft_best_epoch": round(best_sft["epoch"]), "sft_best_validation": best_sft["eval_accuracy"],
        "warmup_epoch": args.warmup_epoch,
        "warmup_validation": next(m["eval_accuracy"] for m in sft_metrics
                                  if round(m["epoch"], 6) == args.warmup_epoch and "eval_accuracy" in m),
        "reft_best_validation": best_eval(reft_metrics)[1],
        "args": dataclasses.asdict(args),
        "stage_seconds": timings, "wall_seconds_this_call": time.time() - t_start, **provenance(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    k = table["SFT"]["k"]
    lines = [f"| model (checkpoint) | top-1 | voting@{k} | rerank@{k} | pass@{k} |", "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} ({row['checkpoint']}) | {100 * row['greedy']:.1f} | {100 * row['vote']:.1f} | "
                     f"{100 * row['rerank']:.1f} | {100 * row['pass@k']:.1f} |")
    lines.append(f"\nReFT − SFT top-1: {100 * results['reft_minus_sft_top1']:+.1f} points "
                 f"(95% paired bootstrap interval {100 * lo:+.1f} … {100 * hi:+.1f}), n = {table['SFT']['n']} test "
                 f"questions; stages took {sum(timings.values()) / 60:.1f} min in all.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plots(out, sft_metrics, reft_metrics, table)
    print("\n".join(lines))
    print(f"\nresults: {out / 'results.json'}, table: {out / 'results.md'}, plots: {out}/{{sft,reft,table}}.png")
    if args.compare:
        compare_stages(args, out, run, timings, common, W, {"sft": (S, best_sft["eval_accuracy"]),
                                                            "reft": (R, results["reft_best_validation"])})


if __name__ == "__main__":
    main(quickstart_args())
