"""Stage 2 of ReFT: Reinforced Fine-Tuning, PPO from the SFT warm-up checkpoint (Luong et al. 2024, Algorithm 1).

For every batch of training questions: sample a chain of thought per question from the policy, score its
answer with reward.py (1 correct / 0.1 wrong / 0 no answer, on the token that emits EOS), subtract a per-token
KL penalty against the frozen warm-up model, estimate advantages with GAE on a value head that shares the
policy's trunk, and take clipped PPO steps. Variants: critic-free advantages (--advantage grpo|rloo), the KL in the
loss (--kl_in_loss), the paper's online self-training baseline (--objective online_st), and DAPO's and Dr. GRPO's
recipes (--loss_aggregation, --clip_range_high, --scale_rewards none).

Reading guide: the RL stage of the paper's Algorithm 1 and its equations (sec. 3), each to the code, in the order
main() calls it. Read top to bottom: the PPO math, the model and sampler, the steps, main(); everything below the
"infrastructure" marker (checks, loading, saving, distributed setup) can wait.
  a batch of training questions x                        step_questions (dealt out to the ranks in main)
  sample CoTs e' ~ π_θ(x)                                sample_rollout → sample, row_uniforms, inverse_cdf
  y' = EXTRACT(e'), rewarded 1 right, 0.1 wrong, 0 none  score → reward.extract_answers, reward.compute_rewards
  π_θold ← π_θ: old log-probs and values; π_ref's        rollout_forwards
  total reward r_t: score on EOS - β·KL_t on each token  kl_shaped_rewards (KL_t: log π_old - log π_ref)
  δ_t, Â_t = Σ_l (γλ)^l δ_{t+l}, R̂_t = Â_t + V(s_t)     estimate_advantages → compute_gae (GAE), masked_whiten
  U updates of L_RL = L_policy + α·L_value               ppo_update (epochs × minibatches × micro-batches), clipped_step
    L_policy, PPO's clipped surrogate                    policy_loss (Schulman et al. 2017, eq. 7)
    L_value, the clipped value loss                      value_loss
    averaging over tokens and sequences                  aggregate_loss (--loss_aggregation)
  variants                                               grpo_advantages, rloo_advantages, k3_kl, online_st_update
  which variants combine, β, sizes, dropped prompts      check_variants, main, minibatch_size, training_prompts
  metrics, evaluation, checkpoints                       step_log, greedy_evaluation, write_metrics, save
  LoRA (--lora_rank): W + (α/r)·B A on the projections;   LoRALinear, add_lora (below the marker: sft.py and rerank.py
    π_ref = the policy with its adapters off              share them), adapters_off
One step with real numbers (the mask, scores, per-token KL, shaped rewards, values, TD errors, advantages, returns,
ratios and clipped losses of 2 questions × 2 samples): docs/walkthrough.md, made by scripts/walkthrough.py.

Run it (CPU, the offline default: sft.py's tiny warm-up runs/sft/warmup on `minigsm`; the flags left at -1 take the
quickstart's values for a model this small and the paper's for a pretrained one, RECIPES):
    python reft.py                                       # 48 PPO steps, the best validation step in runs/reft/best
    python reft.py --max_steps 1 --output_dir runs/reft_smoke                                 # a smoke run, seconds
    torchrun --standalone --nproc_per_node 2 reft.py --output_dir runs/reft2                  # 2 CPU processes
The paper's setting (8 GPUs, CodeLlama-7B warm-up = epoch 2 of SFT, GSM8K program CoT; these are RECIPES["paper"]):
    torchrun --nproc_per_node 8 reft.py --model runs/sft7b/warmup --data gsm8k_reft --cot python \\
        --batch_size 32 --micro_batch_size 4 --lr 3e-7 --epochs 300 --kl_coef 0.01 --max_prompt_length 300 \\
        --max_length 700 --gradient_checkpointing --output_dir runs/reft7b
On one 80 GB GPU: the same with --lora_rank 16 and without --lr (the recipe's × 10 for LoRA), docs/scaling.md.

One code path: plain `python reft.py` is a 1-process group; under `torchrun` the policy (with its value head)
and the reference are sharded with FSDP2, gloo + fp32 on CPU and NCCL + bf16 mixed precision on GPU.
"""
import argparse
import ast
import dataclasses
import errno
import functools
import hashlib
import inspect
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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args, get_origin

import numpy as np
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
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.utils import logging as hf_logging

import reward

hf_logging.disable_progress_bar()


@dataclass
class Args:
    model: str = "runs/sft/warmup"
    """the SFT warm-up checkpoint (HF folder; sft.py writes it as {output_dir}/warmup); it initialises the policy and is
    the frozen KL reference. Its size picks the defaults of the flags at -1 below (RECIPES)"""
    data: str = "minigsm"
    """a prepared dataset name under data/ or a .jsonl/.json file of {item_id, question, answer_value}"""
    cot: Literal["auto", "nl", "python"] = "auto"
    """chain-of-thought kind: `nl` or `python` (then the prompt ends with the `def solution():` header); `auto` = the
    kind --model was trained on (its train_args.json)"""
    output_dir: str = "runs/reft"
    """where checkpoints (epoch_K/, final/ with value_head.safetensors), the resume state and metrics go"""
    epochs: int = -1
    """passes over the training questions; -1 = by model size: 4 small (48 PPO steps on minigsm), 300 paper"""
    max_steps: int = -1
    """stop after this many PPO steps (rollout batches); overrides epochs when > 0"""
    batch_size: int = 32
    """questions per PPO step, summed over processes (paper: 32 = 8 GPUs × 4)"""
    num_samples: int = -1
    """CoTs sampled per question per step; -1 = by model size: 4 small, 1 paper"""
    mini_batch_size: int = -1
    """sequences per optimizer step, summed over processes; -1 = the whole rollout batch (paper)"""
    micro_batch_size: int = 32
    """sequences per forward/backward on one process (gradient accumulation inside a minibatch)"""
    ppo_epochs: int = 2
    """optimisation passes over each rollout batch (paper: 2)"""
    objective: Literal["ppo", "online_st"] = "ppo"
    """`ppo` (ReFT) or `online_st`, the paper's online self-training baseline: the same rollouts, then NLL steps on
    ½ the samples that scored 1 + ½ the questions' gold CoTs (needs them in --data; no value head, KL or reference)"""
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    """PPO's advantage: `gae` on a value head (paper), or one value per sample for all its tokens, from the
    --num_samples (≥ 2) samples of its question, with no value head: `grpo` (Shao et al. 2024) or `rloo` (Ahmadian
    et al. 2024)"""
    scale_rewards: Literal["group", "none"] = "group"
    """with --advantage grpo: `group` divides each sample's centred reward by its group's std (DeepSeekMath's GRPO);
    `none` only centres it, as Dr. GRPO (Liu et al. 2025) and TRL's GRPOTrainer scale_rewards="none" (a question whose
    samples nearly agree then gets small advantages, not unit ones)"""
    lr: float = -1.0
    """constant learning rate; -1 = by model size: 1e-4 small, 3e-7 paper, × LORA_LR_SCALE (10) with --lora_rank; 0
    trains at 0 (a frozen-policy control)"""
    kl_coef: float = -1.0
    """β of the per-token KL penalty; -1 = by model size: 0.05 small, paper by --cot (0.05 nl, 0.01 python)"""
    adaptive_kl: bool = False
    """adapt β towards --target_kl (Ziegler et al. 2019) instead of keeping it fixed (paper: fixed)"""
    target_kl: float = 1.0
    """with --adaptive_kl: the per-sequence KL (nats) to steer towards"""
    kl_in_loss: bool = False
    """move the KL term from the reward (per-token shaping: the paper's code, TRL's PPOTrainer and RLOOTrainer, verl's
    use_kl_in_reward) into the loss, as β × the k3 estimator per token (DeepSeekMath's GRPO, TRL's GRPOTrainer, verl's
    use_kl_loss)"""
    loss_aggregation: Literal["seq_mean", "token_mean", "token_sum_norm"] = "seq_mean"
    """how the per-token policy, value and --kl_in_loss losses become a minibatch's loss: `seq_mean` a token mean per
    sequence, then a mean over sequences (the paper's code, GRPO); `token_mean` one mean over all the minibatch's tokens
    on all ranks (DAPO, Yu et al. 2025; TRL GRPOTrainer loss_type="dapo"); `token_sum_norm` the token sum divided by
    sequences × --max_length, a constant (Dr. GRPO, Liu et al. 2025)"""
    gamma: float = 1.0
    """GAE discount γ (paper's code: 1.0)"""
    lam: float = -1.0
    """GAE λ; -1 = by model size: 1.0 small (λ < 1 bootstraps from a still poor value head), 0.95 paper"""
    clip_range: float = 0.2
    """ε of the clipped policy objective"""
    clip_range_high: float = -1.0
    """the upper ε: the ratio is clipped to [1 - clip_range, 1 + clip_range_high]; -1 = --clip_range (symmetric, as
    the paper); DAPO's clip-higher (Yu et al. 2025) raises it, e.g. to 0.28 with --clip_range 0.2"""
    clip_range_value: float = 0.2
    """ε_v of the clipped value loss, in reward units"""
    vf_coef: float = -1.0
    """weight of the value loss; -1 = by model size: 0.1 small (at 5 the value loss's gradient through the shared tiny
    trunk outweighed the policy's), 5 paper"""
    partial_reward: bool = True
    """0.1 for an extracted but wrong answer on numeric datasets (paper); off gives 1/0 rewards"""
    reward: str = "reward:compute_rewards"
    """the reward as `module:function`, a callable with reward.compute_rewards' signature (module from sys.path or
    the current directory); it scores rollouts, and its 1.0 counts as correct in `accuracy` and `eval_accuracy`"""
    separate_value_model: bool = False
    """give the value head its own trunk, a copy of the warm-up model (the paper's ablation) instead of sharing"""
    temperature: float = 1.0
    """sampling temperature; the same value divides the logits in every forward feeding ratios and KL"""
    max_prompt_length: int = -1
    """longer prompts are dropped and counted; -1 = by model size: 96 small, 300 paper"""
    max_length: int = -1
    """prompt + generated tokens; -1 = by model size: 144 small (minigsm CoTs are ~20 tokens), 700 paper"""
    seed: int = 42
    """seed for data order and sampling; a question's sample depends on (seed, step, question), not on ranks"""
    resume: bool = False
    """continue the run in --output_dir from its newest intact resume state (checkpoint-STEP/), with the flags it
    last ran with: pass only --output_dir and --resume (a flag given too must be one of MAY_CHANGE, or equal the
    run's); with no resume state there, start at step 0"""
    overwrite: bool = False
    """start over in an --output_dir that holds a run, removing it (without --resume or --overwrite such a folder is
    refused)"""
    save_steps: int = 0
    """also write the resume state every this many steps (0: only at each epoch end and at the end). It holds fp32
    weights and AdamW's two moments, 12 bytes per parameter: 81 GB for a 7B model, each rank writing its shard"""
    save_epochs: str = "none"
    """which epochs get an HF checkpoint epoch_K/ (in the run's dtype): `all`, `none` or a list like `10,20`; a 7B
    one is 13.5 GB in bf16, so 300 epochs of them would be 4 TB (the paper keeps the best: --save_best)"""
    eval_every: int = -1
    """greedy accuracy on --eval_split every this many steps, the last one included only on its turn (0: never);
    -1 = by model size: 5 small, 50 paper"""
    eval_split: str = "validation"
    """split of --data for the periodic greedy evaluation (never pick settings on test)"""
    eval_data: str = ""
    """questions of the periodic evaluation from elsewhere: a prepared dataset or folder (its --eval_split) or a file
    (all of it); needed when --data is a file, which is training data only; not given: the --eval_split of --data"""
    eval_limit: int = 500
    """questions in each periodic evaluation (-1: all)"""
    eval_batch_size: int = 64
    """questions per generation batch of the periodic evaluation, on one process (its KV cache is the memory)"""
    save_best: bool = True
    """also keep the checkpoint with the best periodic evaluation as {output_dir}/best (paper: its reported model)"""
    gradient_checkpointing: bool = False
    """recompute activations in the PPO backward to save memory (7B models)"""
    compile: bool = False
    """compile the rollout's decode step (torch.compile: inductor on CPU, CUDA graphs on GPU) on a static KV cache of
    --max_length tokens. Costs one compile per process (15-35 s for the quickstart's model on 2 CPU cores), and every
    token's attention reads all --max_length slots; pays when responses fill most of --max_length over many steps
    (docs/performance.md). The samples are the eager sampler's where the compiled kernels round alike (fp32 CPU:
    all seen)"""
    lora_rank: int = 0
    """train LoRA adapters of this rank (Hu et al. 2022) on the attention and MLP projections (LORA_TARGETS) and the
    value head, the warm-up frozen (in bf16 on GPU); the reference is the policy with its adapters off, no second copy:
    ReFT of a 7B model on one 80 GB GPU (docs/scaling.md). The checkpoints stay merged HF ones, with the adapters in
    peft's format in their adapter/. 0 = full fine-tuning (paper)"""
    lora_alpha: float = 32.0
    """LoRA's α: the update B A is scaled by α / --lora_rank (verl's one-GPU 7B recipe: rank 32, α 32)"""
    log_every: int = 10
    """print a one-line summary of the metrics every this many steps (0: never)"""
    max_skipped_steps: int = 10
    """stop the run with an error after this many optimizer steps in a row skipped for a gradient norm that is not
    finite (NaN or inf in the loss; each is counted in skipped_steps); 0: never stop"""


