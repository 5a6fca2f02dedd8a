"""Evaluation: greedy top-1 accuracy, majority voting over k samples, and verifier reranking of the same samples.

Reading guide: each of the paper's inference metrics, and the functions that compute it, in the order main() runs them
  top-1 (greedy decoding; Table 2)             greedy_predictions: generate_texts → extract → correct_flags
  Voting@k (the majority answer; Table 4)      vote_predictions: generate_texts(do_sample=True) → majority_index
                                               (vote_groups, vote_counts)
  Rerank@k (the verifier's best; Table 4)      rerank_predictions: verifier_scores (a rerank.py verifier) → rerank_index
  pass@k (any sample right; not in the paper)  pass_at_k, in vote_predictions
  the paper code's answer rules (--scoring paper)  reward.extract_answers_paper, reward.paper_correct, paper_candidates
write_outputs makes the table. Below the "infrastructure" marker: evaluate.py's checks of its flags, then copies
shared with the other stages (flag parsing and checks, the distributed setup, loading).

Modes (the paper's Table 2 reports greedy "value accuracy", Table 4 Voting@100 and Rerank@100):
  greedy  greedy decoding, one answer per question. Every mode uses the rollout prompt (`build_prompt(q, cot,
          sampling=True)`): for the python CoT it ends with the `def solution():` header and docstring, and the
          completion is the body, as in the paper's ReFT evaluation and sampling.py. (The paper's SFT script
          let the model write the header, copying the question, itself; one prompt for both models keeps the
          comparison fair, and a small model's copying errors out of it. sft.py evaluates the same way.)
  vote    k samples per question. Majority over the extracted answers: no-answer samples
          are left out, answers that reward.answers_equal calls equal count as one answer (the paper counts
          exact floats), ties go to the answer seen first. Also pass@k: any of the k samples correct.
  rerank  the same k samples scored by a verifier trained with rerank.py; the highest-scoring sample among those
          with an extractable answer is chosen (none → wrong). Also reports vote and pass@k on the samples.
  all     greedy, then one set of k samples shared by vote and rerank (rerank only when --verifier is given).

Run it (CPU, the tiny model, on minigsm's test split):
    python evaluate.py --model runs/reft/best                       # greedy top-1 -> runs/eval/reft_best
    python evaluate.py --mode all --model runs/sft/best --verifier runs/rerank/final       # + voting@8, rerank@8
    torchrun --standalone --nproc_per_node 2 evaluate.py --model runs/sft/best --output_dir runs/eval2
The paper's setting (8 GPUs; 100 samples at temperature 1.0, prompt + CoT at most 1024 tokens):
    torchrun --nproc_per_node 8 evaluate.py --mode all -k 100 --data gsm8k_reft --cot python \\
        --model runs/reft/best --verifier runs/rerank/final --max_new_tokens 700 --batch_size 50

Scoring: --scoring lenient (the default) extracts and compares answers by reward.py's rules; --scoring paper by the
paper code's, exactly (reward.extract_answers_paper, reward.paper_correct): votes then count exact values, and on
MathQA only one-character answers vote and one-letter answers are rerank candidates, as its sampling.py and
train_reward_model.py do. Use it for numbers to set beside the paper's.
With --reward module:function (a callable with reward.compute_rewards' signature; lenient scoring only) the
completions it gives 1.0 (called with partial_reward=False) are the correct ones. Votes are still over the answers
reward.py extracts, and a vote or a rerank choice is correct when the sample it picked is.

Sampling defaults: temperature 1.0 with pure sampling (top_k 0, top_p 1), the distribution the policy is trained
on in ReFT's rollouts. The paper's sampling.py left transformers' default top_k=50 in place; pass --top_k 50 to
reproduce that. Defaults here are sized for the CPU (k=8; paper: k=100).

On a CPU shared with other jobs, OMP_NUM_THREADS=1 can make generation several times faster (torchrun sets it).

Outputs: {output_dir}/predictions.jsonl (one row per question: item_id, gold, greedy completion/answer/correct,
sample answers and correct flags, votes, verifier scores, the chosen answers and their correct flags) and
{output_dir}/results.json ({"accuracy": {"greedy", "vote", "rerank", "pass@k"}, "no_answer": {"greedy", "samples"},
"k", "n", "model", ...}); no_answer is the fraction of completions without an extractable answer (None), so that
"unparseable" is not mixed with "wrong".
Questions are split across ranks under torchrun and gathered on rank 0; the models are wrapped in FSDP2 as in
sft.py, with the full parameters gathered once around all of a mode's generate() calls.
"""
import argparse
import ast
import dataclasses
import gc
import inspect
import json
import math
import os
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import PreTrainedModel

import reward


