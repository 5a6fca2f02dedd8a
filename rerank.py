"""Stage 3 of ReFT's evaluation: train a verifier (reward model) that scores sampled chains of thought for reranking.

Reading guide: the paper's reward model for reranking (its Rerank@k, Table 4), each piece to the code, in the order
main() runs it; below the "infrastructure" marker (flags, loading, samples files, saving, resume state) can wait.
evaluate.py --mode rerank uses the verifier.
  k samples per training question from the warm-up    sample (seeded per question), dedup_rows
  labels: correct when the reward gives 1.0           sample → reward.extract_answers, reward.score_completions
  the verifier: the LM trunk + a scalar head          load("AutoModelForSequenceClassification") in train
  its input: prompt + CoT, cut to --max_length        encode, collate (right padding; the head reads the last token)
  its loss: binary cross-entropy on the label         verifier_step (BCE with logits, the mean over the global batch)
  a step: --batch_size over processes, micro-batches  check_samples (per process), epoch_batch, verifier_step
  held-out questions: accuracy, AUC, rerank@k         split_by_question, score, auc, holdout_metrics
  the schedule: linear warm-up, then linear decay     lr_lambda
  LoRA (--lora_rank): W + (α/r)·B A on the trunk's    add_lora (below the marker: reft.py's), train, save_verifier
    projections, the score head trained in full

1. Sampling: k CoTs per training question from a policy checkpoint (--model; the paper samples 100 per
   question from the warm-up SFT checkpoint), each labelled correct/incorrect through reward.py (or --reward), exact
   duplicates removed per question, written to {output_dir}/samples.jsonl as rows
   {item_id, question, completion, answer, correct, distinct}. A re-run skips the questions already whole in the
   file (one a kill cut is sampled again, with the same samples: they are seeded per question);
   --samples FILE skips sampling altogether. For the python CoT the prompt ends with the function header
   (reward.build_prompt(q, "python", sampling=True)) and the completion is the body.
2. Training: the LM trunk from --init (default --model; the paper inits from the best SFT or ReFT checkpoint)
   with a scalar head on the hidden state of the last non-pad token, trained with binary cross-entropy on
   `build_prompt(q, cot, sampling=True) + completion` (reward.encode_prompt: BOS first where the tokenizer puts
   one, no EOS; cut at --max_length). A held-out part of the
   questions (--holdout_fraction) gives accuracy, AUC and rerank accuracy at every epoch. The resume state is
   written at each epoch end (and every --save_steps); --resume continues a killed training from it.

The verifier is saved as a LlamaForSequenceClassification with num_labels=1 (`score` = Linear(hidden, 1, bias=False)
on the rightmost non-pad token) in {output_dir}/final; its tokenizer's model_max_length is --max_length. Load it:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained("runs/rerank/final")
    tok = AutoTokenizer.from_pretrained("runs/rerank/final"); tok.padding_side = "right"
    ids = [reward.encode_prompt(tok, t)[:tok.model_max_length] for t in texts]  # BOS first where tok has one
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    p_correct = torch.sigmoid(model(**enc).logits[:, 0])
(this is what evaluate.py --mode rerank does).

Run it (CPU, the tiny model; the defaults sample 8 CoTs per question from sft.py's runs/sft/warmup and start the
verifier from runs/sft/best beside it, as the quickstart does):
    python rerank.py                                                       # -> runs/rerank/final
    python rerank.py --init runs/reft/best --samples runs/rerank/samples.jsonl --output_dir runs/rerank_reft
    torchrun --standalone --nproc_per_node 2 rerank.py --output_dir runs/rerank2
The paper's setting (8 GPUs, GSM8K P-CoT, 100 samples from the warm-up, trunk from the best SFT checkpoint):
    torchrun --nproc_per_node 8 rerank.py --model runs/sft7b/warmup --init runs/sft7b/best --data gsm8k_reft \\
        --cot python --num_samples 100 --max_new_tokens 700 --gen_batch_size 50 --lr 1e-6 --epochs 3 --batch_size 48 \\
        --micro_batch_size 6 --max_length 700

Differences from the paper's code (train_reward_model.py), on purpose:
- Loss: BCE on one logit instead of 2-class cross-entropy. Softmax over two logits is a sigmoid of their
  difference, so the models are the same up to a redundant parameter vector; the score is P(correct) both ways.
- CPU defaults: lr 1e-4 (paper 1e-6 for 7B models: a tiny model with a fresh head needs much more), 3 epochs
  (same), batch 32 (paper 24-48), 8 samples per question (paper 100), --max_length 256 (paper 700).
- Sampling uses pure sampling (top_k 0, top_p 1) at temperature 1, the distribution ReFT's rollouts use; the
  paper's sampling.py left transformers' default top_k=50 (pass --top_k 50 for that).
- The held-out questions come from the training split; the paper picked the best epoch on the test set.
One code path: plain `python rerank.py` is a 1-process group, `torchrun` gives N, the models are FSDP2-sharded.
"""
import argparse
import ast
import collections
import dataclasses
import errno
import gc
import hashlib
import inspect
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args, get_origin

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import (LogitsProcessor, LogitsProcessorList, PreTrainedModel, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

import reward


@dataclass
class Args:
    model: str = "runs/sft/warmup"
    """policy checkpoint to sample from (paper: the warm-up SFT checkpoint, sft.py's {output_dir}/warmup); not needed
    with --samples and --init. Its size picks the defaults of the flags at -1 below (RECIPES)"""
    data: str = "minigsm"
    """a prepared dataset name under data/ or a .jsonl/.json file of {item_id, question, answer_value}"""
    split: str = "train"
    """split whose questions are sampled (paper: train)"""
    cot: Literal["auto", "nl", "python"] = "auto"
    """chain-of-thought kind: `nl` or `python`; `auto` = the kind --model and --init were trained on (their
    train_args.json)"""
    output_dir: str = "runs/rerank"
    """where samples.jsonl, metrics.jsonl and the verifier (final/) go"""
    num_samples: int = -1
    """k: samples per question; -1 = by model size: 8 small (the quickstart's), 100 paper"""
    samples: str = ""
    """an existing samples JSONL ({item_id, question, completion, correct}); skips sampling; not given: --model samples
    the --split questions into {output_dir}/samples.jsonl"""
    gold_samples: bool = False
    """also train on each sampled question's gold CoT from --data, as a correct sample: a verifier then sees both kinds
    even from a sampler that gets nothing right (the quickstart's --fast, whose warm-up writes no whole program; the
    paper trains on samples only). `--resume --gold_samples` adds them to the samples a run drew, drawing none again"""
    reward: str = "reward:compute_rewards"
    """labels the samples: correct when this `module:function` gives 1.0 (partial_reward=False), a callable with
    reward.compute_rewards' signature (module from sys.path or the current directory)"""
    init: str = ""
    """checkpoint the verifier trunk starts from (paper: the best SFT or ReFT checkpoint); empty = the best/ beside
    --model when --model is sft.py's warmup/ (the SFT baseline of the same run), else --model"""
    epochs: int = 3
    """passes over the training samples (paper: 3)"""
    max_steps: int = -1
    """stop the verifier training after this many optimizer steps (overrides epochs when > 0)"""
    lr: float = -1.0
    """peak learning rate; -1 = by model size: 1e-4 small, 1e-6 paper, × LORA_LR_SCALE (10) with --lora_rank; 0 trains
    at 0"""
    warmup_ratio: float = 0.1
    """fraction of the steps spent on linear warm-up, then linear decay to 0 (paper: 0.1)"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0)"""
    lora_rank: int = 0
    """train LoRA adapters of this rank (Hu et al. 2022) on the verifier trunk's attention and MLP projections
    (LORA_TARGETS), the trunk frozen (in bf16 on GPU), and the fresh `score` head in full: a 7B verifier on one GPU.
    final/ stays a merged AutoModelForSequenceClassification, with the adapters and the head in peft's format in
    final/adapter/. 0 = full fine-tuning (paper)"""
    lora_alpha: float = 32.0
    """LoRA's α: the update B A is scaled by α / --lora_rank (verl's one-GPU 7B recipe: rank 32, α 32)"""
    batch_size: int = 32
    """global batch: samples per optimizer step summed over processes and accumulation (paper: 24)"""
    micro_batch_size: int = -1
    """samples per forward/backward on one process; batch_size / (micro_batch_size * world) = accumulation;
    -1 = batch_size / world (no accumulation), so the same command runs at any number of processes"""
    max_length: int = -1
    """verifier input (prompt + completion) is cut to this many tokens; -1 = by model size: 256 small, 700 paper"""
    holdout_fraction: float = 0.1
    """fraction of the questions held out (all their samples) for per-epoch accuracy and AUC"""
    temperature: float = 1.0
    """sampling temperature (paper: 1.0)"""
    top_k: int = 0
    """top-k filter of the sampling, 0 = off (the paper's sampling.py used transformers' default 50)"""
    top_p: float = 1.0
    """nucleus filter of the sampling, 1 = off"""
    max_new_tokens: int = -1
    """generation budget per sample; -1 = by model size: 48 small (minigsm CoTs are ~20 tokens), 700 paper"""
    gen_batch_size: int = 64
    """sequences per generate() call on one process (also the scoring batch of the held-out evaluation)"""
    limit: int = -1
    """sample only the first N questions (-1: all)"""
    log_every: int = 10
    """print a one-line summary of the metrics every this many steps (0: never)"""
    seed: int = 42
    """seed for sampling (with the question's index: a question's samples depend on nothing else), the head init,
    the held-out split and the data order"""
    resume: bool = False
    """continue the run in --output_dir, with the flags it last ran with (pass only --output_dir and --resume; a
    flag given too must be one of MAY_CHANGE, or equal the run's): the sampling where samples.jsonl ends (a question
    cut by a kill is sampled again), the verifier training from its newest intact resume state checkpoint-STEP/
    (model, optimizer, scheduler, RNG, data position); with neither there, start afresh"""
    overwrite: bool = False
    """start over in an --output_dir that holds a run (samples included), removing it (without --resume or
    --overwrite such a folder is refused)"""
    save_steps: int = 0
    """also write the training's resume state every this many steps (0: only at each epoch end and the last step). It
    holds fp32 weights and AdamW's two moments, 12 bytes per parameter: 81 GB for a 7B model"""


# Flags a resumed run may change: how long, how often, in how much memory (plan_run). --limit may grow to sample more
# questions; the samples already drawn stay. --gold_samples may be added to samples drawn (check_gold_samples_change).
MAY_CHANGE = ("output_dir", "resume", "overwrite", "epochs", "max_steps", "save_steps", "log_every", "micro_batch_size",
              "gen_batch_size", "limit", "gold_samples")
SIZED = "-1 (by model size) or "
RANGES = [("num_samples", lambda v: v == -1 or v >= 1, SIZED + "at least 1"), ("epochs", lambda v: v >= 1, "at least 1"),
          ("lr", lambda v: v == -1 or v >= 0, SIZED + "at least 0"),
          ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"), ("weight_decay", lambda v: v >= 0, "at least 0"),
          ("batch_size", lambda v: v >= 1, "at least 1"),
          ("micro_batch_size", lambda v: v == -1 or v >= 1, "-1 (automatic) or at least 1"),
          ("max_length", lambda v: v == -1 or v >= 2, SIZED + "at least 2"),
          ("holdout_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
          ("temperature", lambda v: v > 0, "above 0"), ("top_k", lambda v: v >= 0, "at least 0"),
          ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"), ("max_new_tokens", lambda v: v == -1 or v >= 1, SIZED + "at least 1"),
          ("gen_batch_size", lambda v: v >= 1, "at least 1"), ("limit", lambda v: v == -1 or v >= 1,
                                                                 "-1 (all) or at least 1"),
          ("log_every", lambda v: v >= 0, "at least 0"), ("save_steps", lambda v: v >= 0, "at least 0"),
          ("lora_rank", lambda v: v >= 0, "at least 0 (0: full fine-tuning)"),
          ("lora_alpha", lambda v: v > 0, "above 0")]

# What a flag left at -1 becomes, by the size of the verifier's trunk (--init, else --model): the paper's values for a
# pretrained model (50 M parameters or more, or a hub id), the quickstart's for the tiny one trained from scratch.
RECIPES = {"small": dict(num_samples=8, lr=1e-4, max_length=256, max_new_tokens=48),
           "paper": dict(num_samples=100, lr=1e-6, max_length=700, max_new_tokens=700)}
SMALL_MODEL = 50_000_000
# With --lora_rank, an --lr left at -1 is the recipe's × this: LoRA's few parameters need a larger step (verl's LoRA
# guide advises about 10× full fine-tuning's rate; at full fine-tuning's, users report LoRA learning little, TRL #2872).
LORA_LR_SCALE = 10


# ----------------------------------------------------------------------------- sampling

def dedup_rows(records, texts, answers, correct, k):
    """One row per distinct completion of each question (texts are grouped k per record, in order). Each row says
    how many rows its question has (`distinct`): a question is whole in the file only with that many
    (drop_partial_questions)."""
    rows = []
    for i, r in enumerate(records):
        first = len(rows)
        seen = set()
        for j in range(i * k, (i + 1) * k):
            if texts[j] not in seen:
                seen.add(texts[j])
                rows.append({"item_id": r["item_id"], "question": r["question"], "completion": texts[j],
                             "answer": answers[j], "correct": correct[j]})
        for row in rows[first:]:
            row["distinct"] = len(seen)
    return rows


class QuestionSampler(LogitsProcessor):
    """generate()'s sampling step, torch.multinomial of the softmax of the warped scores, with each question's rows
    drawing from the question's own generator, as generate(do_sample=True) draws them from the global one after
    torch.manual_seed: a question's samples are those of a call of its own, whatever else shares the call. Returns
    scores that are -inf but at the drawn token, for generate()'s greedy argmax. `sizes`: each question's rows, in
    order."""

    def __init__(self, sizes, generators):
        self.sizes, self.generators = sizes, generators

    def __call__(self, input_ids, scores):
        drawn = torch.cat([torch.multinomial(torch.softmax(s, dim=-1), 1, generator=g)
                           for s, g in zip(scores.split(self.sizes), self.generators)])  # (B, 1)
        return torch.full_like(scores, -math.inf).scatter_(1, drawn, 0.0)


def draw(model, tok, prompts, sizes, generators, args, device):
    """One generate() call: sizes[j] samples of prompts[j] (token ids), drawn from generators[j]; their texts in
    order (none for none: a rank done early). The warpers are generate()'s for do_sample=True, in its order and on its
    conditions."""
    if not prompts:
        return []
    enc = tok.pad({"input_ids": [p for p, n in zip(prompts, sizes) for _ in range(n)]}, return_tensors="pt").to(device)
    warpers = [w(v) for w, v, on in ((TemperatureLogitsWarper, args.temperature, args.temperature != 1.0),
                                     (TopKLogitsWarper, args.top_k, args.top_k != 0),
                                     (TopPLogitsWarper, args.top_p, args.top_p < 1.0)) if on]
    # synced_gpus=False: the parameters are gathered, so a rank that is done need not keep stepping for the others;
    # transformers' default under FSDP does, and then crashes on a cache one token short.
    out = model.generate(**enc, do_sample=False, use_cache=True, synced_gpus=False, max_new_tokens=args.max_new_tokens,
                         logits_processor=LogitsProcessorList([*warpers, QuestionSampler(sizes, generators)]),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, enc.input_ids.size(1):], skip_special_tokens=True)


@torch.no_grad()
def sample(args, path, rank, world, device, mesh, log, reward_fn):
    """Append k samples per not-yet-sampled question to `path`, labelled by `reward_fn` and deduplicated (rank 0
    writes). A question's samples come from a generator seeded by (seed, the question's index) alone (QuestionSampler:
    up to --gen_batch_size rows of many questions share a generate() call) and the rows are written in the questions'
    order, so that any number of processes, and a sampling killed and run again, write the same file."""
    records = reward.load_records(args.data, args.split, args.cot)
    records = records[:args.limit] if args.limit > 0 else records
    if rank == 0 and os.path.exists(path):
        drop_partial_questions(path)
    dist.barrier()
    done = {r["item_id"] for r in read_samples(path)} if os.path.exists(path) else set()
    todo = [(i, r) for i, r in enumerate(records) if r["item_id"] not in done]
    position = {r["item_id"]: i for i, r in todo}
    log(f"sampling: {len(records)} questions, {len(records) - len(todo)} already in {path}, {len(todo)} to do, "
        f"k={args.num_samples}")
    if not todo:
        return
    model, tok = load("AutoModelForCausalLM", args.model, "--model", mesh, device)
    model.eval()
    tok.padding_side = "left"
    k, bs = args.num_samples, args.gen_batch_size
    mine = todo[rank::world]
    per_group = max(1, bs // k)  # questions sampled in one call, labelled and written together
    bar = tqdm(total=len(todo), desc="sampling", disable=rank != 0)
    with gathered_for_generation(model):
        for g in range(num_calls(len(mine), per_group, device)):
            indexed = mine[g * per_group:(g + 1) * per_group]
            group = [r for _, r in indexed]
            prompts = [reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot, sampling=True))
                       for r in group]
            # 1_000_003: a prime above any split's size
            generators = [torch.Generator(device).manual_seed(args.seed * 1_000_003 + i) for i, _ in indexed]
            texts = []
            for c in range(0, k, bs):  # k ≤ bs: one call; else one question, bs rows a call, one stream throughout
                texts += draw(model, tok, prompts, [min(bs, k - c)] * len(group), generators, args, device)
            golds = [r for r in group for _ in range(k)]
            answers = reward.extract_answers(texts, args.cot, [r["question"] for r in golds])
            # Correct exactly when --reward (partial_reward=False) gives 1.0; the answer is kept too.
            correct = [s == 1.0 for s in reward.score_completions(reward_fn, texts, answers, golds, args.cot, False)]
            parts = [None] * world if rank == 0 else None
            dist.gather_object((len(group), dedup_rows(group, texts, answers, correct, k)), parts, dst=0)
            if rank == 0:
                # The ranks' groups together are the next questions of `todo`: in their order, the file is the
                # same at any number of processes.
                rows = sorted((row for _, part in parts for row in part), key=lambda row: position[row["item_id"]])
                with stop_if_disk_full(path), open(path, "a") as f:  # one write per group; a cut one is redone
                    f.write("".join(json.dumps(row) + "\n" for row in rows))
                bar.update(sum(n for n, _ in parts))
    bar.close()
    dist.barrier()