# Flags a resumed run may change: how long, how often, in how much memory, how fast (plan_run).
MAY_CHANGE = ("output_dir", "resume", "overwrite", "epochs", "max_steps", "save_steps", "save_epochs", "save_best",
              "eval_every", "eval_batch_size", "micro_batch_size", "gradient_checkpointing", "log_every",
              "max_skipped_steps", "compile")
SIZED = "-1 (by model size) or "
RANGES = [("epochs", lambda v: v == -1 or v >= 1, SIZED + "at least 1"), ("batch_size", lambda v: v >= 1, "at least 1"),
          ("num_samples", lambda v: v == -1 or v >= 1, SIZED + "at least 1"),
          ("mini_batch_size", lambda v: v == -1 or v >= 1, "-1 (the whole batch) or at least 1"),
          ("micro_batch_size", lambda v: v >= 1, "at least 1"), ("ppo_epochs", lambda v: v >= 1, "at least 1"),
          ("lr", lambda v: v == -1 or v >= 0, SIZED + "at least 0"),
          ("kl_coef", lambda v: v == -1 or v >= 0, SIZED + "at least 0"),
          ("target_kl", lambda v: v > 0, "above 0"), ("gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
          ("lam", lambda v: v == -1 or 0 <= v <= 1, SIZED + "in [0, 1]"), ("clip_range", lambda v: v > 0, "above 0"),
          ("clip_range_high", lambda v: v == -1 or v > 0, "-1 (= --clip_range) or above 0"),
          ("clip_range_value", lambda v: v > 0, "above 0"),
          ("vf_coef", lambda v: v == -1 or v >= 0, SIZED + "at least 0"), ("temperature", lambda v: v > 0, "above 0"),
          ("max_prompt_length", lambda v: v == -1 or v >= 1, SIZED + "at least 1"),
          ("max_length", lambda v: v == -1 or v >= 2, SIZED + "at least 2"),
          ("save_steps", lambda v: v >= 0, "at least 0"), ("eval_every", lambda v: v >= -1, SIZED + "at least 0"),
          ("eval_limit", lambda v: v == -1 or v >= 1, "-1 (all) or at least 1"),
          ("eval_batch_size", lambda v: v >= 1, "at least 1"), ("log_every", lambda v: v >= 0, "at least 0"),
          ("max_skipped_steps", lambda v: v >= 0, "at least 0"),
          ("lora_rank", lambda v: v >= 0, "at least 0 (0: full fine-tuning)"),
          ("lora_alpha", lambda v: v > 0, "above 0")]

# What a flag left at -1 becomes, by the size of --model. A pretrained model (50 M parameters or more, or a hub id) gets
# the paper's code's values; a smaller one is the tiny Llama trained from scratch on minigsm, and gets the quickstart's
# (chosen on validation, docs/experiments.md), so that `python reft.py` after `python sft.py` is the quickstart's ReFT.
RECIPES = {"small": dict(lr=1e-4, kl_coef=0.05, vf_coef=0.1, lam=1.0, num_samples=4, epochs=4, max_prompt_length=96,
                         max_length=144, eval_every=5),
           "paper": dict(lr=3e-7, kl_coef={"nl": 0.05, "python": 0.01}, vf_coef=5.0, lam=0.95, num_samples=1,
                         epochs=300, max_prompt_length=300, max_length=700, eval_every=50)}
SMALL_MODEL = 50_000_000
# With --lora_rank, an --lr left at -1 is the recipe's × this: LoRA's few parameters need a larger step (verl's LoRA
# guide advises about 10× full fine-tuning's rate; at full fine-tuning's, users report LoRA learning little, TRL #2872).
LORA_LR_SCALE = 10


# ----------------------------------------------------------------------------- the PPO math
# Pure functions of their tensors, but for masked_whiten, whose statistics span all ranks (one all-reduce).

def logprobs_of(logits, tokens, temperature=1.0):
    """log π(a_t | s_t) of the taken tokens: log_softmax(logits / T) gathered at `tokens`. (B, R, V) -> (B, R)"""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (all of them, or along `dim`)."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over valid tokens of *all* ranks (one all-reduce of sum, sum of squares and count).

    Global statistics make N processes whiten exactly like one process holding the whole batch."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if dist.is_initialized():
        dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean * mean
    return ((x - mean) * torch.rsqrt(var + eps)).to(x.dtype) * mask


def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """Per-token reward with the KL penalty (Ziegler et al. 2019; Stiennon et al. 2020, eq. 2):

        r_t = -β (log π(a_t) - log π_ref(a_t))  + score · [t is the last response token]

    k1 estimator of the KL, as the paper's code. The score sits on the last valid action: the token that
    emits EOS, or the final token of a response that never ended. Either log-probs None (a forward skipped where
    β·KL_t is 0, forwards_to_run): KL_t = 0. Returns (rewards, kl) of shape (B, R)."""
    kl = torch.zeros_like(mask) if logprobs is None or ref_logprobs is None else (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.sum(1).long() - 1  # (B,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16), backwards over the response:

        δ_t = r_t + γ V_{t+1} - V_t,    A_t = δ_t + γ λ A_{t+1},    returns R_t = A_t + V_t

    The episode ends at the last valid token: V and A past it count as 0 (no bootstrap). All tensors are
    (B, R); mask is 1.0 on response tokens up to and including EOS. Returns (advantages, returns), both masked."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * mask


def group_sums(x, group):
    """Per row, the sum of x over the rows of its group (the same id) and their number. (B,), (B,) -> (B,), (B,)"""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    return sums[inverse], counts[inverse].to(x.dtype)


def grpo_advantages(rewards, group, mask, scale=True, eps=1e-4):
    """GRPO's outcome-supervised advantage (Shao et al. 2024, DeepSeekMath, sec. 4.1.2), on every response token:

        A_i = (r_i - mean(r_group)) / (std(r_group) + ε)       or, with scale=False (Dr. GRPO, Liu et al. 2025,
        A_i =  r_i - mean(r_group)                              sec. 3.1: the std division up-weights easy and hard
                                                                 questions, whose samples nearly agree)

    over the samples of one question: the rows with the same `group` id, at least 2, groups of any sizes. std with
    n - 1 and ε = 1e-4 as TRL's GRPOTrainer: a group whose rewards are all equal gets 0, not 0/0. (B,), (B,),
    (B, R) -> (B, R)"""
    total, n = group_sums(rewards, group)
    centred = rewards - total / n
    if not scale:
        return centred[:, None] * mask
    std = (group_sums(centred ** 2, group)[0] / (n - 1)).sqrt()
    return (centred / (std + eps))[:, None] * mask


def rloo_advantages(rewards, group, mask):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"), on every response token:

        A_i = r_i - 1/(k-1) Σ_{j≠i} r_j

    the baseline being the mean reward of the k - 1 other samples of the question (rows with the same `group` id,
    k ≥ 2, groups of any sizes). (B,), (B,), (B, R) -> (B, R)"""
    total, n = group_sums(rewards, group)
    return (rewards - (total - rewards) / (n - 1))[:, None] * mask


MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: a ratio beyond it is clipped by ε anyway; the bound only keeps exp() finite


def k3_kl(logprobs, ref_logprobs):
    """KL(π ‖ π_ref) per token for --kl_in_loss: k3 = π_ref/π - log(π_ref/π) - 1, unbiased and never negative
    (Schulman 2020, "Approximating KL divergence"; GRPO's eq. 4, Shao et al. 2024); the log bounded as in policy_loss.
    (B, R)"""
    log_ratio = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate_loss(losses, mask, how="seq_mean", n_seq=1, n_tokens=1, max_length=1):
    """Per-token losses l_it (B, R) -> per-sequence terms (B,) whose mean over the minibatch's N = n_seq sequences (all
    micro-batches of all ranks) is its loss under --loss_aggregation `how`, with |o_i| the valid tokens of sequence i:

        seq_mean:        L = 1/N Σ_i 1/|o_i| Σ_t l_it     the paper's code; GRPO (Shao et al. 2024, eq. 3): a long
                                                           and a short CoT weigh the same
        token_mean:      L = 1/T Σ_i Σ_t l_it,            DAPO's token-level loss (Yu et al. 2025, sec. 3.3;
                         T = Σ_i |o_i| = n_tokens          TRL GRPOTrainer loss_type="dapo"): every token weighs
                                                           the same
        token_sum_norm:  L = 1/(N L_max) Σ_i Σ_t l_it     Dr. GRPO (Liu et al. 2025, sec. 3.1): a constant
                         L_max = max_length                 instead of any length, so no length bias

    T must be the count over the whole minibatch (one all-reduce), not a micro-batch's or a rank's: only then is the
    gradient the same whatever --micro_batch_size and the number of processes."""
    if how == "seq_mean":
        return masked_mean(losses, mask, dim=1)
    return (losses * mask).sum(1) * (n_seq / n_tokens if how == "token_mean" else 1 / max_length)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range, clip_range_high=None, aggregation=None):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        L = max(-A r, -A clip(r, 1-ε, 1+ε_high)),   r = π(a_t) / π_old(a_t)

    ε_high = ε (None) as PPO; a larger one is DAPO's clip-higher (Yu et al. 2025, sec. 3.1), room for unlikely tokens
    to grow. Aggregated by aggregate_loss with the keywords `aggregation` (None: seq_mean, the paper's). Returns
    (loss per sequence (B,), clip fraction, approx KL ½E[(log r)²])."""
    clip_range_high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range_high))
    clipfrac = masked_mean(((ratio - 1 < -clip_range) | (ratio - 1 > clip_range_high)).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return aggregate_loss(losses, mask, **(aggregation or {})), clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip_range_value, aggregation=None):
    """Clipped value loss (as in PPO's reference code and the paper's):

        L_V = ½ max((V - R)², (V_old + clip(V - V_old, -ε_v, ε_v) - R)²)

    Aggregated as the policy loss. Returns (loss per sequence (B,), clip fraction)."""
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    losses = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)
    return aggregate_loss(losses, mask, **(aggregation or {})), clipfrac


