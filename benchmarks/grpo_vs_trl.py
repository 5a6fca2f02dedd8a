"""Seconds per GRPO iteration: reft.py --advantage grpo --kl_in_loss against TRL 1.16.0's GRPOTrainer.

    python benchmarks/grpo_vs_trl.py                                 # 3 pairs, each side 2 warm-up + 6 timed iterations
    python benchmarks/grpo_vs_trl.py --pairs 1 --iters 2 --warmup 1  # smoke test

Both sides: the same `tiny` checkpoint (sft.py --model tiny, 1 step), the same minigsm training questions (all with one
prompt length, so neither side pads), 8 questions × 4 samples = 32 sequences per iteration (the 32 rows of
ppo_vs_trl, so the two benchmarks' generation costs compare), exactly --response_length sampled tokens (temperature 1,
no top-k/top-p; the near-random policy never ends all 32 rows early, which is checked), rewards from reward.py's
compute_rewards, advantages (r - mean) / (std + 1e-4) over each question's 4 samples, the clipped loss plus β·k3 KL to
the frozen reference (β 0.05) averaged over all the batch's tokens (reft.py --loss_aggregation token_mean = TRL
loss_type="dapo"), one optimizer step per iteration on the whole batch (AdamW, lr 5e-5 constant, clip 1.0), fp32, no
dropout, --threads torch threads.

- reft.py: its own main() with its own flags (`--max_steps warmup+iters`, --max_length = prompt length +
  response_length), started through this file (--reft_worker) only so that timers can wrap a few of its functions;
  an iteration is time_generation + time_scoring + time_training from its metrics.jsonl.
- TRL runs in its own venv (benchmarks/.venv-trl-grpo, created here with `pip install torch==2.13.0 trl==1.16.0`) as
  a subprocess of this same file (--trl_worker). An iteration is the time between two on_step_end callbacks (TRL's
  whole step, its metric bookkeeping included); generation is its `_generate_single_turn` (model.generate), scoring
  its `_calculate_rewards` (a reward function that calls reward.py), training the rest.
Training is split further on both sides, to say where the time goes: the no-grad forwards (reft.py: the old policy's
and the reference's; TRL, with one optimizer step per generation: the reference's only), the policy forward + loss,
the backward (torch.Tensor.backward), the optimizer (gradient clipping + AdamW) and the other work (advantages, batch
assembly, bookkeeping).

The two sides alternate: --pairs pairs, the first reft.py then TRL, the next TRL then reft.py, and so on, so that other
work on a shared machine slows both alike; `speedup_pairs` holds each pair's own ratio. Before each pair it waits (up
to --max_wait s) for a quiet machine and records each side's `foreign_cpu`, the share of the CPUs other processes used
meanwhile (0 = clean measurement); a pair with more than 0.1 on either side is run again (at most --retries times).
"""
import argparse
import collections
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, ROOT, ensure_checkpoint, loadavg, median, run, same_length_prompts,  # noqa: E402
                    wait_quiet, write_json)

TRL_GRPO_VENV = ROOT / "benchmarks" / ".venv-trl-grpo"  # ppo_vs_trl's .venv-trl keeps 1.12.0, the last with PPO
TRL_VERSION = "1.16.0"  # the newest the package index serves
# One pip command: a torch pulled in by trl alone would be the CUDA build.
TRL_PIP = ["torch==2.13.0", f"trl=={TRL_VERSION}"]
BETA, LR = 0.05, 5e-5
TARGET = 2.0
BUSY = 0.1  # foreign_cpu above which a pair is measured again (common.run_quiet's limit)
PHASES = ("generation", "scoring", "training")
TRAINING = ("old_policy_forward", "reference_forward", "policy_forward_and_loss", "backward", "optimizer", "other")
# The model work both sides must do each iteration (TRL needs no old-policy forward with one step per generation).
SHARED = ("generation", "reference_forward", "policy_forward_and_loss", "backward", "optimizer")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--iters", type=int, default=6, help="timed iterations per side in each pair (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="iterations each run does first and are not timed")
    p.add_argument("--pairs", type=int, default=3, help="runs of each side, alternating reft.py and TRL")
    p.add_argument("--questions", type=int, default=8, help="questions per iteration")
    p.add_argument("--samples", type=int, default=4, help="samples per question (the group size)")
    p.add_argument("--response_length", type=int, default=32, help="tokens sampled per sequence")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    p.add_argument("--max_wait", type=float, default=120, help="seconds to wait for a quiet machine before each pair")
    p.add_argument("--retries", type=int, default=2, help="reruns of a pair measured on a busy machine")
    p.add_argument("--json", help="write the figures to this JSON file (None: print only)")
    p.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--prompt_tokens", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