def with_gold(rows, records, cot):
    """The sample rows plus, for each question among them, its gold CoT as a correct row, written as a sample of it
    would be: the completion after the sampling prompt (for python CoTs, the program's body after its header). A gold
    program whose header is not the prompt's is left out."""
    by_id, added = {r["item_id"]: r for r in records}, []
    for item_id in dict.fromkeys(r["item_id"] for r in rows):
        record = by_id.get(item_id)
        if record is None:
            raise SystemExit(f"error: --gold_samples: question {item_id} of the samples is not in --data")
        target, header = reward.build_target(record, cot), reward.program_header(record["question"])
        if cot == "python" and not target.startswith(header):
            continue
        added.append({"item_id": item_id, "question": record["question"], "correct": True,
                      "completion": target[len(header):] if cot == "python" else target})
    return rows + added


def check_gold_samples_change(args):
    """On --resume, --gold_samples may differ from the run's (MAY_CHANGE) while the verifier's training has not begun:
    the gold CoTs then join the samples already drawn, and nothing is sampled again (the way out of "all training
    samples are wrong"). Once a resume state of the training exists, it was trained on one set of rows: the flag
    must be as the run's last launch had it (launches.jsonl, else args.json)."""
    if find_resume_state(args.output_dir) is None:
        return
    with open(os.path.join(args.output_dir, "args.json")) as f:
        last = json.load(f).get("gold_samples", False)
    try:
        with open(os.path.join(args.output_dir, "launches.jsonl")) as f:
            launches = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        launches = []
    last = launches[-1].get("changed", {}).get("gold_samples", [last, last])[1] if launches else last
    if args.gold_samples != last:
        raise SystemExit(f"error: --resume in {args.output_dir}: the verifier's training began with --gold_samples "
                         f"{last}, and its resume state continues only on the same samples: pass "
                         f"{'--gold_samples' if last else '--no-gold_samples'}, or --overwrite to start over")