def zero_variance_groups(scores, num_samples):
    """How many questions got the same score on all their samples: `scores` (b,) holds each question's num_samples
    samples in consecutive rows. Their advantage is 0 under GRPO and RLOO, so they teach nothing (DAPO's dynamic
    sampling drops them, Yu et al. 2025, sec. 3.2)."""
    per_question = scores.view(-1, num_samples)
    return (per_question == per_question[:, :1]).all(1).sum()


def adaptive_beta(beta, kl, target_kl, n_sequences, horizon=10_000):
    """Ziegler et al. 2019, sec. 2.2: a proportional controller on the KL coefficient,

        e = clip(KL / KL_target - 1, -0.2, 0.2),   β ← β (1 + K_β e n / horizon)

    with K_β = 1 and their horizon of 10,000 sequences: β moves by at most 20% per 10,000 sequences sampled."""
    return beta * (1 + max(-0.2, min(0.2, kl / target_kl - 1)) * n_sequences / horizon)


def explained_variance(err_sum, err_sq_sum, ret_sum, ret_sq_sum, n):
    """1 - Var(R - V) / Var(R) over n valid tokens, from sums; None when the returns do not vary (e.g. every score
    0 and no KL yet on the first step), where it is undefined. The sums are float32, so constant returns leave Var(R)
    a rounding residue of about 1e-7 of their second moment, not 0: a variance within 1e-6 of it counts as none
    (divided by the residue, the ratio came out as -4e13)."""
    var_ret = ret_sq_sum / n - (ret_sum / n) ** 2
    return 1 - (err_sq_sum / n - (err_sum / n) ** 2) / var_ret if var_ret > 1e-6 * ret_sq_sum / n else None


def response_mask(responses, eos_id):
    """1.0 on response tokens up to and including the first EOS (all tokens when there is none). (B, R)"""
    is_eos = (responses == eos_id).long()
    # cumsum counts the EOS tokens up to and including t; minus the token's own EOS, it counts those strictly before
    # t, so it is > 0 exactly after the first EOS. E.g. [5, 7, EOS, PAD] → is_eos [0, 0, 1, 0], cumsum [0, 0, 1, 1],
    # minus is_eos [0, 0, 0, 1] → mask [1, 1, 1, 0]: the EOS itself is an action (it carries the score).
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).float()


# ----------------------------------------------------------------------------- models