class PhaseClock:
    """Seconds spent in wrapped functions, summed per phase within an iteration; close() ends the iteration."""

    def __init__(self):
        self.current = collections.defaultdict(float)
        self.rows = []

    def wrap(self, owner, name, phase, when=lambda *a, **k: True):
        """Replace owner.name (a module function, a class's or an instance's method) by a timed one; calls for
        which when(*args) is false are not counted."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*a, **k):
            if not when(*a, **k):
                return original(*a, **k)
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.current[phase] += time.perf_counter() - t
        setattr(owner, name, timed)

    def start(self, phase):
        self.current[f"{phase}_started"] = time.perf_counter()

    def stop(self, phase):
        self.current[phase] += time.perf_counter() - self.current.pop(f"{phase}_started")

    def close(self):
        self.rows.append(dict(self.current))
        self.current.clear()


def iteration_times(phases):
    """Per timed iteration: generation + scoring + training (for TRL: the time between two on_step_end)."""
    return [sum(x) for x in zip(*(phases[k] for k in PHASES))]


# ----------------------------------------------------------------------------- reft.py side (main venv)

def reft_worker(out, argv):
    """reft.main(argv) with timers around its no-grad forwards, its PPO backward and its optimizer step; writes one
    row of seconds per step to `out`. Python looks each name up in the module at call time, so main() calls the
    timed versions."""
    import torch

    import reft
    clock = PhaseClock()
    clock.wrap(reft, "rollout_forwards", "no_grad_forwards")  # the old policy's and the reference's
    clock.wrap(reft, "ppo_update", "ppo_update")  # forward, loss, backward and the optimizer steps
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(reft, "clipped_step", "optimizer")
    load_models = reft.load_models

    def timed_reference(*a, **k):
        tok, policy, ref = load_models(*a, **k)
        # prepend: the clock starts before FSDP's own pre-forward hook (its all-gather) and stops after its post hook
        ref.register_forward_pre_hook(lambda *_: clock.start("reference_forward"), prepend=True)
        ref.register_forward_hook(lambda *_: clock.stop("reference_forward"))
        return tok, policy, ref
    reft.load_models = timed_reference
    step_log = reft.step_log

    def end_of_step(*a, **k):  # called once per step, after time_training's clock stopped
        clock.close()
        return step_log(*a, **k)
    reft.step_log = end_of_step
    reft.main(reft.parse_args(reft.Args, argv))
    write_json(out, clock.rows)


def time_reft(ckpt, prompts, L, args):
    """One reft.py run: ({phase: seconds per timed iteration}, foreign_cpu)."""
    out = BENCH_DIR / "reft_grpo"
    clocks = BENCH_DIR / "reft_grpo_phases.json"
    cmd = [sys.executable, Path(__file__).resolve(), "--reft_worker", clocks,
           "--model", ckpt, "--data", prompts, "--cot", "nl", "--output_dir", out,
           "--max_steps", args.warmup + args.iters, "--batch_size", args.questions, "--num_samples", args.samples,
           "--advantage", "grpo", "--scale_rewards", "group", "--kl_in_loss", "--kl_coef", BETA,
           "--loss_aggregation", "token_mean", "--ppo_epochs", 1, "--mini_batch_size", -1,
           "--micro_batch_size", args.questions * args.samples, "--lr", LR, "--temperature", 1.0,
           "--max_prompt_length", L, "--max_length", L + args.response_length, "--eval_every", 0,
           "--save_steps", 10 ** 6, "--overwrite"]  # a measurement run again replaces the last one
    foreign = run(cmd, args.threads, log=BENCH_DIR / "reft_grpo.log")
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f][args.warmup:]
    with open(clocks) as f:
        inner = json.load(f)[args.warmup:]
    if any(r["eos_fraction"] >= 1.0 for r in rows):
        raise SystemExit(f"error: {out}: a batch ended early (every row sampled EOS); responses were not "
                         f"{args.response_length} tokens")
    phases = {"generation": [r["time_generation"] for r in rows], "scoring": [r["time_scoring"] for r in rows],
              "training": [r["time_training"] for r in rows],
              "old_policy_forward": [c["no_grad_forwards"] - c["reference_forward"] for c in inner],
              "reference_forward": [c["reference_forward"] for c in inner],
              "policy_forward_and_loss": [c["ppo_update"] - c["optimizer"] - c["backward"] for c in inner],
              "backward": [c["backward"] for c in inner], "optimizer": [c["optimizer"] for c in inner],
              "eos_fraction": [r["eos_fraction"] for r in rows]}
    phases["other"] = [r["time_training"] - c["no_grad_forwards"] - c["ppo_update"]
                       for r, c in zip(rows, inner)]  # advantages, batch assembly
    return phases, foreign


# ----------------------------------------------------------------------------- TRL side (its own venv)

def ensure_trl_venv():
    py = TRL_GRPO_VENV / "bin" / "python"
    ok = py.is_file() and subprocess.run([py, "-c", f"import trl; assert trl.__version__ == '{TRL_VERSION}'"],
                                         capture_output=True).returncode == 0
    if not ok:
        print(f"creating {TRL_GRPO_VENV} with {' '.join(TRL_PIP)} (a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", TRL_GRPO_VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", *TRL_PIP], check=True)
    return py


def trl_worker(args):
    """Runs inside benchmarks/.venv-trl-grpo: warm-up + timed GRPOTrainer iterations; writes JSON to args.json."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    import reward  # the repo root is on sys.path (common.py); reward.py imports only the stdlib
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    records = reward.load_records(args.prompts)
    # Plain-text prompts: TRL tokenizes them itself (the tiny tokenizer adds no BOS, so its ids are reft.py's: checked
    # below, by their length).
    data = Dataset.from_dict({"prompt": [reward.build_prompt(r["question"], "nl", sampling=True) for r in records],
                              "question": [r["question"] for r in records],
                              "answer_value": [r["answer_value"] for r in records]})

    def minigsm_reward(completions, question, answer_value, **_):
        """reft.py's default --reward: reward.py's 1 right / 0.1 wrong number / 0 no answer."""
        return reward.compute_rewards(completions, answer_value, "nl", question)

    policy = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    n_iter = args.warmup + args.iters
    config = GRPOConfig(
        output_dir=str(BENCH_DIR / "trl_grpo_out"), report_to="none", save_strategy="no", logging_steps=10 ** 6,
        disable_tqdm=True, use_cpu=True, bf16=False, activation_checkpointing=False,  # TRL's defaults: True, True
        seed=42, max_steps=n_iter, per_device_train_batch_size=args.questions * args.samples,  # counted in sequences
        gradient_accumulation_steps=1, num_generations=args.samples, num_iterations=1,  # one optimizer step
        max_completion_length=args.response_length, temperature=1.0, top_p=1.0, top_k=0,
        beta=BETA, loss_type="dapo", scale_rewards="group", epsilon=0.2,
        learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
        disable_dropout=True)
    trainer = GRPOTrainer(model=policy, reward_funcs=minigsm_reward, args=config, train_dataset=data,
                          processing_class=tok)

    # Instance attributes shadow the methods, which the trainer calls as self._name(...).
    clock = PhaseClock()
    clock.wrap(trainer, "_generate_single_turn", "generation")
    clock.wrap(trainer, "_calculate_rewards", "scoring")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", "reference_forward",
               when=lambda model, *a, **k: model is trainer.ref_model)  # the policy's runs inside compute_loss
    clock.wrap(trainer, "compute_loss", "policy_forward_and_loss")
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(trainer, "_clip_grad_norm", "optimizer")  # + optimizer.step(), between the two callbacks below
    generated = []  # per iteration: (prompt lengths, completion lengths, share of rows that sampled EOS)
    generate = trainer._generate_single_turn

    def record_lengths(prompt_ids, *a, **k):
        completion_ids, logprobs = generate(prompt_ids, *a, **k)  # lists, each cut after its row's first EOS
        generated.append(({len(p) for p in prompt_ids}, max(len(c) for c in completion_ids),
                          sum(len(c) < args.response_length or c[-1] in trainer.eos_token_ids
                              for c in completion_ids) / len(completion_ids)))
        return completion_ids, logprobs
    trainer._generate_single_turn = record_lengths

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_pre_optimizer_step(self, *a, **k):
            clock.start("optimizer")

        def on_optimizer_step(self, *a, **k):
            clock.stop("optimizer")

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())
            clock.close()

    marks = Clock()
    trainer.add_callback(marks)
    trainer.train()
    per_iter = [b - a for a, b in zip(marks.marks, marks.marks[1:])][args.warmup:]
    if len(per_iter) != args.iters or len(generated) != n_iter:
        raise SystemExit(f"error: TRL ran {len(marks.marks) - 1} steps and {len(generated)} generations, "
                         f"expected {n_iter} of each")
    prompt_lengths = set().union(*(p for p, _, _ in generated))
    if prompt_lengths != {args.prompt_tokens}:
        raise SystemExit(f"error: TRL's prompts have {sorted(prompt_lengths)} tokens, not {args.prompt_tokens}")
    if min(w for _, w, _ in generated) != args.response_length:
        raise SystemExit(f"error: TRL generated {min(w for _, w, _ in generated)} tokens in an iteration, not "
                         f"{args.response_length}")
    rows = clock.rows[args.warmup:]
    phases = {k: [r.get(k, 0.0) for r in rows] for k in ("generation", "scoring", *TRAINING)}
    phases["training"] = [t - r["generation"] - r["scoring"] for t, r in zip(per_iter, rows)]
    phases["other"] = [t - sum(r.get(k, 0.0) for k in TRAINING) for t, r in zip(phases["training"], rows)]
    phases["eos_fraction"] = [e for _, _, e in generated[args.warmup:]]
    write_json(args.json, {"phases": phases, "threads": torch.get_num_threads(), "trl": trl.__version__,
                           "torch": torch.__version__, "transformers": transformers.__version__})