@dataclass
class Args:
    mode: Literal["greedy", "vote", "rerank", "all"] = "greedy"
    """what to report: `greedy` top-1, `vote` majority voting@k and pass@k over k samples, `rerank` rerank@k of the
    same samples by --verifier, `all` every one"""
    model: str = ""
    """required: the policy checkpoint, an HF folder written by sft.py or reft.py"""
    verifier: str = ""
    """verifier checkpoint written by rerank.py (`{output_dir}/final`); required by --mode rerank (--mode all
    skips rerank without it); not given: none"""
    data: str = "minigsm"
    """a prepared dataset name under data/ or a .jsonl/.json file of {item_id, question, answer_value}"""
    split: str = ""
    """split of a prepared dataset or folder; not given: test (a --data file is evaluated as it is, with no --split)"""
    cot: Literal["auto", "nl", "python"] = "auto"
    """chain-of-thought kind: `nl` or `python`; `auto` = the kind --model (and --verifier) were trained on (their
    train_args.json)"""
    k: int = 8
    """k, the samples per question of voting@k and rerank@k (paper: 100); not --top_k, a filter of each sample's
    tokens"""
    temperature: float = 1.0
    """sampling temperature (paper: 1.0)"""
    top_k: int = 0
    """sampling filter: draw each token from the top_k likeliest, 0 = off (the paper's sampling.py used transformers'
    default 50); not -k, the number of samples"""
    top_p: float = 1.0
    """nucleus filter of the sampling, 1 = off"""
    limit: int = -1
    """evaluate only the first N questions (-1: all)"""
    batch_size: int = 64
    """sequences per generate() call and per verifier forward on one process"""
    max_new_tokens: int = -1
    """generation budget per completion; -1 = by --model's size: 48 for a model under 50 M parameters (the tiny one:
    minigsm CoTs are ~20 tokens), else 700 (the paper's generation length)"""
    output_dir: str = ""
    """where predictions.jsonl and results.json go; empty = runs/eval/ + --model with / as _ (runs/reft/best ->
    runs/eval/reft_best), so evaluating two models does not overwrite one with the other"""
    seed: int = 42
    """sampling seed (each rank uses seed + rank)"""
    scoring: Literal["lenient", "paper"] = "lenient"
    """answer extraction and comparison: `lenient` (reward.py's rules) or `paper` (the paper code's, exactly, for
    numbers to set beside the paper's: docs/scaling.md, "Deviations from the paper's code")"""
    reward: str = "reward:compute_rewards"
    """what is correct: a completion its `module:function` gives 1.0 (partial_reward=False), a callable with
    reward.compute_rewards' signature (module from sys.path or the current directory); votes stay over the answers
    reward.py extracts. Any other than the default needs --scoring lenient"""


RANGES = [("temperature", lambda v: v > 0, "above 0"), ("top_k", lambda v: v >= 0, "at least 0"),
          ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
          ("limit", lambda v: v == -1 or v >= 1, "-1 (all) or at least 1"),
          ("batch_size", lambda v: v >= 1, "at least 1"),
          ("max_new_tokens", lambda v: v == -1 or v >= 1, "-1 (by model size) or at least 1")]


# ----------------------------------------------------------------------------- selection rules (pure)

def vote_groups(answers, scoring="lenient"):
    """[[index of the group's first answer, count], ...] in order of first appearance; None answers are left out.

    An answer that reward.answers_equal calls equal to an earlier group's first answer (|a-b| <= 1e-2 for
    numbers) joins that group; the first answer represents it. scoring="paper": only equal values vote together
    (sampling.py counts exact floats with a Counter)."""
    groups = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if a == answers[g[0]] if scoring == "paper" else reward.answers_equal(a, answers[g[0]]):
                g[1] += 1
                break
        else:
            groups.append([i, 1])
    return groups


def vote_counts(answers, scoring="lenient"):
    """[[representative, count], ...] of vote_groups, as predictions.jsonl shows them."""
    return [[answers[i], n] for i, n in vote_groups(answers, scoring)]


def majority_index(answers, scoring="lenient"):
    """The sample whose answer wins the vote: the first of the largest answer group (the first group among equal
    counts), or None when no sample has an answer. The vote is correct when that sample is: under reward.py's rules
    that is judging the answer; a --reward that reads the text judges the text that gave the answer first."""
    groups = vote_groups(answers, scoring)
    return max(groups, key=lambda g: g[1])[0] if groups else None  # max keeps the first of equal counts


def rerank_index(answers, scores):
    """The highest-scoring sample that has an answer (first of equal scores), or None."""
    best = None
    for i, (a, s) in enumerate(zip(answers, scores)):
        if a is not None and (best is None or s > scores[best]):
            best = i
    return best


def pass_at_k(correct_flags):
    """True when any of the k samples is correct (the paper's rerank "upper bound")."""
    return any(correct_flags)


def extract(texts, cot, records, scoring):
    """The answer of each completion (records[i] is the question of texts[i]), by the --scoring rules."""
    questions = [r["question"] for r in records]
    if scoring == "paper":
        return reward.extract_answers_paper(texts, cot, [r["answer_value"] for r in records], questions)
    return reward.extract_answers(texts, cot, questions)


def correct_flags(texts, answers, records, args, reward_fn):
    """Whether each completion is correct (texts[i] answers records[i]; answers[i] extracted by the --scoring
    rules): --scoring paper compares the answer as the paper's code does; else --reward decides, 1.0 is correct."""
    if args.scoring == "paper":
        return [reward.paper_correct(a, r["answer_value"]) for a, r in zip(answers, records)]
    return [s == 1.0 for s in reward.score_completions(reward_fn, texts, answers, records, args.cot, False)]