class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head Linear(hidden, 1) on the last hidden state of the shared trunk.

    With `critic` set, the values come from that separate trunk instead (the paper's ablation). A reference
    model is the same class without a head. forward() returns the logits and values of the response part only:
    position P-1+t predicts response token t, and V_t is read at the same position. Any decoder-only family works:
    the trunk is the LM's `base_model` (Llama's `model`, OPT's `model` with its `decoder`)."""

    def __init__(self, lm, value_head=True, critic=None):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.critic = critic
        self.v_head = nn.Linear(lm.config.hidden_size, 1) if value_head else None

    def forward(self, input_ids, attention_mask, prompt_len):
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: count real tokens only
        # The hidden state at position i predicts token i + 1. Response token t sits at position P + t, so its
        # logits (and the value of the state s_t it is chosen in) come from position P - 1 + t: the slice from P - 1
        # to the one before last (the last position predicts past the end). With P = 3, R = 2: positions 2 and 3.
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state[:, prompt_len - 1:-1]  # (B, R, H)
        logits = self.lm.get_output_embeddings()(h).float()  # (B, R, V); fp32 already: its own FSDP group
        if self.v_head is None:
            return logits, None
        if self.critic is not None:
            h = self.critic(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state[:, prompt_len - 1:-1]
        return logits, self.v_head(h.float()).squeeze(-1).clone()  # (B, R); clone: FSDP2 dislikes views


@contextmanager
def adapters_off(model):
    """The policy without its LoRA adapters (each LoRALinear's h = W x): with the warm-up frozen under them, exactly the
    warm-up, so it is the KL reference with --lora_rank, at no memory (TRL's and verl's reference with LoRA too). A
    warm-up trained with LoRA was merged into its weights when sft.py saved it: it is still the warm-up."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def without_dropout(config):
    """The config with every dropout probability at 0, before the model is built from it: rollout, old, new and
    reference log-probs must come from one function, or the first PPO ratio is not 1 and clipping acts on noise.
    Zeroing nn.Dropout modules afterwards is not enough: OPT/Galactica (dropout 0.1, LayerDrop) and Llama's
    attention_dropout apply it inside their layer code from values copied out of the config."""
    for k, v in vars(config).items():
        if "drop" in k and isinstance(v, float):
            setattr(config, k, 0.0)
    return config


class RolloutCacheLayer(DynamicLayer):
    """One layer's KV cache with room for a whole rollout, allocated at the prompt: each token's keys and values are
    written in place, where DynamicLayer torch.cat's the whole cache every token (at 7B width, batch 64 and 1,000
    tokens, that copy reads and writes 2.1 GB per layer per token, five times the layer's weights). Attention gets the
    filled prefix: the values and shapes DynamicLayer would hand it, so the samples do not change."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states, value_states, *args, **kwargs):  # (B, H, T, D) each
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            B, H = key_states.shape[:2]
            self.room = [x.new_empty(B, H, self.capacity, x.size(-1)) for x in (key_states, value_states)]
        n, T = self.get_seq_length(), key_states.size(-2)
        self.room[0][:, :, n:n + T] = key_states
        self.room[1][:, :, n:n + T] = value_states
        self.keys, self.values = self.room[0][:, :, :n + T], self.room[1][:, :, :n + T]  # (B, H, n + T, D)
        return self.keys, self.values


SPLITMIX64 = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # increment, then the two multipliers


def i64(x):
    """The int64 with the same low 64 bits as the integer x: torch has no uint64 arithmetic."""
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def row_uniforms(seeds, t):
    """u_b ~ U[0, 1) for token t of every row: the (t+1)-th output of SplitMix64 (Steele et al. 2014) started at the
    row's seed, for the whole batch in one vectorised computation. A counter-based generator: u depends only on
    (seeds[b], t), never on the other rows or on earlier draws. int64 arithmetic wraps like the uint64 original;
    `>>` on int64 copies the sign bit, so each shift masks it off. (B,) int64 -> (B,) float64"""
    def shr(z, k):
        return (z >> k) & ((1 << (64 - k)) - 1)
    z = seeds + i64(SPLITMIX64[0] * (t + 1))
    z = (z ^ shr(z, 30)) * i64(SPLITMIX64[1])
    z = (z ^ shr(z, 27)) * i64(SPLITMIX64[2])
    return shr(z ^ shr(z, 31), 11).double() * 2.0 ** -53  # the top 53 bits: a double's mantissa


def inverse_cdf(logits, u):
    """The token whose interval of softmax(logits)'s CDF holds u: an exact sample of softmax(logits) for u ~ U[0, 1)
    (inverse-transform sampling, as torch.multinomial). float64, so rounding shifts no interval by more than ~1e-16.
    (B, V), (B,) -> (B,)"""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)  # (B, V)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.size(1) - 1)


def decode_step(lm, inp, mask, pos, past):
    """One forward of the newest columns against the KV cache `past`: the next token's logits. (B, T) -> (B, V)"""
    return lm(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=past,
              use_cache=True).logits[:, -1].float()


@functools.cache
def compiled_decode_step(device_type):
    """decode_step compiled (--compile), made once per process so that every rollout reuses its graphs. Static shapes:
    one graph per (batch, cache capacity), reused by every token and rollout. On CUDA, CUDA graphs replay the whole
    step in one launch (mode="reduce-overhead"); on CPU, inductor's fused kernels."""
    return torch.compile(decode_step, dynamic=False, mode="reduce-overhead" if device_type == "cuda" else None)


@contextmanager
def without_fsdp_hooks(lm):
    """lm's modules without FSDP2's forward hooks, the others (reft's fp32 casts of the heads' inputs) kept in order.
    torch.compile does not trace FSDP2's hooks (they are dynamo-disabled): each FSDP block would be a graph of its
    own, recompiled per layer index. Inside gathered_for_generation they have nothing to do in a no-grad forward: the
    parameters are gathered and stay so, and the forward order they record is cleared at its end."""
    def fsdp(hook):
        return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")
    mods = [m for m in lm.modules() if isinstance(m, FSDPModule)]
    saved = [(m._forward_pre_hooks, m._forward_hooks) for m in mods]
    for m, (pre, post) in zip(mods, saved):
        m._forward_pre_hooks = type(pre)((k, h) for k, h in pre.items() if not fsdp(h))
        m._forward_hooks = type(post)((k, h) for k, h in post.items() if not fsdp(h))
    try:
        yield
    finally:
        for m, (pre, post) in zip(mods, saved):
            m._forward_pre_hooks, m._forward_hooks = pre, post


@torch.no_grad()
def sample(lm, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, seeds, compiled=False):
    """Sample responses token by token with a KV cache (temperature 0 = greedy). (B, P) -> (B, R)

    Row b's token t is inverse_cdf(logits / T, row_uniforms(seeds[b], t)): a function of its own seed only, so a
    question's sample does not depend on which batch or rank it is in: 1 and N processes see the same rollouts, and
    a resumed run repeats them. Stops when all rows ended. `compiled` (--compile): tokens after the first come from
    compiled_decode_step on a static cache, one shape for all of them (same tokens where the rounding allows); an
    FSDP2-sharded lm must be gathered (gathered_for_generation), as its hooks are off in that step."""
    (B, P), device = prompt_ids.shape, prompt_ids.device
    # Not one generator for the batch: its draws for row b would depend on how many rows come before b (batch order,
    # rank), so the same question would get another sample on 2 processes. Nor one generator per row: B calls a token.
    seeds = torch.tensor([i64(int(s)) for s in seeds], device=device)  # (B,) int64
    L = P + max_new_tokens - 1  # the last token is never fed back
    # The static cache hands attention all L slots, the unfilled ones hidden by the causal mask (its query offset is
    # the cache's fill, a tensor): every decode step has the same shapes, where RolloutCacheLayer's grow.
    past = Cache(layers=[(StaticLayer if compiled else RolloutCacheLayer)(L)
                         for _ in range(lm.config.num_hidden_layers)])
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, L - P)], 1)  # (B, L); step t attends to its first P + t
    inp, pos = prompt_ids, (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = prompt_ids.new_full((B, max_new_tokens), pad_id)  # (B, R)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        if compiled and t:
            with without_fsdp_hooks(lm):
                logits = compiled_decode_step(device.type)(lm, inp, mask, pos, past)  # (B, V)
        elif compiled:  # the prefill stays eager: its shape changes with the prompts
            logits = decode_step(lm, inp, mask, pos, past)  # (B, V)
        else:
            logits = decode_step(lm, inp, mask[:, :P + t], pos, past)  # (B, V)
        nxt = inverse_cdf(logits / temperature, row_uniforms(seeds, t)) if temperature > 0 else logits.argmax(-1)
        out[:, t] = torch.where(done, pad_id, nxt)
        done |= out[:, t] == eos_id
        # Asking whether all rows ended waits for the device: ask every 8 tokens, and cut the PAD columns drawn
        # past the last row's EOS below.
        if t % 8 == 7 and done.all():
            break
        inp, pos = out[:, t:t + 1].contiguous(), pos[:, -1:] + 1  # contiguous: a static stride, whatever R
    if done.all():  # end at the token where the last row ended: the first EOS of each row, at its latest
        return out[:, :int((out == eos_id).int().argmax(1).max()) + 1]
    return out


# ----------------------------------------------------------------------------- the pieces of one step

def left_pad(seqs, pad_id, device):
    """Left-pad token lists into (B, P) ids and mask, so every prompt ends at column P-1."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s)
    return ids.to(device), (ids != pad_id).long().to(device)


def global_sums(xs, device):
    """Sum scalars over ranks with one all-reduce; returns Python floats."""
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rollout_seeds(seed, step, question_ids, num_samples):
    """One 64-bit sampling seed per (question, sample) of this step, independent of ranks, batch order and
    --num_samples (sample s's seed is the s-th word of its question's stream). numpy's SeedSequence hashes (seed, step,
    question) into a stream of its own, so two streams share a seed with probability ~2⁻⁶⁴ per pair, at any step count
    or dataset size; an arithmetic mix like (seed·p + step)·p + 101·q + s collides once 101·q + s reaches p."""
    return [int(x) for q in question_ids
            for x in np.random.SeedSequence([seed, step, q]).generate_state(num_samples, np.uint64)]


@dataclass(frozen=True)
class Rollout:
    """Step 1's samples on this rank: b = its questions × --num_samples sequences of P prompt + R response columns."""
    rows: list                # (b,) each sequence's question, an index into the training questions
    input_ids: torch.Tensor   # (b, P + R) the left-padded prompt, then the response with PAD after its first EOS
    attn: torch.Tensor        # (b, P + R) 1 on the prompt's tokens and on the response up to and including EOS
    P: int                    # prompt columns: response token t sits at column P + t
    responses: torch.Tensor   # (b, R) = input_ids[:, P:]
    mask: torch.Tensor        # (b, R) float, 1 on the response up to and including EOS: the actions
    ended: torch.Tensor       # (b,) bool, whether the response emitted EOS within --max_length