def samples_summary(rows):
    """The log line on the samples: how many, the fraction correct and the fraction without an extractable answer
    (`answer` None), so that "unparseable" is not mixed with "wrong" (not known for a --samples file whose rows
    have no `answer`)."""
    no_answer = (f", {sum(r['answer'] is None for r in rows) / len(rows):.1%} with no answer"
                 if all("answer" in r for r in rows) else "")
    return (f"samples: {len(rows)} distinct from {len({r['item_id'] for r in rows})} questions, "
            f"{sum(bool(r['correct']) for r in rows) / len(rows):.1%} correct{no_answer}")


# ----------------------------------------------------------------------------- verifier training

def split_by_question(rows, fraction, seed):
    """(train rows, held-out rows): a seeded random `fraction` of the questions, with all their samples."""
    ids = list(dict.fromkeys(r["item_id"] for r in rows))
    n_held = min(max(1, round(fraction * len(ids))), len(ids) - 1) if fraction > 0 else 0
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {ids[i] for i in perm[:n_held]}
    return [r for r in rows if r["item_id"] not in held], [r for r in rows if r["item_id"] in held]


def encode(tok, rows, cot, max_length):
    """[(input_ids, label)] for `build_prompt(q, cot, sampling=True) + completion`, cut to max_length; and the
    number of inputs that were cut."""
    texts = [reward.build_prompt(r["question"], cot, sampling=True) + r["completion"] for r in rows]
    ids = [reward.encode_prompt(tok, t) for t in texts]
    return [(x[:max_length], float(r["correct"])) for x, r in zip(ids, rows)], sum(len(x) > max_length for x in ids)