def paper_candidates(answers, letters_only):
    """The paper's MathQA filter on sampled answers (numbers pass): sampling.py's vote counts an answer of one
    character, train_reward_model.py's rerank one of one letter; any other text counts as no answer."""
    return [a if not isinstance(a, str) or len(a) == 1 and (a.isalpha() or not letters_only) else None
            for a in answers]


# ----------------------------------------------------------------------------- generation and scoring

@torch.no_grad()
def generate_texts(model, tok, prompts, batch_size, device, desc, rank, **gen_kwargs):
    """Completions of this rank's prompts, batch by batch with left padding; stops when every sequence ended."""
    tok.padding_side = "left"
    texts = []
    n = num_calls(len(prompts), batch_size, device)
    with gathered_for_generation(model):
        for b in tqdm(range(n), desc=desc, disable=rank != 0):
            chunk = prompts[b * batch_size:(b + 1) * batch_size]
            ids = [reward.encode_prompt(tok, p) for p in chunk or [reward.INSTRUCTION]]  # a rank done early
            enc = tok.pad({"input_ids": ids}, return_tensors="pt").to(device)  # left padding
            # synced_gpus=False: the parameters are gathered, so a rank that is done need not keep stepping
            # for the others; transformers' default under FSDP does, and then crashes on a cache one token short.
            out = model.generate(**enc, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True,
                                 synced_gpus=False, **gen_kwargs)
            if chunk:
                texts += tok.batch_decode(out[:, enc.input_ids.size(1):], skip_special_tokens=True)
    return texts


@torch.no_grad()
def verifier_scores(verifier, tok, texts, batch_size, device, rank):
    """P(correct) = sigmoid(logit) of each text; right padding, so the head reads the last real token.

    The tokenizer saved by rerank.py carries the verifier's training max_length as model_max_length."""
    tok.padding_side = "right"
    scores = []
    for b in tqdm(range(num_calls(len(texts), batch_size, device)), desc="verifier", disable=rank != 0):
        chunk = texts[b * batch_size:(b + 1) * batch_size]
        ids = [reward.encode_prompt(tok, t)[:tok.model_max_length] for t in chunk or [reward.INSTRUCTION]]
        enc = tok.pad({"input_ids": ids}, return_tensors="pt").to(device)  # right padding, cut as rerank.encode cuts
        logits = verifier(**enc).logits[:, 0].float()  # (B,)
        if chunk:
            scores += torch.sigmoid(logits).tolist()
    return scores


# ----------------------------------------------------------------------------- the metrics, each one step

def greedy_predictions(model, tok, prompts, mine, args, reward_fn, device, rank):
    """Top-1: per question, its greedy completion, the answer extracted from it and whether it is correct."""
    texts = generate_texts(model, tok, prompts, args.batch_size, device, "greedy", rank, do_sample=False,
                           max_new_tokens=args.max_new_tokens)
    answers = extract(texts, args.cot, mine, args.scoring)
    return [{"greedy_completion": t, "greedy_answer": a, "greedy_correct": c}
            for t, a, c in zip(texts, answers, correct_flags(texts, answers, mine, args, reward_fn))]