@dataclass(frozen=True)
class Forwards:
    """Step 3: the rollout's per-token quantities before any update, without gradients. (b, R) each; None where the
    forward did not run (forwards_to_run): ppo_update returns them with the old log-probs and entropy filled in."""
    old_logprobs: torch.Tensor | None  # log π_θold(a_t | s_t): the policy that sampled, the PPO ratio's denominator
    old_values: torch.Tensor | None  # V(s_t) of the value head; None without one (GRPO, RLOO)
    ref_logprobs: torch.Tensor | None  # log π_ref(a_t | s_t) of the frozen warm-up model
    entropy: torch.Tensor | None       # the policy's entropy per token (logged only)


@torch.no_grad()
def rollout_forwards(model, ref, rollout, micro_batch_size, temperature, policy=True, reference=True):
    """Step 3 of Algorithm 1, micro-batch by micro-batch: the policy's log-probs and values and the reference's
    log-probs of the sampled responses, and the policy's entropy per token (Forwards); each forward only where
    `policy` and `reference` ask for it (forwards_to_run). `ref` None: the reference is the policy with its LoRA
    adapters off (adapters_off).

    The policy's log-probs take exactly the steps of logprobs_of, which the PPO update uses, so the first ratio is
    exactly 1; the entropy reuses that log-softmax instead of computing a second one over the vocabulary."""
    old_logprobs, values, ref_logprobs, entropy = [], [], [], []
    for s in range(0, len(rollout.rows), micro_batch_size):
        ids, attn, responses = (x[s:s + micro_batch_size] for x in (rollout.input_ids, rollout.attn, rollout.responses))
        if policy:
            logits, v = model(ids, attn, rollout.P)  # (m, R, V), (m, R)
            logp = torch.log_softmax(logits.float() / temperature, -1)
            old_logprobs.append(logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1))
            entropy.append(-(logp.exp() * logp).sum(-1))
            values.append(v)
        if reference:
            with adapters_off(model) if ref is None else nullcontext():
                ref_logits, _ = (model if ref is None else ref)(ids, attn, rollout.P)
            ref_logprobs.append(logprobs_of(ref_logits, responses, temperature))
    return Forwards(*(None if not x or x[0] is None else torch.cat(x)
                      for x in (old_logprobs, values, ref_logprobs, entropy)))


def clipped_step(model, opt):
    """Clip the gradient norm to 1 and take the optimizer step, unless the norm is not finite: one bad minibatch must
    not poison the weights (every rank sees the same norm). Returns whether it stepped."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return finite


def count_skipped(skipped, skipped_in_a_row, stepped, step, args):
    """The counts of optimizer steps skipped (clipped_step), in all and in a row, after this step's `stepped`; stops
    the run after --max_skipped_steps of them in a row: a gradient that is never finite would otherwise burn days of
    GPU time, only skipped_steps growing. Every rank sees the same norms, so every rank stops."""
    for s in stepped:
        skipped += not s
        skipped_in_a_row = 0 if s else skipped_in_a_row + 1
        if 0 < args.max_skipped_steps <= skipped_in_a_row:
            raise SystemExit(f"error: step {step + 1}: {skipped_in_a_row} optimizer steps in a row skipped "
                             f"(--max_skipped_steps {args.max_skipped_steps}), {skipped} in all: the gradient norm is "
                             f"not finite, NaN or inf in the loss. Likely causes: fully masked attention rows on GPU, "
                             f"a learning rate too high, bf16 overflow")
    return skipped, skipped_in_a_row


def gold_example(tok, record, cot):
    """(ids, n_prompt) of a question's gold CoT + EOS, tokenized as sft.py's encode_example does it (one string through
    reward.encode_sft_example), so that Online-ST's gold half is SFT's loss on the same tokens."""
    ids, n_prompt = reward.encode_sft_example(tok, reward.build_prompt(record["question"], cot),
                                              reward.build_target(record, cot))
    return ids + [tok.eos_token_id], n_prompt


def online_st_examples(gold, prompts, rows, responses, mask, scores):
    """Online-ST's training examples: per row (its question's gold CoT, its sample), each (ids, n_prompt); the sample
    is the prompt + the response up to and including EOS, and None unless it scored 1 (correct: the paper trains on
    correct samples only, so a wrong answer's partial reward of 0.1 must not count)."""
    return [(gold[q], (prompts[q] + responses[b, :int(mask[b].sum())].tolist(), len(prompts[q]))
             if scores[b] == 1.0 else None) for b, q in enumerate(rows)]


def sequence_nll(model, examples, pad_id, device):
    """Σ -log π(token) over each example's tokens after its first n_prompt, at temperature 1 as in SFT: examples
    (ids, n_prompt) left-padded into one forward. (n,)"""
    ids, attn = left_pad([e for e, _ in examples], pad_id, device)  # (n, T)
    logits, _ = model(ids, attn, 1)  # (n, T-1, V): column c predicts ids[:, c + 1]
    first = torch.tensor([ids.size(1) - len(e) + k for e, k in examples], device=device)  # first target column
    target = (torch.arange(1, ids.size(1), device=device)[None] >= first[:, None]).float()  # (n, T-1)
    return -(logprobs_of(logits, ids[:, 1:]) * target).sum(1)


def online_st_update(model, opt, examples, pad_id, mini, world, step, args, device):
    """The paper's online self-training (its train_rl_sl.py) instead of PPO's steps 3-6: per minibatch of rows, a step

        L = ½ NLL(the rows' sampled CoTs that scored 1) + ½ NLL(the rows' gold CoTs)

    each NLL a mean over its target tokens on all ranks, so N processes take one process's step; without a correct
    sample, the gold half alone (as the paper's code). `examples`: per row (gold, sample), each (ids, n_prompt), the
    sample None unless it scored 1. Minibatches and micro-batches are PPO's (ppo_update); a micro-batch of rows is one
    forward of both (≤ 2 × --micro_batch_size sequences), so every rank runs as many forwards, as FSDP needs. Returns
    (its mean loss, whether each optimizer step stepped)."""
    model.train()
    loss_sum, stepped = 0.0, []
    for epoch in range(args.ppo_epochs):
        seed = args.seed + step * 1000 + epoch  # as ppo_update's
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(examples), mini // world):
            micro_batches = order[start:start + mini // world].split(args.micro_batch_size)
            rows = [examples[i] for i in torch.cat(micro_batches).tolist()]
            n_tokens = global_sums([sum(len(r[h][0]) - r[h][1] for r in rows if r[h] is not None) for h in (0, 1)],
                                   device)
            weights = [0.5 * world / max(n, 1.0) for n in n_tokens]  # × world: FSDP averages gradients over ranks
            for idx in micro_batches:
                batch = [(e, weights[h]) for i in idx.tolist() for h, e in enumerate(examples[i]) if e is not None]
                nll = sequence_nll(model, [e for e, _ in batch], pad_id, device)
                loss = (nll * torch.tensor([w for _, w in batch], device=device)).sum()
                loss.backward()
                loss_sum += loss.item()
            stepped.append(clipped_step(model, opt))
    # step_metrics sums over ranks and divides by world: the mean loss
    return {"loss": [loss_sum / len(stepped)]}, stepped


def step_metrics(scores, no_answer, kl, entropy, mask, ended, returns, old_values, stats, world, device, num_samples):
    """The logged means of one step over all ranks' sequences and tokens, from one all-reduce of sums. `stats`
    holds this rank's per-micro-batch losses; every rank runs as many micro-batches, so their mean of means is
    the mean over the step. `no_answer` (b,) flags the sequences without an extractable answer, so that
    "unparseable" is told apart from "wrong" whatever --reward gives them. Metrics of what a variant lacks are
    absent: KL without a reference forward (Online-ST; β = 0, forwards_to_run), entropy without PPO, the values'
    explained variance without GAE's returns, the fraction of questions whose samples all scored alike
    (zero_variance_groups) with one sample per question."""
    sums = dict(n=len(scores), score=scores.sum(), correct=(scores == 1.0).sum(), no_answer=no_answer.sum(),
                tokens=mask.sum(), ended=ended.sum(), **{k: sum(v) / len(v) for k, v in stats.items()})
    if num_samples >= 2:
        sums["zero_variance"] = zero_variance_groups(scores, num_samples)
    if kl is not None:
        sums["kl"] = kl.sum()
    if entropy is not None:
        sums["entropy"] = masked_mean(entropy, mask, 1).sum()
    if returns is not None:
        sums.update(err=((returns - old_values) * mask).sum(), err2=((returns - old_values) ** 2 * mask).sum(),
                    ret=returns.sum(), ret2=(returns ** 2).sum())
    t = dict(zip(sums, global_sums(sums.values(), device)))
    n = t["n"]
    m = dict(score=t["score"] / n, accuracy=t["correct"] / n, no_answer=t["no_answer"] / n,
             **{k: t[k] / n for k in ("kl", "entropy") if k in t}, response_length=t["tokens"] / n,
             eos_fraction=t["ended"] / n, tokens=t["tokens"])
    if num_samples >= 2:
        m["zero_variance_groups"] = t["zero_variance"] * num_samples / n
    if returns is not None:
        m["explained_variance"] = explained_variance(t["err"], t["err2"], t["ret"], t["ret2"], t["tokens"])
    return dict(m, **{k: t[k] / world for k in stats})


def greedy_budget(tok, records, args):
    """New tokens for every question of a greedy evaluation: --max_length minus the longest of their prompts.

    One budget for all: set by each batch's longest prompt, as a rollout's is, it would make a question's answer
    depend on its batch, so on the number of ranks. `evaluate.py --max_new_tokens` with it gives the same answers."""
    budget = args.max_length - max(len(reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot,
                                                                                      sampling=True))) for r in records)
    if budget < 1:
        raise SystemExit(f"error: --max_length {args.max_length} leaves no room to generate after the longest "
                         f"--eval_split {args.eval_split} prompt")
    return budget