def collate(examples, pad_id):
    """Right-pad (input_ids, label) pairs: input_ids and attention_mask (B, T), labels (B,)."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
    return input_ids, (input_ids != pad_id).long(), torch.tensor([y for _, y in examples])


def auc(scores, labels):
    """Area under the ROC curve from ranks (Mann-Whitney U; tied scores share their mean rank); None if one class."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    mean_rank, start = {}, 0
    for value, group in itertools.groupby(sorted(scores)):
        n = len(list(group))
        mean_rank[value], start = start + (n + 1) / 2, start + n
    return (sum(mean_rank[s] for s, y in zip(scores, labels) if y) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@torch.no_grad()
def score(model, examples, batch_size, pad_id, rank, world, device):
    """Logits of all examples, in order, on every rank (each rank scores every world-th example)."""
    model.eval()
    mine, out = examples[rank::world], []
    for b in range(num_calls(len(mine), batch_size, device)):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        input_ids, attn, _ = collate(chunk or examples[:1], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attn.to(device)).logits[:, 0]  # (B,)
        if chunk:
            out += logits.float().tolist()
    model.train()
    parts = [None] * world
    dist.all_gather_object(parts, out)
    merged = [0.0] * len(examples)
    for r, part in enumerate(parts):
        merged[r::world] = part
    return merged


def holdout_metrics(logits, rows):
    """Accuracy at P(correct) = 0.5, AUC, and per question: rerank accuracy (best-scored sample with an answer;
    rows without an `answer` field count as having one) and the fraction with any correct sample."""
    labels = [bool(r["correct"]) for r in rows]
    by_q = {}
    for s, r in zip(logits, rows):
        by_q.setdefault(r["item_id"], []).append((s, r))
    chosen = []
    for cands in by_q.values():
        with_answer = [(s, r) for s, r in cands if r.get("answer", "") is not None]
        chosen.append(bool(max(with_answer, key=lambda c: c[0])[1]["correct"]) if with_answer else False)
    return {"holdout_accuracy": sum((s > 0) == y for s, y in zip(logits, labels)) / len(rows),
            "holdout_auc": auc(logits, labels), "holdout_positive_rate": sum(labels) / len(rows),
            "holdout_rerank_accuracy": sum(chosen) / len(chosen),
            "holdout_pass_at_k": sum(any(r["correct"] for _, r in c) for c in by_q.values()) / len(by_q)}


def verifier_step(model, opt, sched, batch, micro, accum, world, rank, pad_id, device, step):
    """One optimizer step of BCE on a global batch: (its mean loss, its accuracy at P = 0.5, the gradient norm). Each
    process takes every world-th sample, in `accum` micro-batches of `micro`."""
    mine, loss_sum, n_right = batch[rank::world], 0.0, 0
    for m in range(accum):
        input_ids, attn, labels = (t.to(device) for t in collate(mine[m * micro:(m + 1) * micro], pad_id))
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, 0].float()  # (B,)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        # Mean over the global batch; FSDP averages gradients over ranks, hence the factor `world`.
        (bce * world / len(batch)).backward()
        loss_sum += bce.item()
        n_right += int(((logits > 0).float() == labels).sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not torch.isfinite(grad_norm):  # every rank sees the same norm: every rank stops, before AdamW writes NaN
        raise SystemExit(f"error: step {step + 1}: the gradient norm is not finite, NaN or inf in the loss, and "
                         f"the step would put NaN into every weight. Likely causes: fully masked attention rows "
                         f"on GPU, a learning rate too high, bf16 overflow")
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    stats = torch.tensor([loss_sum, n_right], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    return stats[0].item() / len(batch), stats[1].item() / len(batch), grad_norm.item()


def train(args, rows, resuming, rank, world, device, mesh, log):
    """The verifier: --init's trunk with a fresh scalar head, trained on the samples of all but the held-out
    questions, evaluated on those at every epoch's end, saved to {output_dir}/final."""
    train_rows, held_rows = split_by_question(rows, args.holdout_fraction, args.seed)
    init = args.init or args.model
    torch.manual_seed(args.seed)  # the fresh head's (and LoRA's) init: rank 0 draws it, load_sharded sends it around

    def lora(model):  # the same LoRA layers on rank 0's loaded verifier and on the other ranks' meta one
        return add_lora(model, args.lora_rank, args.lora_alpha, compute_dtype(device))
    model, tok = load("AutoModelForSequenceClassification", init, "--init" if args.init else "--model", mesh, device,
                      wrap=lora if args.lora_rank else None, num_labels=1)
    examples, cut = encode(tok, train_rows, args.cot, args.max_length)
    held, held_cut = encode(tok, held_rows, args.cot, args.max_length)
    log(f"verifier data: {len(train_rows)} train samples ({sum(r['correct'] for r in train_rows)} correct), "
        f"{len(held_rows)} held out from {len({r['item_id'] for r in held_rows})} questions; "
        f"{cut + held_cut} inputs cut to --max_length {args.max_length}")
    steps_per_epoch = len(examples) // args.batch_size
    accum = args.batch_size // (args.micro_batch_size * world)
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs
    model.config.use_cache = False
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or (LoRA) the adapters and the score head
    log(f"verifier: {n_params:,} params from {init}"
        + (f", {sum(p.numel() for p in trained):,} trained (LoRA rank {args.lora_rank})" if args.lora_rank else "")
        + f", lr {args.lr:g}")
    check_disk_space(args.output_dir, sum(p.numel() for p in trained))
    opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(args.warmup_ratio * total_steps), total_steps))
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")

    # Accuracy and AUC on held-out samples of one kind say nothing (an untrained head scores 1.0 or 0.0 on them).
    if held_rows and len({bool(r["correct"]) for r in held_rows}) < 2:
        log(f"held-out samples: all {len(held_rows)} {'correct' if held_rows[0]['correct'] else 'wrong'}, so no "
            f"holdout metrics (they need both kinds)")
        held = []

    def write(row, evaluate):
        if evaluate and held:
            row.update(holdout_metrics(score(model, held, args.gen_batch_size, tok.pad_token_id, rank, world,
                                             device), held_rows))
            log(f"epoch {row['epoch']:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                      if k.startswith("holdout") and v is not None))
        if rank == 0:
            append_metrics(metrics_path, row)

    start = 0
    if resuming and find_resume_state(args.output_dir) is not None:
        state = load_resume_state(model, opt, args.output_dir)
        start = state["step"]
        sched.load_state_dict(state["sched"])
        if rank == 0:
            trim_metrics(metrics_path, start)
    else:
        if rank == 0:
            open(metrics_path, "w").close()
        write({"step": 0, "epoch": 0}, evaluate=True)  # the untrained head: chance level
    bar = tqdm(total=total_steps, initial=start, desc="verifier", disable=rank != 0)
    for step in range(start, total_steps):
        t0 = time.time()
        epoch, i = divmod(step, steps_per_epoch)
        # The order of epoch e depends only on (seed, e): a resumed run sees exactly the same batches.
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch))
        batch = [examples[j] for j in order[i * args.batch_size:(i + 1) * args.batch_size].tolist()]
        loss, accuracy, grad_norm = verifier_step(model, opt, sched, batch, args.micro_batch_size, accum, world, rank,
                                                  tok.pad_token_id, device, step)
        row = {"step": step + 1, "epoch": epoch + (i + 1) / steps_per_epoch, "loss": loss, "train_accuracy": accuracy,
               "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, "seconds": time.time() - t0}
        write(row, evaluate=i + 1 == steps_per_epoch)
        bar.set_postfix(loss=f"{loss:.4f}")
        if rank == 0 and args.log_every > 0 and (step + 1) % args.log_every == 0:
            tqdm.write(summary(row))
        bar.update(1)
        if (args.save_steps > 0 and (step + 1) % args.save_steps == 0) or i + 1 == steps_per_epoch or \
                step + 1 == total_steps:
            save_resume_state(model, opt, {"step": step + 1, "sched": sched.state_dict()}, args.output_dir)
    bar.close()
    save_verifier(model, tok, args, os.path.join(args.output_dir, "final"), rank)


# ----------------------------------------------------------------------------- main

def main(args):
    beside = os.path.join(os.path.dirname(os.path.normpath(args.model)), "best")
    if not args.init and os.path.basename(os.path.normpath(args.model)) == "warmup" and os.path.isdir(beside):
        args.init = beside  # sft.py's run: sample from its warm-up, start the verifier from its best epoch (paper)
    reward_fn = check_args(args)  # every check before any model loads: flags, checkpoints, --samples, --reward
    flags = dataclasses.asdict(args)  # as started: args.json, and what a --resume must match
    recipe = fill_recipe(args)
    if not args.samples:  # --model samples: a policy, generating up to --max_new_tokens after the prompt
        check_model_config(args.model, "--model", {"max_new_tokens": args.max_new_tokens})
    check_model_config(args.init or args.model, "--init" if args.init else "--model", {"max_length": args.max_length},
                       policy=False)
    rows = read_samples(args.samples) if args.samples else None
    records = reward.load_records(args.data, args.split, args.cot, require_cot=args.gold_samples) \
        if args.gold_samples or not args.samples else None  # the questions to sample, or whose gold CoTs to add
    rows = with_gold(rows, records, args.cot) if rows is not None and args.gold_samples else rows
    resuming = plan_run(args, flags, MAY_CHANGE, resumable=("samples.jsonl",))
    if resuming:
        check_gold_samples_change(args)

    rank, world, device, mesh = init_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"recipe: {recipe}")
    path = args.samples or os.path.join(args.output_dir, "samples.jsonl")
    if rows is not None:  # the samples are known: refused now if they cannot train a verifier
        args.micro_batch_size = check_samples(args, rows, path, world)
    check_memory(args, records if rows is None else None, world, device)
    if rank == 0:
        begin_run(args, flags, world, resuming)
    dist.barrier()
    if rows is None:
        sample(args, path, rank, world, device, mesh, log, reward_fn)
        gc.collect()  # FSDP2 holds the dropped sampling model in reference cycles: free it before the verifier
        rows = read_samples(path)
        rows = with_gold(rows, records, args.cot) if args.gold_samples else rows
        args.micro_batch_size = check_samples(args, rows, path, world)
    log(samples_summary(rows))
    train(args, rows, resuming, rank, world, device, mesh, log)
    log(f"done: verifier in {args.output_dir}/final, metrics in {args.output_dir}/metrics.jsonl")
    dist.destroy_process_group()