def vote_predictions(model, tok, prompts, mine, args, reward_fn, device, rank):
    """Voting@k and pass@k over k samples per question: ([its k completions], [its predictions])."""
    k = args.k
    texts = generate_texts(model, tok, [p for p in prompts for _ in range(k)], args.batch_size, device,
                           f"sample k={k}", rank, do_sample=True, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    repeated = [r for r in mine for _ in range(k)]
    all_answers = extract(texts, args.cot, repeated, args.scoring)
    all_correct = correct_flags(texts, all_answers, repeated, args, reward_fn)
    samples, predictions = [], []
    for i in range(len(mine)):
        answers, correct = all_answers[i * k:(i + 1) * k], all_correct[i * k:(i + 1) * k]
        voters = paper_candidates(answers, False) if args.scoring == "paper" else answers
        chosen = majority_index(voters, args.scoring)
        samples.append(texts[i * k:(i + 1) * k])
        predictions.append({"sample_answers": answers, "sample_correct": correct,
                            "votes": vote_counts(voters, args.scoring),
                            "vote_answer": None if chosen is None else answers[chosen],
                            "vote_correct": chosen is not None and correct[chosen], "pass_at_k": pass_at_k(correct)})
    return samples, predictions


def rerank_predictions(verifier, tok, prompts, samples, voted, args, device, rank):
    """Rerank@k of the same samples: per question, the verifier's scores and the best-scored sample with an answer."""
    # Identical completions get identical scores: score each distinct text once.
    texts = sorted({prompt + t for prompt, ks in zip(prompts, samples) for t in ks})
    score_of = dict(zip(texts, verifier_scores(verifier, tok, texts, args.batch_size, device, rank)))
    predictions = []
    for prompt, ks, v in zip(prompts, samples, voted):
        scores = [score_of[prompt + t] for t in ks]
        candidates = paper_candidates(v["sample_answers"], True) if args.scoring == "paper" else v["sample_answers"]
        chosen = rerank_index(candidates, scores)
        predictions.append({"verifier_scores": scores,
                            "rerank_answer": None if chosen is None else v["sample_answers"][chosen],
                            "rerank_correct": chosen is not None and v["sample_correct"][chosen]})
    return predictions


# ----------------------------------------------------------------------------- main

def main(args):
    reward_fn = check_args(args)
    records = load_questions(args)
    rank, world, device, mesh = init_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    do_greedy, do_sample = args.mode in ("greedy", "all"), args.mode != "greedy"
    do_rerank = args.mode == "rerank" or (args.mode == "all" and bool(args.verifier))
    if args.mode == "all" and not args.verifier:
        log("no --verifier given: rerank is skipped")
    t0 = time.time()
    torch.manual_seed(args.seed + rank)  # different samples on each rank
    mine = records[rank::world]
    prompts = [reward.build_prompt(r["question"], args.cot, sampling=True) for r in mine]
    check_memory(args, records, world, device)
    model, tok = load("AutoModelForCausalLM", args.model, "--model", mesh, device)
    model.eval()
    if rank == 0:  # after the checks and the policy's loading: a refused command writes nothing
        if os.path.exists(os.path.join(args.output_dir, "results.json")):
            log(f"overwriting the results in {args.output_dir} (evaluate.py keeps only its latest)")
        os.makedirs(args.output_dir, exist_ok=True)
        import transformers
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:  # the flags, the world size, the versions
            json.dump({**dataclasses.asdict(args), "world_size": world, "python": sys.version.split()[0],
                       "torch": torch.__version__, "transformers": transformers.__version__}, f, indent=2)
    none = [{} for _ in mine]
    greedy = greedy_predictions(model, tok, prompts, mine, args, reward_fn, device, rank) if do_greedy else none
    samples, voted = vote_predictions(model, tok, prompts, mine, args, reward_fn, device, rank) if do_sample \
        else (None, none)
    # FSDP2 holds a sharded model in reference cycles: only a collection frees the policy's weights (27 GB of a 7B
    # model on one GPU) before the verifier loads.
    del model
    gc.collect()
    reranked = none
    if do_rerank:
        verifier, vtok = load("AutoModelForSequenceClassification", args.verifier, "--verifier", mesh, device)
        verifier.eval()
        reranked = rerank_predictions(verifier, vtok, prompts, samples, voted, args, device, rank)
        del verifier
    # One row per question; the k sample texts stay out (they would dwarf everything else in predictions.jsonl).
    rows = [{"index": rank + world * i, "item_id": r["item_id"], "gold": r["answer_value"], **g, **v, **rr}
            for i, (r, g, v, rr) in enumerate(zip(mine, greedy, voted, reranked))]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if rank == 0:
        write_outputs(args, sorted((row for part in gathered for row in part), key=lambda row: row["index"]),
                      do_greedy, do_sample, do_rerank, world, time.time() - t0)
    dist.destroy_process_group()


def write_outputs(args, rows, do_greedy, do_sample, do_rerank, world, seconds):
    """predictions.jsonl, results.json and the printed table (rank 0)."""
    n = len(rows)
    accuracy = {}
    if do_greedy:
        accuracy["greedy"] = sum(r["greedy_correct"] for r in rows) / n
    if do_sample:
        accuracy["vote"] = sum(r["vote_correct"] for r in rows) / n
    if do_rerank:
        accuracy["rerank"] = sum(r["rerank_correct"] for r in rows) / n
    if do_sample:
        accuracy["pass@k"] = sum(r["pass_at_k"] for r in rows) / n
    results = {"accuracy": accuracy, "k": args.k if do_sample else None, "n": n, "mode": args.mode,
               "model": args.model, "verifier": args.verifier if do_rerank else None, "data": args.data,
               "split": args.split, "cot": args.cot, "temperature": args.temperature, "top_k": args.top_k,
               "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "world_size": world,
               "seconds": round(seconds, 1), "scoring": args.scoring, "reward": args.reward}
    if do_greedy:
        results["no_answer"] = {"greedy": sum(r["greedy_answer"] is None for r in rows) / n}
    if do_sample:
        results["sample_accuracy"] = sum(sum(r["sample_correct"]) for r in rows) / (n * args.k)
        results.setdefault("no_answer", {})["samples"] = sum(a is None for r in rows
                                                             for a in r["sample_answers"]) / (n * args.k)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
        for r in rows:
            r.pop("index")
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    labels = {"greedy": "greedy", "vote": f"vote@{args.k}", "rerank": f"rerank@{args.k}", "pass@k": f"pass@{args.k}"}
    print(f"\n{args.data} {args.split or '(the file)'} ({args.cot}), n={n}, model {args.model}, {args.scoring} "
          f"scoring, reward {args.reward}")
    for name, acc in accuracy.items():
        note = f"   (no answer: {100 * results['no_answer']['greedy']:.1f}%)" if name == "greedy" else ""
        print(f"  {labels[name]:<12} {100 * acc:6.2f}%{note}")
    if do_sample:
        print(f"  {'per sample':<12} {100 * results['sample_accuracy']:6.2f}%   (no answer: "
              f"{100 * results['no_answer']['samples']:.1f}%)")
    print(f"  {seconds:.0f} s on {world} process(es); {args.output_dir}/results.json")


# =====================================================================================================================
# infrastructure: skip on a first read
# First this stage's own helpers, then the helpers repeated across the stage files, kept identical (and in this
# order) by tests/test_copies.py.
# =====================================================================================================================

# ----------------------------------------------------------------------------- evaluate.py's own
# Checks, the memory check, the questions.

def check_args(args):
    """One line naming every missing flag, so `python evaluate.py --mode rerank` says all it needs at once; then each
    flag's range, the checkpoints (a --verifier that reranks: a one-label classifier, as rerank.py saves), the CoT
    kind they were trained on and the output folder; returns --reward."""
    reward_fn = reward.load_reward(args.reward)
    if args.scoring == "paper" and reward_fn is not reward.compute_rewards:
        raise SystemExit(f"error: --scoring paper judges answers by the paper code's rule, --reward {args.reward} by "
                         f"its own: pass one of them")
    missing = ([] if args.model else ["--model is required (a checkpoint folder written by sft.py or reft.py)"]) + \
        (["--mode rerank needs --verifier (a checkpoint folder written by rerank.py)"]
         if args.mode == "rerank" and not args.verifier else [])
    if missing:
        raise SystemExit("error: " + "; ".join(missing))
    if args.mode != "greedy" and args.k < 1:
        raise SystemExit(f"error: -k must be at least 1, not {args.k}")
    check_ranges(args, RANGES)
    check_checkpoint(args.model, "--model")
    if args.verifier:
        check_checkpoint(args.verifier, "--verifier")
    if args.verifier and args.mode in ("rerank", "all"):
        from transformers import AutoConfig
        try:
            num_labels = AutoConfig.from_pretrained(args.verifier).num_labels
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --verifier {args.verifier}: cannot read its config ({str(e).splitlines()[0]})")
        if num_labels != 1:
            raise SystemExit(f"error: --verifier {args.verifier}: not a verifier written by rerank.py (a classifier "
                             f"with one label)")
    resolve_cot(args, {flag: path for flag, path in (("--model", args.model), ("--verifier", args.verifier)) if path})
    if args.max_new_tokens == -1:
        n = checkpoint_params(args.model)
        args.max_new_tokens = 48 if n is not None and n < 50_000_000 else 700
    check_model_config(args.model, "--model", {"max_new_tokens": args.max_new_tokens})
    if not args.output_dir:
        name = os.path.normpath(args.model).removeprefix("runs" + os.sep).strip(os.sep).replace(os.sep, "_")
        args.output_dir = os.path.join("runs", "eval", name)
    check_output_dir(args.output_dir)
    return reward_fn


def memory_error(args, n_params, config, world, bf16, device_bytes, prompt_tokens):
    """None when this run fits `device_bytes` per device, else the error line (memory_advice): the policy's fp32
    weights (4 bytes per parameter), gathered, and the KV cache of --batch_size × (`prompt_tokens` + --max_new_tokens).
    The verifier loads after the policy is dropped and only scores (no KV cache, no gradients)."""
    def peak(a, world):
        return memory_estimate(n_params, config, world, bf16, 4, 0, 0, False,
                               a.batch_size * (prompt_tokens + a.max_new_tokens))["generation"]
    return memory_advice(args, peak, world, device_bytes, ["batch_size"])


def check_memory(args, records, world, device):
    """On a GPU, stop now when the run cannot fit (memory_error), not at an OOM after minutes of loading."""
    if (device_bytes := device_memory(device)) is None:
        return
    import transformers
    config = transformers.AutoConfig.from_pretrained(args.model)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    longest = max(len(reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot, sampling=True)))
                  for r in records)
    if error := memory_error(args, config_params(config), config, world, compute_dtype(device) == torch.bfloat16,
                             device_bytes, longest):
        raise SystemExit(error)