# ----------------------------------------------------------------------------- the method's decisions and steps

def check_variants(args):
    """Which variants combine: each check is one error line, before any model loads."""
    if args.advantage != "gae" and args.num_samples < 2:
        raise SystemExit(f"error: --advantage {args.advantage} compares the samples of a question: it needs "
                         f"--num_samples 2 or more (a group of one has no baseline)")
    if args.scale_rewards != "group" and args.advantage != "grpo":
        raise SystemExit("error: --scale_rewards is GRPO's option: it needs --advantage grpo")
    if args.separate_value_model and (args.advantage != "gae" or args.objective != "ppo"):
        raise SystemExit("error: --separate_value_model needs a value head: --advantage gae and --objective ppo")
    if args.objective == "online_st" and (args.advantage != "gae" or args.kl_in_loss or args.adaptive_kl):
        raise SystemExit("error: --objective online_st has no advantages and no KL: drop --advantage, --kl_in_loss "
                         "and --adaptive_kl")
    if args.lora_rank and args.separate_value_model:
        raise SystemExit("error: --separate_value_model trains a second full trunk: it needs full fine-tuning, "
                         "without --lora_rank")
    if args.objective == "online_st" and (args.loss_aggregation != "seq_mean" or args.clip_range_high >= 0):
        raise SystemExit("error: --loss_aggregation and --clip_range_high shape PPO's loss: --objective online_st has "
                         "its own (½ NLL of correct samples + ½ NLL of gold CoTs, each a token mean)")


def minibatch_size(args, world):
    """Sequences per optimizer step on all ranks: --mini_batch_size, or (-1) the whole rollout batch of --batch_size
    questions × --num_samples. A rank samples --batch_size / world questions and takes minibatch / world of its own
    sequences per optimizer step, so each size must split evenly over the processes."""
    n_seq = args.batch_size * args.num_samples  # sequences per rollout batch, all ranks
    mini = n_seq if args.mini_batch_size <= 0 else args.mini_batch_size
    if args.batch_size % world or n_seq % mini or mini % world:
        raise SystemExit(f"error: --batch_size {args.batch_size} × --num_samples {args.num_samples} must split "
                         f"into minibatches of {mini}, each divisible by the {world} processes")
    return mini


def training_prompts(tok, records, args, log):
    """The training questions and their rollout prompts (token ids), without the questions whose prompt is longer
    than --max_prompt_length (dropped and counted, as the paper's code does)."""
    prompts = [reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot, sampling=True)) for r in records]
    keep = [i for i, p in enumerate(prompts) if len(p) <= args.max_prompt_length]
    log(f"data: {len(records)} questions from {args.data}, {len(records) - len(keep)} dropped as prompts longer "
        f"than --max_prompt_length {args.max_prompt_length}")
    records, prompts = [records[i] for i in keep], [prompts[i] for i in keep]
    if len(records) < args.batch_size:
        raise SystemExit(f"error: {len(records)} questions are fewer than one --batch_size {args.batch_size}")
    if max(len(p) for p in prompts) >= args.max_length:
        raise SystemExit(f"error: --max_length {args.max_length} leaves no room to generate after the longest "
                         f"training prompt ({max(len(p) for p in prompts)} tokens; see --max_prompt_length)")
    return records, prompts


def step_questions(n_questions, epoch, i, args):
    """The questions of step i of an epoch (all ranks): the epoch's order depends only on (seed, epoch), so a resumed
    run sees the same batches."""
    order = torch.randperm(n_questions, generator=torch.Generator().manual_seed(args.seed + epoch))
    return order[i * args.batch_size:(i + 1) * args.batch_size].tolist()


def sample_rollout(model, tok, prompts, qids, step, args, device):
    """Step 1, e' ~ π_θ(x): --num_samples CoTs per question from the current policy, up to --max_length tokens with the
    prompt, each row with its own seed (rollout_seeds). Returns the Rollout."""
    rows = [q for q in qids for _ in range(args.num_samples)]  # this rank's sequences
    model.eval()
    prompt_ids, prompt_mask = left_pad([prompts[q] for q in rows], tok.pad_token_id, device)  # (b, P)
    P = prompt_ids.size(1)
    with gathered_for_generation(model):
        responses = sample(model.lm, prompt_ids, prompt_mask, args.max_length - P, tok.eos_token_id, tok.pad_token_id,
                           args.temperature, rollout_seeds(args.seed, step, qids, args.num_samples),
                           args.compile)  # (b, R); its cache holds P + R - 1 = --max_length - 1: one compiled shape
    mask = response_mask(responses, tok.eos_token_id)  # (b, R)
    responses = torch.where(mask.bool(), responses, tok.pad_token_id)
    return Rollout(rows=rows, input_ids=torch.cat([prompt_ids, responses], 1),
                   attn=torch.cat([prompt_mask, mask.long()], 1), P=P, responses=responses, mask=mask,
                   ended=(responses == tok.eos_token_id).any(1))


def score(tok, reward_fn, records, rollout, args):
    """Step 2, y' = EXTRACT(e') and its reward: programs run in the sandbox pool, --reward compares the answer with the
    gold one (reward.py's: 1 right, 0.1 wrong, 0 none). Returns (scores (b,), no_answer (b,): 1.0 where no answer was
    extracted)."""
    texts = tok.batch_decode(rollout.responses, skip_special_tokens=True)
    answers = reward.extract_answers(texts, args.cot, [records[q]["question"] for q in rollout.rows])
    scores = torch.tensor(reward.score_completions(reward_fn, texts, answers, [records[q] for q in rollout.rows],
                                                   args.cot, args.partial_reward), device=rollout.mask.device)
    return scores, torch.tensor([a is None for a in answers], dtype=torch.float32, device=rollout.mask.device)


def estimate_advantages(rewards, old_values, rollout, args):
    """Step 5, from the total reward r_t (b, R): GAE's advantages Â_t (whitened over all ranks) and returns R̂_t on
    the value head; or GRPO's or RLOO's of each sequence's summed reward (as TRL's RLOOTrainer), with no all-reduce (a
    rank holds all samples of its questions), no whitening (GRPO normalises; RLOO stays in reward units, as TRL) and
    no returns (no value head). Returns (advantages (b, R), returns (b, R) or None)."""
    if args.advantage == "gae":
        advantages, returns = compute_gae(rewards, old_values, rollout.mask, args.gamma, args.lam)
        return masked_whiten(advantages, rollout.mask), returns
    group = torch.tensor(rollout.rows, device=rewards.device)
    if args.advantage == "grpo":
        return grpo_advantages(rewards.sum(1), group, rollout.mask, args.scale_rewards == "group"), None
    return rloo_advantages(rewards.sum(1), group, rollout.mask), None


