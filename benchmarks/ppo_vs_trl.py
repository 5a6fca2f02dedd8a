"""Seconds per PPO iteration: reft.py against TRL 1.12.0's PPOTrainer (the last TRL release with PPO).

    python benchmarks/ppo_vs_trl.py                        # 2 warm-up + 6 timed iterations per side
    python benchmarks/ppo_vs_trl.py --iters 2 --warmup 1   # smoke test

Both sides: the same `tiny` checkpoint (sft.py --model tiny, 1 step), the same minigsm training questions (all
with one prompt length, so neither side pads), 32 prompts per iteration, exactly --response_length sampled tokens
(temperature 1, no top-k/top-p; the near-random policy never ends all 32 rows early, which is checked), --ppo_epochs
passes with one minibatch = the whole batch, fp32, --threads torch threads, run one after the other.

- reft.py runs as the real script (`reft.py --max_steps warmup+iters`, --max_length = prompt length +
  response_length); an iteration is time_generation + time_scoring + time_training from its metrics.jsonl
  (everything from sampling to the last optimizer step; only the few-ms logging after it is left out).
  It runs twice: the paper's shared-trunk value head (default) and --separate_value_model (a second trunk, as TRL).
- TRL runs in its own venv (benchmarks/.venv-trl, created here with `pip install torch==2.13.0 trl==1.12.0`) as a
  subprocess of this same file (--trl_worker). It needs model-based rewards: a random tiny
  LlamaForSequenceClassification(num_labels=1) of the same size; its value model is the checkpoint's trunk plus a
  score head. An iteration is the time between two on_step_end callbacks (TRL's whole update, logging included).
Before each side it waits (up to --max_wait s) for a quiet machine, and records `foreign_cpu`: the share of the
CPUs other processes used meanwhile (0 = clean measurement); a side measured with more than 0.1 is run again
(at most twice).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH_DIR, ROOT, TRL_VENV, ensure_checkpoint, median, run_quiet,  # noqa: E402
                    same_length_prompts, write_json)

TRL_PIP = ["torch==2.13.0", "trl==1.12.0"]  # one pip command: a torch pulled in by trl alone would be the CUDA build


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--iters", type=int, default=6, help="timed iterations per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="iterations run first and not timed")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per iteration (one sample each)")
    p.add_argument("--response_length", type=int, default=32, help="tokens sampled per prompt")
    p.add_argument("--ppo_epochs", type=int, default=2,
                   help="PPO passes over each batch: the paper's 2 (TRL's default would be 4)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    p.add_argument("--skip_separate", action="store_true", help="skip the reft.py --separate_value_model run")
    p.add_argument("--max_wait", type=float, default=120, help="seconds to wait for a quiet machine before each side")
    p.add_argument("--retries", type=int, default=2, help="reruns of a side measured on a busy machine")
    p.add_argument("--json", help="write the figures to this JSON file (None: print only)")
    p.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    return p.parse_args()


# ----------------------------------------------------------------------------- reft.py side (main venv)

def time_reft(ckpt, prompts, L, args, separate):
    out = BENCH_DIR / f"reft_{'separate' if separate else 'shared'}_e{args.ppo_epochs}"
    steps = args.warmup + args.iters
    cmd = [sys.executable, "reft.py", "--model", ckpt, "--data", prompts, "--cot", "nl", "--output_dir", out,
           "--max_steps", steps, "--batch_size", args.batch_size, "--ppo_epochs", args.ppo_epochs,
           "--max_prompt_length", L, "--max_length", L + args.response_length, "--eval_every", 0,
           # TRL's side: one sample per prompt, lr 5e-5, KL 0.05, value weight 5, λ 0.95 (not the tiny model's recipe)
           "--num_samples", 1, "--lr", 5e-5, "--kl_coef", 0.05, "--vf_coef", 5.0, "--lam", 0.95,
           "--save_steps", 10 ** 6, "--overwrite",  # a measurement run again replaces the last one
           *(["--separate_value_model"] if separate else [])]
    waited, foreign, runs = run_quiet(cmd, args.max_wait, threads=args.threads, retries=args.retries,
                                      log=BENCH_DIR / f"{out.name}.log")
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f][args.warmup:]
    if any(r["eos_fraction"] >= 1.0 for r in rows):
        raise SystemExit(f"error: {out}: a batch ended early (every row sampled EOS); responses were not "
                         f"{args.response_length} tokens")
    total = [r["time_generation"] + r["time_scoring"] + r["time_training"] for r in rows]
    return {"s_per_iter": median(total), "s_per_iter_best": min(total), "per_iter": total,
            "generation_s": median([r["time_generation"] for r in rows]),
            "scoring_s": median([r["time_scoring"] for r in rows]),
            "training_s": median([r["time_training"] for r in rows]),  # old/ref forwards + GAE + PPO epochs
            "response_tokens": args.response_length, "eos_fraction": median([r["eos_fraction"] for r in rows]),
            "waited_for_quiet_s": waited, "foreign_cpu": foreign, "runs": runs}


# ----------------------------------------------------------------------------- TRL side (its own venv)

def ensure_trl_venv():
    py = TRL_VENV / "bin" / "python"
    ok = py.is_file() and subprocess.run([py, "-c", "import trl.experimental.ppo"], capture_output=True).returncode == 0
    if not ok:
        print(f"creating {TRL_VENV} with {' '.join(TRL_PIP)} (a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", *TRL_PIP], check=True)
    return py


def trl_worker(args):
    """Runs inside benchmarks/.venv-trl: warm-up + timed PPOTrainer iterations; writes JSON to args.json."""
    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              LlamaForSequenceClassification, TrainerCallback)
    from transformers.utils import logging as hf_logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    import reward
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    tok.padding_side = "left"
    records = reward.load_records(args.prompts)
    ids = [tok(reward.build_prompt(r["question"], "nl", sampling=True), add_special_tokens=False).input_ids
           for r in records]
    data = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.ckpt, num_labels=1, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(args.ckpt)
    cfg.num_labels = 1
    reward_model = LlamaForSequenceClassification(cfg)  # random: TRL has no rule-based reward

    gen_times, gen_lengths = [], []
    original = ppo_mod.batch_generation

    def timed_generation(model, queries, *a, **k):
        t = time.perf_counter()
        out = original(model, queries, *a, **k)
        gen_times.append(time.perf_counter() - t)
        gen_lengths.append(out[0].size(1) - queries.size(1))
        return out
    ppo_mod.batch_generation = timed_generation  # train() looks the name up in its module at call time

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    clock = Clock()
    n_iter = args.warmup + args.iters
    config = PPOConfig(output_dir=str(BENCH_DIR / "trl_out"), report_to="none", save_strategy="no", logging_steps=1,
                       disable_tqdm=True, use_cpu=True, bf16=False, gradient_checkpointing=False, seed=42,
                       per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                       num_mini_batches=1, local_rollout_forward_batch_size=args.batch_size,
                       per_device_eval_batch_size=args.batch_size, response_length=args.response_length,
                       num_ppo_epochs=args.ppo_epochs, stop_token="eos", num_sample_generations=0,
                       total_episodes=args.batch_size * n_iter, learning_rate=5e-5, temperature=1.0,
                       kl_coef=0.05, vf_coef=5.0, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95)
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward_model,
                         value_model=value, train_dataset=data, eval_dataset=data, callbacks=[clock])
    trainer.train()
    per_iter = [b - a for a, b in zip(clock.marks, clock.marks[1:])][args.warmup:]
    if len(per_iter) != args.iters:
        raise SystemExit(f"error: TRL ran {len(clock.marks) - 1} iterations, expected {n_iter}")
    if min(gen_lengths) != args.response_length:
        raise SystemExit(f"error: TRL generated {min(gen_lengths)} tokens in an iteration, not {args.response_length}")
    gen = gen_times[args.warmup:]
    write_json(args.json, {"s_per_iter": median(per_iter), "s_per_iter_best": min(per_iter), "per_iter": per_iter,
                           "generation_s": median(gen),
                           "rest_s": median([t - g for t, g in zip(per_iter, gen)]),
                           "response_tokens": min(gen_lengths), "threads": torch.get_num_threads(),
                           "trl": trl.__version__, "torch": torch.__version__})


def time_trl(ckpt, prompts, args):
    py = ensure_trl_venv()
    out = BENCH_DIR / f"trl_e{args.ppo_epochs}.json"
    cmd = [py, Path(__file__).resolve(), "--trl_worker", "--ckpt", ckpt, "--prompts", prompts, "--json", out,
           "--iters", args.iters, "--warmup", args.warmup, "--batch_size", args.batch_size,
           "--response_length", args.response_length, "--ppo_epochs", args.ppo_epochs, "--threads", args.threads]
    waited, foreign, runs = run_quiet(cmd, args.max_wait, threads=args.threads, retries=args.retries,
                                      log=out.with_suffix(".log"))
    with open(out) as f:
        return {**json.load(f), "waited_for_quiet_s": waited, "foreign_cpu": foreign, "runs": runs}


def main():
    args = parse()
    if args.trl_worker:
        return trl_worker(args)
    ckpt = ensure_checkpoint()
    prompts, L = same_length_prompts(ckpt, n_min=args.batch_size * (args.warmup + args.iters + 1))
    res = {"setting": {"checkpoint": str(ckpt.relative_to(ROOT)), "prompt_tokens": L, **{k: getattr(args, k) for k in (
        "batch_size", "response_length", "ppo_epochs", "threads", "warmup", "iters")}}}
    res["reft"] = time_reft(ckpt, prompts, L, args, separate=False)
    print(f"reft.py (shared value trunk): {res['reft']['s_per_iter']:.2f} s/iteration", flush=True)
    if not args.skip_separate:
        res["reft_separate_value"] = time_reft(ckpt, prompts, L, args, separate=True)
        print(f"reft.py --separate_value_model: {res['reft_separate_value']['s_per_iter']:.2f} s/iteration", flush=True)
    res["trl"] = time_trl(ckpt, prompts, args)
    print(f"TRL {res['trl']['trl']} PPOTrainer: {res['trl']['s_per_iter']:.2f} s/iteration", flush=True)
    res["speedup"] = res["trl"]["s_per_iter"] / res["reft"]["s_per_iter"]
    res["speedup_best"] = res["trl"]["s_per_iter_best"] / res["reft"]["s_per_iter_best"]
    print(f"speed-up of reft.py over TRL: {res['speedup']:.2f}x (medians; best against best "
          f"{res['speedup_best']:.2f}x; target >= 2x)")
    if "reft_separate_value" in res:
        res["speedup_separate_value"] = res["trl"]["s_per_iter"] / res["reft_separate_value"]["s_per_iter"]
        print(f"  with a separate value trunk like TRL's: {res['speedup_separate_value']:.2f}x")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