# =====================================================================================================================
# infrastructure: skip on a first read
# First this stage's own helpers, then the helpers repeated across the stage files, kept identical (and in this
# order) by tests/test_copies.py.
# =====================================================================================================================

# ----------------------------------------------------------------------------- rerank.py's own
# Checks, the memory check, samples files, saving the verifier.

def check_args(args):
    """The flags, the checkpoints (--model only where it samples: not with --samples and --init), --samples and
    --reward, before any model loads; resolves --cot and returns the reward function."""
    check_ranges(args, RANGES)
    if not args.samples and not args.model:
        raise SystemExit("error: --model is required to draw samples (or pass --samples FILE)")
    if not (args.init or args.model):
        raise SystemExit("error: --init (or --model) is required: the checkpoint the verifier trunk starts from")
    if args.samples and not os.path.isfile(args.samples):
        raise SystemExit(f"error: --samples {args.samples!r}: no such file")
    reward_fn = reward.load_reward(args.reward)
    if args.samples and reward_fn is not reward.compute_rewards:
        raise SystemExit(f"error: --reward {args.reward} labels the samples rerank.py draws; --samples "
                         f"{args.samples} brings its own labels")
    checkpoints = {flag: path for flag, path in (("--model", args.model), ("--init", args.init))
                   if path and not (flag == "--model" and args.samples and args.init)}
    for flag, path in checkpoints.items():
        check_checkpoint(path, flag, Args.model if flag == "--model" else None)
    resolve_cot(args, checkpoints)
    return reward_fn


def check_memory(args, records, world, device):
    """On a GPU, stop now when the run cannot fit (memory_error), not at an OOM after minutes of loading; `records`:
    the questions to sample (None: no sampling)."""
    if (device_bytes := device_memory(device)) is None:
        return
    import transformers
    config = transformers.AutoConfig.from_pretrained(args.init or args.model)
    longest = None
    if records is not None:  # it samples: the longest prompt's KV cache
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        longest = max(len(reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot, sampling=True)))
                      for r in records)
    if error := memory_error(args, config_params(config), config, world, compute_dtype(device) == torch.bfloat16,
                             device_bytes, longest):
        raise SystemExit(error)