def time_trl(ckpt, prompts, L, args):
    """One TRL run: ({phase: seconds per timed iteration}, foreign_cpu, versions)."""
    out = BENCH_DIR / "trl_grpo.json"
    cmd = [ensure_trl_venv(), Path(__file__).resolve(), "--trl_worker", "--ckpt", ckpt, "--prompts", prompts,
           "--prompt_tokens", L, "--json", out, "--iters", args.iters, "--warmup", args.warmup,
           "--questions", args.questions, "--samples", args.samples, "--response_length", args.response_length,
           "--threads", args.threads]
    foreign = run(cmd, args.threads, log=out.with_suffix(".log"))
    with open(out) as f:
        res = json.load(f)
    return res.pop("phases"), foreign, res


# ----------------------------------------------------------------------------- the interleaved pairs

def measure_pair(k, ckpt, prompts, L, args):
    """Pair k: both sides, reft.py first in even pairs and TRL first in odd ones, run again (up to --retries times)
    while either side's foreign_cpu is above BUSY; returns the last attempt."""
    order = ("reft", "trl") if k % 2 == 0 else ("trl", "reft")
    waited = 0.0
    for attempt in range(args.retries + 1):
        waited += wait_quiet(args.max_wait)
        load_start, res, foreign = loadavg(), {}, {}
        for side in order:
            if side == "reft":
                res["reft"], foreign["reft"] = time_reft(ckpt, prompts, L, args)
            else:
                res["trl"], foreign["trl"], versions = time_trl(ckpt, prompts, L, args)
        if max(foreign.values()) <= BUSY or attempt == args.retries:
            break
        print(f"other processes used {100 * max(foreign.values()):.0f}% of the CPUs meanwhile: measuring pair "
              f"{k + 1} again", flush=True)
    return {"order": ", ".join(order), **res, "foreign_cpu": foreign, "waited_for_quiet_s": round(waited, 1),
            "runs": attempt + 1, "loadavg_start": load_start, "loadavg_end": loadavg(), "versions": versions}