def load_questions(args):
    """The questions: --split of a prepared dataset or folder (test when not given), or a --data file as it is (then
    `split` null in results.json)."""
    if reward.is_data_file(args.data) and args.split:
        raise SystemExit(f"error: --data {args.data} is one file, evaluated as it is: drop --split {args.split} (or "
                         f"pass a prepared dataset or folder)")
    split = None if reward.is_data_file(args.data) else args.split or "test"
    try:
        records = reward.load_records(args.data, split, args.cot)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --data {args.data} --split {split}: cannot load it ({e})")
    args.split = split
    records = records[:args.limit] if args.limit > 0 else records
    if not records:
        raise SystemExit(f"error: --data {args.data}: no questions")
    return records


# ----------------------------------------------------------------------------- flags, checks and run folders

def parse_args(cls, argv=None):
    """The dataclass `cls` from the command line: `--name` per field (`-x` for one letter), never abbreviated; --help
    shows each field's docstring, read from the source (attribute docstrings do not exist at run time). With --resume,
    a flag not given takes the run's value: its args.json, updated by the last launch's `changed` (launches.jsonl)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n")[0], allow_abbrev=False,
                                argument_default=argparse.SUPPRESS)  # only the flags given come back: cls has the rest
    for f in dataclasses.fields(cls):
        kind = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
                {"choices": get_args(f.type)} if get_origin(f.type) is Literal else {"type": type(f.default)})
        shown = f" (default: {f.default})" if f.default != "" else ""  # empty: "not given", as its docstring says
        p.add_argument(f"--{f.name}", *([f"-{f.name}"] if len(f.name) == 1 else []), **kind,
                       help=(docs.get(f.name, "") + shown).replace("%", "%%"))
    given, run = vars(p.parse_args(argv)), {}
    if given.get("resume"):
        folder = given.get("output_dir", cls.output_dir)
        try:  # when this fails, plan_run says what is wrong
            with open(os.path.join(folder, "args.json")) as f:
                run = json.load(f)
            with open(os.path.join(folder, "launches.jsonl")) as f:
                last = [line for line in f if line.endswith("\n")][-1:]  # not a line cut by a kill
            # Each launch records every flag that differed from args.json then: the last one is the run's now.
            run.update({k: new for line in last for k, (_, new) in json.loads(line)["changed"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    # The run's flags stand for those not given; where the run is and whether to continue it are this launch's own.
    own = {f.name for f in dataclasses.fields(cls)} - {"output_dir", "resume", "overwrite"}
    return cls(**{**{k: v for k, v in run.items() if k in own}, **given})


def check_ranges(args, rules):
    """One error line for the first flag outside its range; `rules` holds (flag, test, the range in words)."""
    for name, ok, words in rules:
        value = getattr(args, name)
        if not ok(value):
            raise SystemExit(f"error: {'-' if len(name) == 1 else '--'}{name} must be {words}, not {value}")


def check_output_dir(path, flag="--output_dir"):
    """One error line, before any model loads, when the output folder is a file or cannot be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path}: a file of that name is in the way (it must be a folder)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path}: cannot be created ({parent} is not a writable folder)")