def memory_error(args, n_params, config, world, bf16, device_bytes, prompt_tokens):
    """None when this run fits `device_bytes` per device, else the error line (memory_advice), for the larger phase.
    Sampling (unless `prompt_tokens` is None): fp32 weights (4 bytes per parameter), gathered, and the KV cache of one
    generate() call's rows (up to --gen_batch_size) × (`prompt_tokens` + --max_new_tokens). Training: fp32 weights and
    AdamW (12), gradients (4), a micro-batch of --max_length tokens; with --lora_rank, the frozen trunk in the compute
    dtype (2 bytes in bf16) and the 12 + 4 bytes per trained parameter only (lora_params). Both models count as the
    trained one's `n_params`."""
    state, grads = 12, 4
    if args.lora_rank:  # bytes per parameter of the whole model, as memory_estimate takes them
        trained = lora_params(config, args.lora_rank) / n_params
        state, grads = (2 if bf16 else 4) + 12 * trained, 4 * trained

    def peak(a, world):
        micro = a.micro_batch_size if a.micro_batch_size > 0 else max(1, a.batch_size // world)
        train = memory_estimate(n_params, config, world, bf16, state, grads, micro * a.max_length, False, 0)["training"]
        if prompt_tokens is None:
            return train
        rows = max(1, a.gen_batch_size // a.num_samples) * min(a.gen_batch_size, a.num_samples)
        gen = rows * (prompt_tokens + a.max_new_tokens)
        return max(train, memory_estimate(n_params, config, world, bf16, 4, 0, 0, False, gen)["generation"])
    return memory_advice(args, peak, world, device_bytes, ["micro_batch_size"] * (args.micro_batch_size > 0)
                         + ["gen_batch_size"])


def read_samples(path):
    """Rows of a samples JSONL; one error line naming a row without the fields training needs, or item_ids given to
    two questions (the held-out split and --gold_samples go by item_id)."""
    rows, questions = [], {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: malformed JSON ({e.msg})")
            missing = [k for k in ("item_id", "question", "completion", "correct") if k not in row]
            if missing:
                raise SystemExit(f"error: {path}:{lineno}: sample has no {', '.join(missing)}")
            questions.setdefault(str(row["item_id"]), set()).add(str(row["question"]))
            rows.append(row)
    shared = [repr(i) for i, texts in questions.items() if len(texts) > 1]
    if shared:
        raise SystemExit(f"error: {path}: {len(shared)} item_ids name more than one question ({', '.join(shared[:3])}"
                         f"{' …' if len(shared) > 3 else ''}); each question needs its own")
    return rows


def drop_partial_questions(path):
    """Rank 0, before sampling continues: drop from `path` a last line cut by a kill and the questions with fewer rows
    than their `distinct` (one warning line), so that they are sampled again; rows without `distinct` count as whole,
    a line that is not JSON is left for read_samples to name."""
    with open(path) as f:
        lines = f.readlines()
    cut = bool(lines) and not lines[-1].endswith("\n")
    lines = lines[:len(lines) - cut]
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append(row if isinstance(row, dict) else {})
    ids = [row.get("item_id") for row in rows]
    count = collections.Counter(ids)
    partial = {i for i, row in zip(ids, rows) if row.get("distinct", count[i]) != count[i]}
    if not cut and not partial:
        return
    print(f"warning: {path}: {'a last line cut by a kill and ' if cut else ''}{len(partial)} questions with fewer "
          f"rows than they were sampled with dropped; they are sampled again", flush=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(line for line, i in zip(lines, ids) if i not in partial)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def check_samples(args, rows, path, world):
    """The micro-batch per process (--batch_size / world unless given), once the samples are known to train a
    verifier: both kinds among the training part (a verifier trained on one kind learns a constant), at least one
    --batch_size of them, split evenly over the processes."""
    if not rows:
        raise SystemExit(f"error: {path}: no samples")
    train_rows = split_by_question(rows, args.holdout_fraction, args.seed)[0]
    kinds = {bool(r["correct"]) for r in train_rows}
    if len(kinds) < 2:
        kind = "correct" if True in kinds else "wrong"
        gold = "" if kind == "correct" or args.gold_samples else \
            "pass --gold_samples (each question's gold CoT joins as a correct sample" + \
            ("), " if args.samples else "; with --resume, to the samples drawn, none drawn again), ")
        raise SystemExit(f"error: {path}: all {len(train_rows)} training samples are {kind}, and a verifier needs both "
                         f"kinds: {gold}draw more (--num_samples, --limit), sample another --model or at another "
                         f"--temperature")
    micro = args.micro_batch_size if args.micro_batch_size > 0 else max(1, args.batch_size // world)
    if args.batch_size % (micro * world):
        raise SystemExit(f"error: --batch_size {args.batch_size} is not a multiple of micro_batch_size × world "
                         f"({micro} × {world})")
    if len(train_rows) < args.batch_size:
        raise SystemExit(f"error: {len(train_rows)} training samples are fewer than one --batch_size {args.batch_size}")
    return micro


def save_verifier(model, tok, args, path, rank):
    """An AutoModelForSequenceClassification folder (+ tokenizer, train_args.json) written by rank 0, in fp32. With
    LoRA the adapters are merged into it, and also saved with the `score` head in peft's format in adapter/, on
    --init's checkpoint (save_adapter)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tok.model_max_length = args.max_length  # evaluate.py cuts its inputs where training did
        sd, adapters = merge_lora(sd, args.lora_alpha / max(args.lora_rank, 1))
        with stop_if_disk_full(path):
            model.save_pretrained(path, state_dict={k: v.float() for k, v in sd.items()})
            tok.save_pretrained(path)
            if adapters:  # save_pretrained wrote the frozen trunk's dtype (bf16 on GPU) as the checkpoint's
                model.config.dtype = "float32"
                model.config.save_pretrained(path)
                save_adapter(adapters, os.path.join(path, "adapter"), args, args.init or args.model, "SEQ_CLS",
                             {k: v for k, v in sd.items() if k.startswith("score.")})
            with open(os.path.join(path, "train_args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
    dist.barrier()


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


def fill_recipe(args):
    """Flags left at -1 take RECIPES' values (per --cot where a dict) for the size of the model trained (--init, else
    --model), --lr × LORA_LR_SCALE with --lora_rank, read before anything loads; returns what was filled, in words for
    the log."""
    n = checkpoint_params(getattr(args, "init", "") or args.model)
    name = "small" if n is not None and n < SMALL_MODEL else "paper"
    filled = {f: v[args.cot] if isinstance(v, dict) else v for f, v in RECIPES[name].items() if getattr(args, f) == -1}
    lora = "lr" in filled and args.lora_rank > 0
    if lora:
        filled["lr"] *= LORA_LR_SCALE
    for flag, value in filled.items():
        setattr(args, flag, value)
    size = "a hub model" if n is None else f"{n / 1e6:.1f} M parameters"
    said = ", ".join(f"--{flag} {value:g}" + (f" (× {LORA_LR_SCALE} for LoRA)" if flag == "lr" and lora else "")
                     for flag, value in filled.items())
    return f"{name} ({size}){': ' + said if said else ', every flag given'}"


def run_entries(output_dir):
    """What a run leaves in its folder (--overwrite removes these, and leaves other files)."""
    run_files = ("args.json", "launches.jsonl", "metrics.jsonl", "samples.jsonl", "final", "best", "warmup", "init")
    return sorted(e for e in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
                  if e in run_files or e.startswith(("checkpoint", "epoch_")))


def run_progress(output_dir):
    """What the run in `output_dir` holds, in words for one line; None when the folder holds no run."""
    entries, said = run_entries(output_dir), []
    for name, unit in (("metrics.jsonl", "steps logged"), ("samples.jsonl", "samples drawn")):
        if name in entries:
            with open(os.path.join(output_dir, name), "rb") as f:
                lines = f.read().splitlines()
            rows = [line for line in lines if line.strip()]
            try:  # metrics.jsonl: the step of its last row
                count = json.loads(rows[-1])["step"] if name == "metrics.jsonl" else len(lines)
            except (ValueError, KeyError, IndexError, TypeError):
                count = len(lines)
            said.append(f"{count} {unit} in {name}")
    state = find_resume_state(output_dir)
    said += [f"a resume state at step {state[1]}"] if state else []
    said += [f"{e}/" for e in entries if e in ("final", "best", "warmup")]
    return ", ".join(said or entries) or None


def plan_run(args, flags, may_change, resumable=()):
    """Before any model loads: a folder holding a run is never written over without --resume or --overwrite; --resume
    refuses a flag of `flags` (as started) that differs from args.json unless `may_change`, and with nothing to resume
    (no resume state nor a `resumable` file) starts at step 0, so that a requeued job works at once. Does it resume?"""
    check_output_dir(args.output_dir)
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues the run in --output_dir and --overwrite starts it over: pass one")
    progress = run_progress(args.output_dir)
    if progress is not None and not (args.resume or args.overwrite):
        raise SystemExit(f"error: --output_dir {args.output_dir} holds a run ({progress}): pass --resume to continue "
                         f"it or --overwrite to start over")
    if not args.resume:
        return False
    if find_resume_state(args.output_dir) is None and not any(
            os.path.exists(os.path.join(args.output_dir, f)) for f in resumable):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"no resume state in {args.output_dir}: starting at step 0", flush=True)
        return False
    saved = read_json(os.path.join(args.output_dir, "args.json"))
    if not saved:
        raise SystemExit(f"error: --resume: cannot read the flags the run in {args.output_dir} was started with "
                         f"(its args.json); pass --overwrite to start over")
    # A flag newer than the run is absent from its args.json: the run had that flag's default.
    saved = {**{f.name: f.default for f in dataclasses.fields(args)}, **saved}
    differ = [f"--{k} {v} (the run's: {saved[k]})" for k, v in flags.items() if k not in may_change and saved[k] != v]
    if differ:
        raise SystemExit(f"error: --resume in {args.output_dir}: flags differ from the run's args.json: "
                         f"{', '.join(differ)}; drop them to continue with the run's, or pass --overwrite to start "
                         f"over")
    return True


def begin_run(args, flags, world, resuming):
    """Rank 0, after every check: a run at step 0 removes what an earlier one left, naming it, and writes args.json
    (`flags` as started, world size, versions); each launch appends to launches.jsonl the flags that differ from it."""
    import transformers
    if not resuming:
        removed = [e + "/" * os.path.isdir(os.path.join(args.output_dir, e)) for e in run_entries(args.output_dir)]
        for entry in removed:
            path = os.path.join(args.output_dir, entry)
            shutil.rmtree(path) if entry.endswith("/") else os.remove(path)
        if removed:
            print(f"{'--overwrite' if args.overwrite else '--resume with nothing to resume'}: removed "
                  f"{os.path.join(args.output_dir, '')}{{{', '.join(removed)}}}", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump({**flags, "world_size": world, "python": sys.version.split()[0], "torch": torch.__version__,
                       "transformers": transformers.__version__}, f, indent=2)
    saved = read_json(os.path.join(args.output_dir, "args.json"))
    changed = {k: [saved.get(k), v] for k, v in flags.items()
               if saved.get(k) != v and k not in ("resume", "overwrite")}
    with open(os.path.join(args.output_dir, "launches.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world, "resumed": resuming,
                            "changed": changed, "argv": sys.argv[1:]}) + "\n")


def summary(row):
    """A metrics row as one log line (the progress bar shows none in a log file)."""
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


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


# ----------------------------------------------------------------------------- LoRA (--lora_rank)

# The layers LoRA adapts: the attention and MLP projections of Llama (and Mistral, Qwen) and of OPT/Galactica.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2")


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al. 2022, LoRA, eq. 3):

        h = W x + (α / r) B A x,    A (r, in) random, B (out, r) zeros: the model is unchanged until B moves

    It keeps the layer's own `weight` and `bias` (the base model's state dict keys stay as they were) and names its
    factors as peft does (`lora_A`, `lora_B`). With `enabled` False it is W x: the model without its adapters."""

    def __init__(self, linear, rank, alpha):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        device = linear.weight.device
        self.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)  # lora_A keeps nn.Linear's init, kaiming-uniform, as peft's
        self.scaling, self.enabled = alpha / rank, True

    def forward(self, x):
        h = super().forward(x)
        return h + self.lora_B(self.lora_A(x)) * self.scaling if self.enabled else h


def add_lora(model, rank, alpha, dtype):
    """`model` with LoRA: every pretrained weight frozen and stored in `dtype` (bf16 on GPU: 2 bytes per parameter, the
    compute dtype, so nothing is cast per step), and each nn.Linear named in LORA_TARGETS a LoRALinear whose adapters
    train in fp32 with AdamW, as does a fresh head (fsdp_groups' `v_head`, `score`). Called the same way on rank 0's
    loaded model and on the other ranks' meta one (load_sharded), so both have the same parameters."""
    for name, p in model.named_parameters():
        if name.split(".")[0] not in ("v_head", "score"):
            p.requires_grad_(False)
            p.data = p.data.to(dtype)
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in
               LORA_TARGETS]
    if not targets:
        raise SystemExit(f"error: --lora_rank: the model has no linear layer named {', '.join(LORA_TARGETS)}")
    for name in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), rank, alpha))
    return model