def side_figures(pairs, side):
    """A side's figures over all pairs: the timed iterations pooled, and the load it was measured under."""
    phases = {k: [x for p in pairs for x in p[side][k]] for k in pairs[0][side]}
    per_iter = iteration_times(phases)
    return {"s_per_iter": median(per_iter), "s_per_iter_best": min(per_iter), "per_iter": per_iter,
            **{f"{k}_s": median(phases[k]) for k in PHASES + TRAINING},
            "eos_fraction": median(phases["eos_fraction"]),
            "foreign_cpu": max(p["foreign_cpu"][side] for p in pairs),  # the worst pair's
            "foreign_cpu_per_pair": [p["foreign_cpu"][side] for p in pairs],
            "waited_for_quiet_s": sum(p["waited_for_quiet_s"] for p in pairs), "runs": [p["runs"] for p in pairs]}


def where_the_time_goes(reft, trl):
    """Per phase (medians): each side's seconds, and the difference TRL - reft.py (negative: reft.py is slower)."""
    return {ph: {"reft_s": reft[f"{ph}_s"], "trl_s": trl[f"{ph}_s"], "trl_minus_reft_s": trl[f"{ph}_s"] -
                 reft[f"{ph}_s"]} for ph in PHASES + TRAINING}


def speedup_ceiling(reft, trl):
    """TRL's iteration ÷ the model work both sides do (SHARED), each phase at the faster side's median: the speed-up
    reft.py would reach if it spent nothing else (no old-policy forward, no scoring, no bookkeeping)."""
    return trl["s_per_iter"] / sum(min(reft[f"{ph}_s"], trl[f"{ph}_s"]) for ph in SHARED)