def check_checkpoint(path, flag, default=None):
    """One error line, before any model loads, for a checkpoint folder missing (the `default`, sft.py's warm-up: how
    to write it), without config.json (a run folder suggests its checkpoint), or with a safetensors file cut short or
    garbled (transformers would give a traceback)."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} (the default) not found: `python sft.py` writes it (its epoch "
                         f"--warmup_epoch, which --epochs must reach; with this run's --data and --cot), or pass "
                         f"{flag} PATH, a checkpoint written by sft.py or reft.py" if path == default else
                         f"error: {flag} {path!r}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        inside = sorted((d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "config.json"))),
                        key=lambda d: (d != "final", d != "best", d))
        hint = f"; did you mean {os.path.join(path, inside[0])}?" if inside else " (no config.json)"
        raise SystemExit(f"error: {flag} {path}: not a checkpoint folder{hint}")
    for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, name), "pt"):  # reads the header; the file must reach its last tensor
                pass
        except (OSError, SafetensorError) as e:
            raise SystemExit(f"error: {flag} {path}: {name} is damaged ({e}); write it again, or take another "
                             f"checkpoint")


def read_json(path):
    """The JSON object in the file `path`; {} when it is missing or holds none."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_model_config(path, flag, lengths, policy=True, positions=None):
    """One error line, before any model loads, from config.json: a verifier (*ForSequenceClassification) where a
    policy is needed, or a length of `lengths` ({flag: value}) over max_position_embeddings (else `positions`)."""
    config = read_json(os.path.join(path, "config.json"))
    classifier = [a for a in config.get("architectures") or [] if str(a).endswith("ForSequenceClassification")]
    if policy and classifier:
        raise SystemExit(f"error: {flag} {path}: a verifier ({classifier[0]}, as rerank.py writes), not a policy; pass "
                         f"a checkpoint written by sft.py or reft.py")
    maximum = config.get("max_position_embeddings", positions)
    for name, value in lengths.items():
        if isinstance(maximum, int) and value > maximum:
            raise SystemExit(f"error: --{name} {value} is over the model's maximum of {maximum} positions "
                             f"({flag} {path}); pass at most {maximum}")


def resolve_cot(args, checkpoints, fallback="nl"):
    """--cot auto takes the CoT kind named in the train_args.json of the checkpoints read ({flag: folder}), else
    `fallback`; another --cot, or checkpoints of two kinds, is one error line (a model scores ~0 on the other kind)."""
    found = {flag: read_json(os.path.join(path, "train_args.json")).get("cot") for flag, path in checkpoints.items()}
    found = {flag: cot for flag, cot in found.items() if cot in ("nl", "python")}
    if len(set(found.values())) > 1:
        raise SystemExit("error: the checkpoints were trained on different CoT kinds: " +
                         ", ".join(f"{flag} {checkpoints[flag]} on {cot}" for flag, cot in found.items()))
    flag = next(iter(found), None)
    if args.cot == "auto":
        args.cot = found[flag] if flag else fallback
    elif flag and args.cot != found[flag]:
        raise SystemExit(f"error: --cot {args.cot}, but {flag} {checkpoints[flag]} was trained on {found[flag]} CoTs "
                         f"(its train_args.json): drop --cot or pass --cot {found[flag]}")