def lora_params(config, rank):
    """The trainable parameters LoRA of `rank` adds to a causal LM of `config` (built on the meta device)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        lm = add_lora(AutoModelForCausalLM.from_config(config), rank, 1.0, torch.float32)
    return sum(p.numel() for p in lm.parameters() if p.requires_grad)


def merge_lora(sd, scaling):
    """A full state dict with LoRA layers -> (the state dict with each update merged into its weight, W + (α/r) B A: a
    plain checkpoint every stage loads as any other; the adapters' tensors, {name: tensor}). Without LoRA: (sd, {})."""
    adapters = {k: v for k, v in sd.items() if ".lora_" in k}
    merged = {k: v for k, v in sd.items() if ".lora_" not in k}
    for key in (k[:-len(".lora_A.weight")] for k in adapters if k.endswith(".lora_A.weight")):
        update = adapters[key + ".lora_B.weight"].float() @ adapters[key + ".lora_A.weight"].float()
        merged[key + ".weight"] = merged[key + ".weight"].float() + scaling * update
    return merged, adapters


def save_adapter(adapters, path, args, base, task_type, heads=()):
    """The adapters in peft's format in `path`: adapter_config.json and adapter_model.safetensors with peft's key
    names, so that `PeftModel.from_pretrained(<the model in base>, path)` rebuilds the trained model; `heads` are the
    fresh heads' tensors, peft's modules_to_save. A folder of its own: transformers would read an adapter_config.json
    beside config.json as an adapter to load onto its base."""
    config = dict(peft_type="LORA", task_type=task_type, base_model_name_or_path=base, r=args.lora_rank,
                  lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  inference_mode=True, target_modules=sorted({k.split(".")[-3] for k in adapters}),
                  modules_to_save=sorted({k.split(".")[0] for k in heads}) or None)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in {**adapters, **dict(heads)}.items()},
              os.path.join(path, "adapter_model.safetensors"))


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


# ----------------------------------------------------------------------------- evaluation, schedule, epochs to save

def lr_lambda(warmup_steps, total_steps):
    """Linear warm-up from 0, then linear decay to 0 (the paper's schedule)."""
    return lambda step: ((step + 1) / warmup_steps if step < warmup_steps
                         else max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps)))


# ----------------------------------------------------------------------------- resume state and metrics on disk
# A resume state is the folder {output_dir}/checkpoint-{step}: DCP's shards and .metadata, each rank's loop state,
# and manifest.json (every file's sha256), written last: a folder without it is partial, whatever a kill left.

def trained_state(model):
    """The model's state dict without its frozen parameters: what a resume state holds. With LoRA, the adapters and the
    head, not the frozen base (--model gives it again), under any of its names (DCP's ignore_frozen_params keeps a tied
    output embedding)."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k not in frozen}


def find_resume_state(output_dir, before=float("inf")):
    """(path, step) of the newest whole resume state in `output_dir` (of a step before `before`), or None. Reads
    folder names only: cheap enough to ask before any model loads."""
    steps = [int(name[11:]) for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if name.startswith("checkpoint-") and name[11:].isdigit() and int(name[11:]) < before
             and os.path.isfile(os.path.join(output_dir, name, "manifest.json"))]
    return (os.path.join(output_dir, f"checkpoint-{max(steps)}"), max(steps)) if steps else None


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damaged_file(folder, rank=0, world=1):
    """None when this rank's share of the resume state `folder` (every world-th file of its manifest) matches its
    sha256s, else what is wrong, naming the file."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            files = sorted(json.load(f)["files"].items())[rank::world]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    for name, sha256 in files:
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} is missing"
        if file_digest(os.path.join(folder, name)) != sha256:
            return f"{name} does not match its sha256"


def check_disk_space(output_dir, n_params):
    """Before the first save: one error line unless the disk has room for two resume states (12 bytes per parameter
    each: fp32 weights and AdamW's two moments), counting the state folders there, which a save removes but one."""
    held = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(output_dir)
               if os.path.relpath(root, output_dir).startswith("checkpoint-") for name in names)
    need, free = 2 * 12 * n_params - held, shutil.disk_usage(output_dir).free
    if free < need:
        raise SystemExit(f"error: --output_dir {output_dir}: {free / 1e9:.3g} GB free, saving the resume state needs "
                         f"{need / 1e9:.3g} GB (two states during the switch, 12 bytes per parameter each)")