def main():
    if sys.argv[1:2] == ["--reft_worker"]:  # before argparse: the rest are reft.py's own flags
        return reft_worker(sys.argv[2], sys.argv[3:])
    args = parse()
    if args.trl_worker:
        return trl_worker(args)
    ckpt = ensure_checkpoint()
    prompts, L = same_length_prompts(ckpt, n_min=args.questions * (args.warmup + args.iters + 1))
    pairs = []
    for k in range(args.pairs):
        p = measure_pair(k, ckpt, prompts, L, args)
        p["ratio"] = median(iteration_times(p["trl"])) / median(iteration_times(p["reft"]))
        pairs.append(p)
        print(f"pair {k + 1}/{args.pairs} ({p['order']}): reft.py {median(iteration_times(p['reft'])):.3f} s, TRL "
              f"{median(iteration_times(p['trl'])):.3f} s per iteration (TRL/reft.py {p['ratio']:.2f}); "
              f"foreign_cpu {p['foreign_cpu']}", flush=True)
    res = {"setting": {
        "checkpoint": str(ckpt.relative_to(ROOT)), "prompt_tokens": L, "questions_per_iter": args.questions,
        "samples_per_question": args.samples, "sequences_per_iter": args.questions * args.samples,
        "response_tokens": args.response_length, "temperature": 1.0, "beta": BETA, "lr": LR,
        "loss": "reft.py --loss_aggregation token_mean = TRL loss_type='dapo'", "scale_rewards": "group",
        "optimizer_steps_per_iter": 1, "threads": args.threads, "warmup": args.warmup, "iters": args.iters,
        "pairs": args.pairs}}
    res["reft"] = side_figures(pairs, "reft")
    res["trl"] = {**side_figures(pairs, "trl"), **pairs[-1]["versions"]}
    res["pairs"] = [{k: v for k, v in p.items() if k != "versions"} for p in pairs]
    res["speedup"] = res["trl"]["s_per_iter"] / res["reft"]["s_per_iter"]
    res["speedup_best"] = res["trl"]["s_per_iter_best"] / res["reft"]["s_per_iter_best"]
    res["speedup_pairs"] = [p["ratio"] for p in pairs]
    res["target"], res["target_met"] = TARGET, res["speedup"] >= TARGET
    res["where_the_time_goes"] = where_the_time_goes(res["reft"], res["trl"])
    res["speedup_ceiling"] = speedup_ceiling(res["reft"], res["trl"])
    print(f"reft.py --advantage grpo: {res['reft']['s_per_iter']:.3f} s/iteration; TRL {res['trl']['trl']} "
          f"GRPOTrainer: {res['trl']['s_per_iter']:.3f} s/iteration")
    print(f"speed-up of reft.py over TRL: {res['speedup']:.2f}x (medians; best against best "
          f"{res['speedup_best']:.2f}x; per pair {', '.join(f'{s:.2f}' for s in res['speedup_pairs'])}; "
          f"target >= {TARGET}x)")
    print("median seconds per phase    reft.py      TRL")
    for ph, f in res["where_the_time_goes"].items():
        print(f"  {ph:<25} {f['reft_s']:8.3f} {f['trl_s']:8.3f}")
    print(f"with no cost beyond the model work both do, reft.py would be at most {res['speedup_ceiling']:.2f}x faster")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