def ppo_update(model, opt, rollout, forwards, advantages, returns, beta, mini, step, args):
    """Step 6, the U updates of L_RL = L_policy + α·L_value (+ β·KL with --kl_in_loss): --ppo_epochs passes over this
    rank's rollout, each in an order of its own seed per (step, pass) so that a resumed run repeats it; per minibatch
    of `mini` sequences (all ranks: mini / world of them here) one clipped optimizer step, the gradient accumulated
    over micro-batches of --micro_batch_size. Where rollout_forwards skipped the policy's forward (forwards_to_run),
    the first forward of each micro-batch still sees the weights that sampled: its log-probs and entropy, detached,
    are the old ones, so the first ratio is exactly 1 as before. Returns (the micro-batches' losses, whether each
    optimizer step stepped, `forwards` with the old log-probs and entropy filled in)."""
    world, device = dist.get_world_size(), rollout.mask.device
    old_logprobs, entropy = forwards.old_logprobs, forwards.entropy
    fill = old_logprobs is None
    if fill:
        old_logprobs, entropy = torch.empty_like(rollout.mask), torch.empty_like(rollout.mask)
    aggregation = dict(how=args.loss_aggregation, n_seq=mini, max_length=args.max_length)
    clip_range_high = args.clip_range if args.clip_range_high < 0 else args.clip_range_high
    model.train()
    stats, stepped = {}, []
    for epoch in range(args.ppo_epochs):
        seed = args.seed + step * 1000 + epoch  # 1000 > --ppo_epochs: one order per (step, pass)
        order = torch.randperm(len(rollout.rows), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(order), mini // world):
            micro_batches = order[start:start + mini // world].split(args.micro_batch_size)
            if args.loss_aggregation == "token_mean":  # the count of the whole minibatch, on all ranks: one all-reduce
                aggregation["n_tokens"] = global_sums([rollout.mask[torch.cat(micro_batches)].sum()], device)[0]
            for idx in micro_batches:
                logits, values = model(rollout.input_ids[idx], rollout.attn[idx], rollout.P)
                logp = torch.log_softmax(logits.float() / args.temperature, -1)  # logprobs_of's steps, kept for fill
                logprobs = logp.gather(-1, rollout.responses[idx].unsqueeze(-1)).squeeze(-1)
                if fill:
                    old_logprobs[idx] = logprobs.detach()
                    entropy[idx] = -(logp.detach().exp() * logp.detach()).sum(-1)
                mask, old = rollout.mask[idx], old_logprobs[idx]
                pg, pg_clip, approx_kl = policy_loss(logprobs, old, advantages[idx], mask, args.clip_range,
                                                     clip_range_high, aggregation)
                loss, st = pg, dict(pg_loss=pg.mean(), pg_clipfrac=pg_clip, approx_kl=approx_kl,
                                    ratio=masked_mean(torch.exp(logprobs - old), mask))
                if values is not None:  # GAE's value head
                    vf, vf_clip = value_loss(values, forwards.old_values[idx], returns[idx], mask,
                                             args.clip_range_value, aggregation)
                    loss = loss + args.vf_coef * vf
                    st.update(vf_loss=vf.mean(), vf_clipfrac=vf_clip)
                if args.kl_in_loss:  # aggregated as the policy loss
                    kl_loss = aggregate_loss(k3_kl(logprobs, forwards.ref_logprobs[idx]), mask, **aggregation)
                    loss = loss + beta * kl_loss
                    st.update(kl_loss=kl_loss.mean())
                # `loss` holds per-sequence terms whose mean over the minibatch's `mini` sequences on all ranks is its
                # loss (aggregate_loss); this rank holds mini / world of them and FSDP averages the ranks' gradients
                # (÷ world), so × world / mini: with mini 8 on 2 ranks each sums its 4 terms × 2 / 8, and the average
                # over ranks is the mean of all 8, as 1 process would take it. FSDP2 keeps the gradient sharded.
                (loss.sum() * world / mini).backward()
                for k, v in st.items():
                    stats.setdefault(k, []).append(v.item())
            stepped.append(clipped_step(model, opt))
        fill = False
    return stats, stepped, dataclasses.replace(forwards, old_logprobs=old_logprobs, entropy=entropy)


def forwards_to_run(args, mini, beta):
    """Which of step 3's no-grad forwards run: (the policy's, the reference's). The policy's is known without running
    it with one PPO epoch over one minibatch of the whole rollout and advantages that need neither its values nor its
    log-probs (GRPO or RLOO with β·KL in the loss or β = 0): each micro-batch's first forward in ppo_update then sees
    the weights that sampled, and its log-probs, detached, are the old ones (TRL's GRPOTrainer skips it so too). GAE's
    advantages need the old values before any update. The reference's is unused with β = 0, no --kl_in_loss and no
    --adaptive_kl (which steers β by the KL)."""
    one_update = args.ppo_epochs == 1 and mini == args.batch_size * args.num_samples
    policy = not (one_update and args.advantage != "gae" and (args.kl_in_loss or beta == 0))
    return policy, args.kl_in_loss or args.adaptive_kl or beta > 0


def step_log(rollout, scores, no_answer, forwards, returns, stats, beta, skipped, times, args):
    """The step's metrics: means over all ranks' sequences and tokens (step_metrics), β, the first ratio, the optimizer
    steps skipped so far, the seconds of each phase. `forwards` (as ppo_update returns them) and `returns` are
    None where the variant has none (Online-ST; returns without GAE); the KL, log π_old - log π_ref, is logged where
    the reference's forward ran."""
    t0, t1, t2, t3 = times
    entropy, old_values, kl = None, None, None
    if forwards is not None:
        entropy, old_values = forwards.entropy, forwards.old_values
        if forwards.ref_logprobs is not None:
            kl = (forwards.old_logprobs - forwards.ref_logprobs) * rollout.mask  # as kl_shaped_rewards
    m = step_metrics(scores, no_answer, kl, entropy, rollout.mask, rollout.ended, returns, old_values, stats,
                     dist.get_world_size(), rollout.mask.device, args.num_samples)
    if args.objective == "ppo":
        m.update({} if args.kl_in_loss or "kl" not in m else {"kl_penalty": -beta * m["kl"]}, beta=beta,
                 ratio_first=stats["ratio"][0])
    m.update(skipped_steps=skipped, tokens_per_s=m.pop("tokens") / (t1 - t0), time_generation=t1 - t0,
             time_scoring=t2 - t1, time_training=t3 - t2)
    return m


def main(args):
    reward_fn, flags, recipe = check_flags(args)  # the flags, --reward, --model; fills the flags at -1 (RECIPES)
    check_variants(args)
    records, eval_records, resuming = check_data(args, flags)  # the questions, the run folder: before any model loads
    rank, world, device, mesh = init_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"recipe: {recipe}")
    mini = minibatch_size(args, world)  # sequences per optimizer step, all ranks
    tok = load_tokenizer(args)
    records, prompts = training_prompts(tok, records, args, log)
    gold = [gold_example(tok, r, args.cot) for r in records] if args.objective == "online_st" else None
    steps_per_epoch = len(records) // args.batch_size
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs
    eval_budget = greedy_budget(tok, eval_records, args) if eval_records is not None else None
    model, ref, opt = load_run(args, flags, resuming, prompts[0], world, mesh, device, log)  # and the run folder
    # The loop state; β is --kl_coef (by model size and --cot, RECIPES) until --adaptive_kl moves it.
    step, beta, skipped, skipped_in_a_row, best = 0, args.kl_coef, 0, 0, -1.0
    if resuming:
        step, beta, skipped, best = resume(model, opt, args, rank)
    bar = tqdm(total=total_steps, initial=step, desc="reft", disable=rank != 0)
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        # Dealt out round-robin: a rank holds all samples of its questions (the groups GRPO and RLOO compare).
        qids = step_questions(len(records), epoch, i, args)[rank::world]
        t0 = time.time()
        rollout = sample_rollout(model, tok, prompts, qids, step, args, device)  # e' ~ π_θ(x)
        t1 = time.time()
        scores, no_answer = score(tok, reward_fn, records, rollout, args)  # y' = EXTRACT(e'): 1 right, 0.1 wrong, 0
        t2 = time.time()
        if args.objective == "online_st":  # the paper's baseline: NLL on the correct samples and gold CoTs, no PPO
            forwards = returns = None
            examples = online_st_examples(gold, prompts, rollout.rows, rollout.responses, rollout.mask, scores)
            stats, stepped = online_st_update(model, opt, examples, tok.pad_token_id, mini, world, step, args, device)
        else:
            # π_θold ← π_θ: old log-probs and values; the reference's log-probs; each if needed (forwards_to_run).
            forwards = rollout_forwards(model, ref, rollout, args.micro_batch_size, args.temperature,
                                        *forwards_to_run(args, mini, beta))
            # r_t = score · [t is last] - β·KL_t; with --kl_in_loss the KL is in the loss instead.
            rewards, _ = kl_shaped_rewards(scores, forwards.old_logprobs, forwards.ref_logprobs, rollout.mask,
                                           0.0 if args.kl_in_loss else beta)
            advantages, returns = estimate_advantages(rewards, forwards.old_values, rollout, args)
            stats, stepped, forwards = ppo_update(model, opt, rollout, forwards, advantages, returns, beta, mini,
                                                  step, args)
        t3 = time.time()
        skipped, skipped_in_a_row = count_skipped(skipped, skipped_in_a_row, stepped, step, args)
        m = dict(step=step + 1, epoch=epoch + (i + 1) / steps_per_epoch, **step_log(
            rollout, scores, no_answer, forwards, returns, stats, beta, skipped, (t0, t1, t2, t3), args))
        if args.adaptive_kl:
            beta = adaptive_beta(beta, m["kl"], args.target_kl, args.batch_size * args.num_samples)
        step += 1
        if eval_records is not None and step % args.eval_every == 0:  # the last step too only on its turn
            m["eval_accuracy"], best = greedy_evaluation(model, tok, eval_records, eval_budget, reward_fn, best,
                                                           args, device)
        write_metrics(m, step, bar, args)
        save(model, opt, tok, dict(step=step, beta=beta, skipped=skipped, best=best), epoch,
             (i + 1) == steps_per_epoch, total_steps, args, device)
    bar.close()
    save_checkpoint(model, tok, args, os.path.join(args.output_dir, "final"), rank, compute_dtype(device))
    log(f"done: {step} {args.objective} steps; the policy in {os.path.join(args.output_dir, 'final')}, metrics beside")
    dist.destroy_process_group()


# =====================================================================================================================
# infrastructure: skip on a first read
# First this stage's own helpers, then the helpers repeated across the stage files, kept identical (and in this
# order) by tests/test_copies.py.
# =====================================================================================================================

# ----------------------------------------------------------------------------- reft.py's own
# Checks, loading, the evaluation, metrics and saving of the loop, resuming: the helpers of main().

def memory_error(args, n_params, config, world, bf16, device_bytes):
    """None when this run fits `device_bytes` per device, else the error line (memory_advice). Resident: the policy's
    fp32 weights and AdamW's moments, 12 bytes per parameter (a separate critic is a second policy), the fp32
    reference, 4 (none for Online-ST), fp32 gradients, 4. With --lora_rank: the frozen warm-up in the compute dtype
    (2 bytes in bf16), no reference, and the 12 + 4 bytes per trained parameter only (lora_params). Generation: this
    rank's rollout or a greedy evaluation batch; training: a micro-batch; each of up to --max_length tokens."""
    models = 1 + args.separate_value_model
    state, grads = 12 * models + 4 * (args.objective != "online_st"), 4 * models
    if args.lora_rank:  # bytes per parameter of the whole model, as memory_estimate takes them
        trained = lora_params(config, args.lora_rank) / n_params
        state, grads = (2 if bf16 else 4) + 12 * trained, 4 * trained

    def peak(a, world):
        seqs = max(a.batch_size * a.num_samples // world, a.eval_batch_size if a.eval_every > 0 else 0)
        return max(memory_estimate(n_params, config, world, bf16, state, grads, a.micro_batch_size * a.max_length,
                                   a.gradient_checkpointing, seqs * a.max_length).values())
    return memory_advice(args, peak, world, device_bytes, ["micro_batch_size", "eval_batch_size"])


def check_flags(args):
    """The flags' ranges, --reward, --model and --cot, one error line each; then fills the flags left at -1 (RECIPES)
    and checks --model's positions. Returns (the reward function, the flags as started, the recipe in words)."""
    check_ranges(args, RANGES)
    reward_fn = reward.load_reward(args.reward)
    check_checkpoint(args.model, "--model", Args.model)
    resolve_cot(args, {"--model": args.model})
    flags = dataclasses.asdict(args)  # args.json, and what a --resume must match
    recipe = fill_recipe(args)
    check_model_config(args.model, "--model", {"max_length": args.max_length,
                                               "max_prompt_length": args.max_prompt_length})
    return reward_fn, flags, recipe


def check_data(args, flags):
    """--save_epochs, the training questions (answers only: ReFT never looks at the annotated CoT; Online-ST trains on
    it), the evaluation questions or None, and whether the run resumes (plan_run)."""
    epochs_to_save(args.save_epochs)
    records = reward.load_records(args.data, "train", args.cot, require_cot=args.objective == "online_st")
    return records, eval_questions(args) if args.eval_every > 0 else None, plan_run(args, flags, MAY_CHANGE)


def load_run(args, flags, resuming, prompt, world, mesh, device, log):
    """(model, ref, opt), after a check that the run fits (memory_error): the policy and the reference (load_models),
    the optimizer, one forward (FSDP2 picks its root at the first forward: one before any manual unshard()), then the
    run folder (begin_run) and its disk check."""
    if (device_bytes := device_memory(device)) is not None:  # stop now, not at the first OOM after minutes of loading
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(args.model)
        if error := memory_error(args, config_params(config), config, world, compute_dtype(device) == torch.bfloat16,
                                 device_bytes):
            raise SystemExit(error)
    tok, model, ref = load_models(args, mesh, device)
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or (LoRA) the adapters and the value head
    log(f"policy: {sum(p.numel() for p in model.lm.parameters()):,} params"
        + (f", {sum(p.numel() for p in trained):,} trained (LoRA rank {args.lora_rank})" if args.lora_rank else "")
        + f", lr {args.lr:g}")
    if args.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(trained, lr=args.lr, eps=1e-8, weight_decay=0.0)  # on the sharded params
    with torch.no_grad():
        model(*left_pad([prompt], tok.pad_token_id, device), len(prompt))
    if dist.get_rank() == 0:
        begin_run(args, flags, world, resuming)
    dist.barrier()
    check_disk_space(args.output_dir, sum(p.numel() for p in trained))
    if args.objective == "ppo":
        log(f"ppo: loss aggregation {args.loss_aggregation}, clip range [1 - {args.clip_range:g}, 1 + "
            f"{args.clip_range if args.clip_range_high < 0 else args.clip_range_high:g}]")
    return model, ref, opt


def resume(model, opt, args, rank):
    """The newest intact resume state's loop state (step, β, skipped optimizer steps, best evaluation), loaded into the
    model and the optimizer; metrics.jsonl cut back to its step."""
    state = load_resume_state(model, opt, args.output_dir)
    if rank == 0:
        trim_metrics(os.path.join(args.output_dir, "metrics.jsonl"), state["step"])
    return state["step"], state["beta"], state["skipped"], state["best"]


def greedy_evaluation(model, tok, eval_records, budget, reward_fn, best, args, device):
    """(greedy accuracy on the evaluation questions, the best so far); with --save_best, the best is also best/."""
    rank, world = dist.get_rank(), dist.get_world_size()
    accuracy = greedy_accuracy(model, model.lm, tok, eval_records, args.cot, budget, rank, world, device,
                               args.eval_batch_size, reward_fn)
    if args.save_best and accuracy > best:
        best = accuracy
        save_checkpoint(model, tok, args, os.path.join(args.output_dir, "best"), rank, compute_dtype(device))
    return accuracy, best


def write_metrics(m, step, bar, args):
    """The step's row to metrics.jsonl (rank 0), the progress bar and, every --log_every steps, a log line."""
    if dist.get_rank() == 0:
        append_metrics(os.path.join(args.output_dir, "metrics.jsonl"), m)
    bar.set_postfix({k: f"{m[k]:.3f}" for k in ("score", "accuracy", "kl") if k in m})
    if dist.get_rank() == 0 and args.log_every > 0 and step % args.log_every == 0:
        tqdm.write(summary(m))
    bar.update(1)


def save(model, opt, tok, state, epoch, end_of_epoch, total_steps, args, device):
    """An HF checkpoint epoch_K/ at the end of each epoch --save_epochs names; the resume state (with the loop state
    `state`) every --save_steps steps, at each epoch end and at the last step."""
    if end_of_epoch and epochs_to_save(args.save_epochs)(epoch + 1):
        save_checkpoint(model, tok, args, os.path.join(args.output_dir, f"epoch_{epoch + 1}"), dist.get_rank(),
                        compute_dtype(device))
    if (args.save_steps > 0 and state["step"] % args.save_steps == 0) or end_of_epoch or state["step"] == total_steps:
        save_resume_state(model, opt, state, args.output_dir)


def load_tokenizer(args):
    """The warm-up checkpoint's tokenizer; PPO needs a pad token distinct from EOS (EOS carries the reward)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model {args.model}: cannot load ({str(e).splitlines()[0]})")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise SystemExit(f"error: --model {args.model}: needs a pad token distinct from EOS (sft.py adds one)")
    return tok


def load_models(args, mesh, device):
    """Tokenizer, policy (+ value head with GAE) and frozen reference, both from the warm-up checkpoint: sharded,
    dropout off. No reference for Online-ST (no KL) nor with --lora_rank (the policy with its adapters off)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    tok = load_tokenizer(args)

    def read(value_head):  # rank 0 only (load_sharded)
        try:
            config = without_dropout(AutoConfig.from_pretrained(args.model))
            lm = AutoModelForCausalLM.from_pretrained(args.model, config=config, dtype=torch.float32)
            critic = AutoModel.from_pretrained(args.model, config=config, dtype=torch.float32) \
                if value_head and args.separate_value_model else None
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --model {args.model}: cannot load ({str(e).splitlines()[0]})")
        torch.manual_seed(args.seed)  # the value head's init
        return PolicyWithValueHead(lm, value_head, critic)

    def make(value_head):
        return lambda config: PolicyWithValueHead(
            AutoModelForCausalLM.from_config(config, dtype=torch.float32), value_head,
            AutoModel.from_config(config, dtype=torch.float32) if value_head and args.separate_value_model else None)

    def lora(model):  # the same LoRA layers on rank 0's loaded policy and on the other ranks' meta one
        return add_lora(model, args.lora_rank, args.lora_alpha, compute_dtype(device)) if args.lora_rank else model

    value_head = args.objective == "ppo" and args.advantage == "gae"
    policy = load_sharded(lambda: lora(read(value_head)), lambda config: lora(make(value_head)(config)), mesh, device)
    if args.objective == "online_st" or args.lora_rank:
        return tok, policy, None
    reference = load_sharded(lambda: read(False), make(False), mesh, device)
    return tok, policy, reference.requires_grad_(False).eval()


def save_checkpoint(model, tok, args, path, rank, dtype):
    """HF policy (loadable by AutoModelForCausalLM), with value_head.safetensors beside it when there is a value head,
    from rank 0 in `dtype`, the compute dtype: bf16 on GPU halves it, and the fp32 master weights live in the resume
    state. With LoRA the adapters are merged into it, and also saved in peft's format in adapter/ (save_adapter)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.lm.config.dtype = dtype
        sd, adapters = merge_lora(sd, args.lora_alpha / max(args.lora_rank, 1))
        lm = {k[3:]: v.to(dtype) for k, v in sd.items() if k.startswith("lm.")}
        head = {k: v.to(dtype).contiguous() for k, v in sd.items() if not k.startswith("lm.")}
        with stop_if_disk_full(path):
            model.lm.save_pretrained(path, state_dict=lm)
            tok.save_pretrained(path)
            if head:
                save_file(head, os.path.join(path, "value_head.safetensors"))
            if adapters:
                save_adapter({k[3:]: v for k, v in adapters.items()}, os.path.join(path, "adapter"), args, args.model,
                             "CAUSAL_LM")
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