@contextmanager
def stop_if_disk_full(path):
    """Around a write of `path` (a child of the run folder): a full disk ends the run with one line naming it, not a
    traceback; once there is room, --resume continues from the last whole state."""
    try:
        yield
    except (Exception, dcp.CheckpointException) as e:  # the latter is no Exception
        # ENOSPC in `e` or an error it wraps (DCP gathers every rank's failure into one); safetensors' Rust I/O
        # errors are no OSError and name it in their message
        errors = [e]
        for x in errors:  # grows as it goes
            wrapped = [f for f, _ in x.failures.values()] if isinstance(x, dcp.CheckpointException) else []
            errors += filter(None, (x.__cause__, x.__context__, *wrapped))
        if not any(getattr(x, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(x) for x in errors):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise SystemExit(f"error: no space left on the disk of {folder} while writing {path} "
                         f"({shutil.disk_usage(folder).free / 1e9:.3g} GB free now): make room, then continue with "
                         f"--resume") from None


def save_resume_state(model, opt, state, output_dir):
    """All ranks: checkpoint-{step} with the sharded model and optimizer (DCP) and each rank's loop `state` (step, ...)
    and RNG, then its manifest. Rank 0 first removes every state but the newest whole one before it: at most two on
    disk, one whole whenever a kill comes. Each rank hashes only the files it wrote, right after writing them: at 7B on
    8 GPUs ~10 GB a rank from the page cache, ~7 s per save at ~1.5 GB/s (SHA-NI, measured on a 2-core Xeon)."""
    rank, folder = dist.get_rank(), os.path.join(output_dir, f"checkpoint-{state['step']}")
    if rank == 0:
        keep = (find_resume_state(output_dir, before=state["step"]) or [None])[0]
        for path in (os.path.join(output_dir, name) for name in os.listdir(output_dir)):
            if os.path.basename(path).startswith("checkpoint-") and os.path.isdir(path) and path != keep:
                shutil.rmtree(path)  # a kill may leave it half removed: older than `keep`, or never counted
    dist.barrier()
    # DCP on a gloo group of its own, destroyed after: on the default group (OMP_NUM_THREADS > 1) the gloo workers that
    # copy DCP's plans kept OpenMP teams, libgomp stopped spin-waiting, and every later step ran 10-25% slower.
    group = dist.new_group(backend="gloo")
    with stop_if_disk_full(folder):
        try:  # DCP fsyncs its files, writes .metadata last and raises on every rank when any rank failed
            dcp.save({"model": trained_state(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=folder, process_group=group)
        except dcp.CheckpointException:  # no partial state left to keep a full disk full
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            dist.barrier()  # before any rank exits: torchrun would end rank 0 mid-removal
            raise
        finally:
            dist.destroy_process_group(group)
        with open(os.path.join(folder, f"loop_state_rank{rank}.pt"), "wb") as f:
            torch.save(dict(state, rng=torch.get_rng_state()), f)
            f.flush()
            os.fsync(f.fileno())  # as DCP does its files
        mine = (f"__{rank}_", f"loop_state_rank{rank}.") + (".metadata",) * (rank == 0)  # the files this rank wrote
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, {name: file_digest(os.path.join(folder, name)) for name in os.listdir(folder)
                                         if name.startswith(mine)})
        if rank == 0:  # renamed into place, so that a manifest is whole; then it and the folder's name made durable
            with open(os.path.join(folder, "manifest.json.tmp"), "w") as f:
                json.dump({"step": state["step"], "files": {k: v for d in digests for k, v in d.items()}}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(folder, "manifest.json.tmp"), os.path.join(folder, "manifest.json"))
            for path in (folder, output_dir):
                os.fsync(fd := os.open(path, os.O_RDONLY))
                os.close(fd)
    dist.barrier()


def load_resume_state(model, opt, output_dir):
    """All ranks: load the model, optimizer and RNG from the newest intact resume state, say which, and return this
    rank's loop state (rank 0's when more processes resume). The ranks share the sha256 check; a damaged state is named
    in one warning and set aside as checkpoint-{step}.damaged (no resume or save takes it); the previous is tried."""
    rank, world, problems = dist.get_rank(), dist.get_world_size(), []
    while True:
        found = [find_resume_state(output_dir)]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            raise SystemExit(f"error: --output_dir {output_dir}: no intact resume state to continue from"
                             + (f" ({'; '.join(problems)})" if problems else ""))
        path, damage = found[0][0], [None] * world
        dist.all_gather_object(damage, damaged_file(path, rank, world))
        if not (what := next(filter(None, damage), None)):
            break
        problems.append(f"{os.path.basename(path)}: {what}")
        if rank == 0:
            shutil.rmtree(path + ".damaged", ignore_errors=True)
            os.rename(path, path + ".damaged")
            print(f"warning: the resume state {path} is damaged ({what}); set aside as {path}.damaged, trying the "
                  f"previous one", flush=True)
    sd = {"model": trained_state(model), "optim": get_optimizer_state_dict(model, opt)}
    group = dist.new_group(backend="gloo")  # as in save_resume_state
    dcp.load(sd, checkpoint_id=path, process_group=group)
    dist.destroy_process_group(group)
    set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=False))  # the frozen base stays
    set_optimizer_state_dict(model, opt, sd["optim"])
    if rank == 0:
        print(f"resumed from {path}", flush=True)
    mine = os.path.join(path, f"loop_state_rank{rank}.pt")
    state = torch.load(mine if os.path.exists(mine) else os.path.join(path, "loop_state_rank0.pt"))
    torch.set_rng_state(state.pop("rng"))
    return state


def append_metrics(path, row):
    """Rank 0: one metrics row as one whole line in one write, so a kill can cut only the line being written."""
    with stop_if_disk_full(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(path, step):
    """Rank 0, on resume: keep the rows up to the resumed `step` (those after it are logged again), dropping a last
    line a kill cut (one warning line), through a new file renamed over the old one: a kill leaves one of them."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        print(f"warning: {path}: dropped its last line, cut by a kill ({lines.pop()!r:.60})", flush=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(line for line in lines if json.loads(line)["step"] <= step)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stop_on_interrupt(args):
    """Ctrl-C (SIGINT, which torchrun passes to every rank) ends every process at once with status 130, rank 0 saying
    in one line how far the run got and how to continue. A thread, woken by the byte the signal handler writes, ends
    the process even while the main thread waits in a collective whose other ranks are gone; ending without unwinding
    is what a kill does, which a run survives."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno())
    signal.signal(signal.SIGINT, lambda *_: None)  # no KeyboardInterrupt in the main thread: the thread below stops

    def stop(reader, writer):  # holds the writer: the handler's fd stays open
        while reader.recv(1) != bytes([signal.SIGINT]):
            pass
        if int(os.environ.get("RANK", 0)) == 0:
            try:
                with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
                    step = json.loads([line for line in f if line.endswith("\n")][-1])["step"]
            except (OSError, ValueError, IndexError, KeyError, TypeError):
                step = 0
            progress = run_progress(args.output_dir)
            print(f"\ninterrupted at step {step}{f' ({progress})' if progress else ''}; continue with: "
                  f"{os.path.basename(sys.argv[0])} --output_dir {shlex.quote(args.output_dir)} --resume",
                  file=sys.stderr, flush=True)
        os._exit(130)

    threading.Thread(target=stop, args=(reader, writer), daemon=True).start()


if __name__ == "__main__":
    args = parse_args(Args)
    stop_on_interrupt(args)
    main(args)