# ----------------------------------------------------------------------------- distributed setup

def init_distributed():
    """One process group whether launched by torchrun or by plain python (a 1-process group)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # On CUDA the group is bound to this rank's GPU: NCCL and barrier() would otherwise guess the device.
    group = {"backend": "nccl" if cuda else "gloo", "device_id": device if cuda else None}
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **group)
        else:  # ranks wait in a collective while rank 0 alone reads or writes 27 GB (7B): past the 10-minute default
            dist.init_process_group(timeout=timedelta(hours=2), **group)
    return rank, world, device, init_device_mesh(device.type, (world,))


def compute_dtype(device):
    """bf16 on GPU (weights, gradients and optimizer states stay fp32), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fsdp_groups(model):
    """(decoder blocks, head groups) as shard() wraps them. The blocks are the classes `_no_split_modules` names, so
    any decoder-only family shards. The heads (the output embedding, with the input one when tied; reft's `v_head`;
    the verifier's `score`) compute in fp32: bf16 rounds a logit near 20 by up to 0.06 nats and a value near 1 by
    0.004, more than the ~1e-4 per-token KL rewards PPO has to resolve, and makes verifier scores tie."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]  # also once sharded
    lms = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None]
    heads = [(m.get_input_embeddings(), m.get_output_embeddings()) for m in lms]
    heads = [[inp, out] if inp.weight is out.weight else [out] for inp, out in heads]
    return blocks, heads + [[m] for name, m in model.named_children() if name in ("v_head", "score")]


def shard(model, mesh, dtype):
    """FSDP2: one group per decoder block computing in `dtype`, one fp32 group per head (fsdp_groups), the rest at
    the root; master weights and gradient reductions stay fp32."""
    blocks, heads = fsdp_groups(model)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    def fp32_inputs(module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for group in heads:
        fully_shard(group, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
        for module in group:  # FSDP2 before torch 2.13 casts the inputs of a group's first module alone: a tied
            module.register_forward_pre_hook(fp32_inputs)  # output embedding got the trunk's bf16 hidden states
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def without_empty_attention_rows(config):
    """`config`, set so that a fully masked query row attends to every key. Left padding gives each pad position such
    a row; transformers 5 hands it to SDPA, whose cuDNN kernel (torch's pick on H100/H200) returns NaN there, and the
    NaN reaches the real tokens and every gradient. No real token attends to a pad key: real tokens are unchanged."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, **kwargs):
        allowed = sdpa_mask(*args, **kwargs)  # (B, 1, Q, K) bool, or None for a plain causal mask (no padding)
        return None if allowed is None else allowed | ~allowed.any(-1, keepdim=True)
    # SDPA under its own name: transformers picks the mask function by the attention implementation's name
    AttentionInterface.register("sdpa_no_empty_rows", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_no_empty_rows", mask)
    if config._attn_implementation == "sdpa":
        config._attn_implementation = "sdpa_no_empty_rows"
    return config


def load_sharded(load, make, mesh, device):
    """The model `load()` builds on rank 0 alone (a 7B model in host memory once, not once per rank), sharded: each
    rank builds `make(config)` on the meta device, shards it and receives its shards from rank 0. A SystemExit in
    load() (a bad checkpoint) reaches every rank."""
    full, error = None, None
    if dist.get_rank() == 0:
        try:
            full = load()
        except SystemExit as e:
            error = str(e)
    msg = [error, getattr(full, "config", None), getattr(full, "generation_config", None)]
    dist.broadcast_object_list(msg, src=0)
    error, config, generation_config = msg
    if error is not None:
        raise SystemExit(error)
    with torch.device("meta"):
        model = make(without_empty_attention_rows(config))
    if generation_config is not None:  # the checkpoint's generation_config.json, which from_config does not read
        model.generation_config = generation_config
    shard(model, mesh, compute_dtype(device))
    model.to_empty(device=device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, b in model.named_buffers():  # outside the state dict when non-persistent (rotary frequencies)
            dist.broadcast(b.copy_(full.get_buffer(name)) if full is not None else b, src=0)
    return model


@contextmanager
def gathered_for_generation(model):
    """The full parameters gathered once for a whole generation (a critic, which does not generate, stays sharded):
    otherwise FSDP2 all-gathers every block for every generated token, and ranks whose sequences end at different
    lengths wait on each other."""
    mods = [m for name, m in model.named_modules() if isinstance(m, FSDPModule) and not name.startswith("critic")]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:  # FSDP2's defaults again: only the root keeps its parameters from forward to backward
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()
        # FSDP2 records each forward for backward prefetching and only a backward clears the record: without this,
        # inference-only loops would grow it by an entry per block and generated token (torch < 2.13 has no reset:
        # the lent GPU machine's torch 2.11)
        if hasattr(model, "reset_iter_state"):
            model.reset_iter_state()


# ----------------------------------------------------------------------------- memory before loading, and loading

def device_memory(device):
    """The device's memory in bytes on CUDA; None elsewhere (no memory check on the CPU)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def config_params(config):
    """The parameter count of a causal LM of `config`, built on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def memory_estimate(n_params, config, world, bf16, state_bytes, grad_bytes, train_tokens, gradient_checkpointing,
                    gen_tokens):
    """Estimated peak bytes per device of {"training", "generation"} (0 for a phase not run), from the config alone:
    docs/scaling.md's table "Memory per GPU". `state_bytes` and `grad_bytes` per parameter are sharded over `world`;
    generation holds a KV cache of `gen_tokens` (sequences × (prompt + new tokens)), training a micro-batch of
    `train_tokens`. Not counted: the CUDA context, NCCL's buffers, fragmentation (a few GB)."""
    c = 2 if bf16 else 4  # bytes per gathered parameter
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    kv_width = hidden // heads * (getattr(config, "num_key_value_heads", None) or heads)
    head = config.vocab_size * hidden  # the LM head, gathered in fp32 (fsdp_groups)
    resident = state_bytes * n_params / world
    generation = training = 0
    if gen_tokens:  # the model gathered once, and K and V of every layer for every token
        generation = resident + c * (n_params - head) + 4 * head + gen_tokens * 2 * layers * kv_width * c
    if train_tokens:  # activations: 34 · tokens · hidden bytes per layer in 16 bits (Korthikanti et al. 2022, eq. 1
        # without the attention scores, which SDPA never stores); with checkpointing, layer inputs and one layer
        layer = 34 * train_tokens * hidden * c / 2
        activations = layers * train_tokens * hidden * c + layer if gradient_checkpointing else layers * layer
        # + two blocks gathered (computing, prefetched), one block's fp32 gradient, ~3 fp32 logits copies
        training = (resident + grad_bytes * n_params / world + (2 * c + 4) * n_params / layers + 4 * head
                    + 3 * 4 * train_tokens * config.vocab_size + activations)
    return {"training": training, "generation": generation}


def memory_advice(args, peak, world, device_bytes, batch_flags):
    """None when peak(args, world), the estimated bytes per device, fits `device_bytes`; else the error line, naming
    each single change that fits: the fewest doublings of the processes (up to 1024×), --gradient_checkpointing where
    the stage has it, the largest smaller value of one of `batch_flags`."""
    need = peak(args, world)
    if need <= device_bytes:
        return None

    def fits(world=world, **flags):
        return peak(dataclasses.replace(args, **flags), world) <= device_bytes
    changes = [next((f"{world * 2 ** i} processes" for i in range(1, 11) if fits(world * 2 ** i)), "")]
    if getattr(args, "gradient_checkpointing", True) is False and fits(gradient_checkpointing=True):
        changes.append("--gradient_checkpointing")
    for flag in batch_flags:
        changes.append(next((f"--{flag} {b}" for b in range(getattr(args, flag) - 1, 0, -1) if fits(**{flag: b})), ""))
    changes = " or ".join(filter(None, changes))
    return (f"error: the estimated peak memory is {need / 1e9:.3g} GB per device on {world} process(es) "
            f"(docs/scaling.md), more than this device's {device_bytes / 1e9:.3g} GB; "
            + (f"would fit: {changes}" if changes else "no single change fits (more processes, "
               "--gradient_checkpointing, smaller batches): combine them, or use devices with more memory"))


def checkpoint_params(path):
    """The parameter count of a local HF checkpoint from its safetensors headers (no weights read), on which the
    defaults of flags left at -1 depend; None for a hub id or a folder without safetensors."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = set(json.load(f)["weight_map"].values())
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = {"model.safetensors"}
    else:
        return None
    headers = [safe_open(os.path.join(path, name), "pt") for name in files]
    return sum(math.prod(f.get_slice(key).get_shape()) for f in headers for key in f.keys())


def num_calls(n_items, batch_size, device):
    """Batches needed by the busiest rank: every rank makes that many (collective) calls, padding with dummies."""
    t = torch.tensor([math.ceil(n_items / batch_size)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def load(cls_name, path, flag, mesh, device, wrap=None, **kw):
    """(model, tokenizer) from an HF folder, sharded over the ranks (rank 0 reads the weights: load_sharded); one
    error line when it cannot be loaded. `wrap(model)`, if given, changes the model before it is sharded, alike on rank
    0's loaded one and on the other ranks' meta one (rerank.py's LoRA layers)."""
    import transformers
    if not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path!r}: no such checkpoint folder")

    def loaded(from_pretrained, **options):
        try:
            return from_pretrained(path, **options)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {flag} {path}: cannot load a checkpoint from this folder "
                             f"({str(e).splitlines()[0]})")
    tok = loaded(transformers.AutoTokenizer.from_pretrained)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise SystemExit(f"error: {flag} {path}: the tokenizer needs a pad token distinct from EOS (as sft.py makes)")
    cls, wrap = getattr(transformers, cls_name), wrap or (lambda model: model)

    def read():
        model = loaded(cls.from_pretrained, dtype=torch.float32, **kw)
        model.config.pad_token_id = tok.pad_token_id  # the verifier head reads the last token that is not this
        return wrap(model)
    return load_sharded(read, lambda config: wrap(cls.from_config(config, dtype=torch.float32)), mesh, device), tok


if __name__ == "__main__":
    main(parse_args(Args))
