"""Stage 2 of ReFT: Reinforced Fine-Tuning, PPO from the SFT warm-up checkpoint (Luong et al. 2024, Algorithm 1).

For every batch of training questions: sample a chain of thought per question from the policy, score its
answer with reward.py (1 correct / 0.1 wrong / 0 no answer, on the token that emits EOS), subtract a per-token
KL penalty against the frozen warm-up model, estimate advantages with GAE on a value head that shares the
policy's trunk, and take clipped PPO steps. Variants: critic-free advantages (--advantage grpo|rloo), the KL in the
loss (--kl_in_loss), the paper's online self-training baseline (--objective online_st), and DAPO's and Dr. GRPO's
recipes (--loss_aggregation, --clip_range_high, --scale_rewards none).

Reading guide: the RL stage of the paper's Algorithm 1 and its equations (sec. 3), each to the code, in the order
main() calls it. Read top to bottom: the pure PPO functions, the model and sampler, the steps, main(); everything
below the "infrastructure" marker (checks, loading, saving, distributed setup) can wait.
  a batch of training questions x                        step_questions
  sample CoTs e' ~ π_θ(x)                                rollout → sample (Gumbel-max, one generator per row)
  y' = EXTRACT(e'), rewarded 1 right, 0.1 wrong, 0 none  score → reward.extract_answers, reward.compute_rewards
  π_θold ← π_θ: old log-probs and values; π_ref's        old_and_reference → rollout_forwards
  total reward r_t: score on EOS - β·KL_t on each token  advantages → kl_shaped_rewards (KL_t: log π_old - log π_ref)
  δ_t, Â_t = Σ_l (γλ)^l δ_{t+l}, R̂_t = Â_t + V(s_t)     advantages → compute_gae (GAE), masked_whiten
  U updates of L_RL = L_policy + α·L_value               ppo_update → minibatches, ppo_backward, clipped_step
    L_policy, PPO's clipped surrogate                    policy_loss (Schulman et al. 2017, eq. 7)
    L_value, the clipped value loss                      value_loss
    averaging over tokens and sequences                  aggregate_loss (--loss_aggregation)
  variants                                               grpo_advantages, rloo_advantages, k3_kl, online_st_step
  metrics, evaluation, checkpoints                       step_log, greedy_evaluation, write_metrics, save
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

One code path: plain `python reft.py` is a 1-process group; under `torchrun` the policy (with its value head)
and the reference are sharded with FSDP2, gloo + fp32 on CPU and NCCL + bf16 mixed precision on GPU.
"""
import argparse
import ast
import dataclasses
import errno
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
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
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
    """passes over the training questions; -1 = by model size: 4 small (≈ the quickstart's 50 steps), 300 paper"""
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
    """constant learning rate; -1 = by model size: 1e-4 small, 3e-7 paper; 0 trains at 0 (a frozen-policy control)"""
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
    log_every: int = 10
    """print a one-line summary of the metrics every this many steps (0: never)"""
    max_skipped_steps: int = 10
    """stop the run with an error after this many optimizer steps in a row skipped for a gradient norm that is not
    finite (NaN or inf in the loss; each is counted in skipped_steps); 0: never stop"""


# Flags a resumed run may change: how long, how often, in how much memory (plan_run).
MAY_CHANGE = ("output_dir", "resume", "overwrite", "epochs", "max_steps", "save_steps", "save_epochs", "save_best",
              "eval_every", "eval_batch_size", "micro_batch_size", "gradient_checkpointing", "log_every",
              "max_skipped_steps")
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
          ("max_skipped_steps", lambda v: v >= 0, "at least 0")]

# What a flag left at -1 becomes, by the size of --model. A pretrained model (50 M parameters or more, or a hub id) gets
# the paper's code's values; a smaller one is the tiny Llama trained from scratch on minigsm, and gets the quickstart's
# (chosen on validation, docs/experiments.md), so that `python reft.py` after `python sft.py` is the quickstart's ReFT.
RECIPES = {"small": dict(lr=1e-4, kl_coef=0.05, vf_coef=0.1, lam=1.0, num_samples=4, epochs=4, max_prompt_length=96,
                         max_length=144, eval_every=5),
           "paper": dict(lr=3e-7, kl_coef={"nl": 0.05, "python": 0.01}, vf_coef=5.0, lam=0.95, num_samples=1,
                         epochs=300, max_prompt_length=300, max_length=700, eval_every=50)}
SMALL_MODEL = 50_000_000


# ----------------------------------------------------------------------------- the PPO math (pure functions)

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
    emits EOS, or the final token of a response that never ended. Returns (rewards, kl) of shape (B, R)."""
    kl = (logprobs - ref_logprobs) * mask
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


def without_dropout(config):
    """The config with every dropout probability at 0, before the model is built from it: rollout, old, new and
    reference log-probs must come from one function, or the first PPO ratio is not 1 and clipping acts on noise.
    Zeroing nn.Dropout modules afterwards is not enough: OPT/Galactica (dropout 0.1, LayerDrop) and Llama's
    attention_dropout apply it inside their layer code from values copied out of the config."""
    for k, v in vars(config).items():
        if "drop" in k and isinstance(v, float):
            setattr(config, k, 0.0)
    return config


@torch.no_grad()
def sample(lm, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, seeds):
    """Sample responses token by token with a KV cache (temperature 0 = greedy). (B, P) -> (B, R)

    Row b draws Gumbel noise from its own generator seeded with seeds[b] (Gumbel-max: argmax(logits/T + G) is
    an exact sample of softmax(logits/T)), so a question's sample does not depend on which batch or rank it is
    in: 1 and N processes see the same rollouts, and a resumed run repeats them. Stops when all rows ended."""
    B, device = prompt_ids.size(0), prompt_ids.device
    # One generator per row, not one for the batch: a shared generator's draws for row b would depend on how many
    # rows come before b (batch order, rank), so the same question would get another sample on 2 processes.
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    mask = prompt_mask
    inp, pos = prompt_ids, (prompt_mask.cumsum(1) - 1).clamp(min=0)
    past, out = None, []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        o = lm(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        past, logits = o.past_key_values, o.logits[:, -1].float()  # (B, V)
        if temperature > 0:
            u = torch.stack([torch.rand(logits.size(1), generator=g, device=device) for g in gens])
            logits = logits / temperature - torch.log(-torch.log(u))
        nxt = torch.where(done, pad_id, logits.argmax(-1))
        out.append(nxt)
        done |= nxt == eos_id
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        inp, pos = nxt[:, None], pos[:, -1:] + 1
    return torch.stack(out, 1)


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


SEED_PRIME = 1_000_003  # a prime above any step count or question index: distinct (seed, step) pairs never collide


def rollout_seeds(seed, step, question_ids, num_samples):
    """One sampling seed per (question, sample) of this step, independent of ranks and batch order."""
    return [(seed * SEED_PRIME + step) * SEED_PRIME + q * 101 + s for q in question_ids for s in range(num_samples)]


@torch.no_grad()
def rollout_forwards(model, ref, input_ids, attn, responses, P, micro_batch_size, temperature):
    """Step 3 of Algorithm 1, micro-batch by micro-batch: the policy's log-probs and values and the reference's
    log-probs of the sampled responses, and the policy's entropy per token. (b, P + R) -> four (b, R); the values are
    None without a value head (--advantage grpo or rloo).

    The policy's log-probs take exactly the steps of logprobs_of, which the PPO update uses, so the first ratio is
    exactly 1; the entropy reuses that log-softmax instead of computing a second one over the vocabulary."""
    old_logprobs, values, ref_logprobs, entropy = [], [], [], []
    for s in range(0, len(input_ids), micro_batch_size):
        sl = slice(s, s + micro_batch_size)
        logits, v = model(input_ids[sl], attn[sl], P)  # (m, R, V), (m, R)
        logp = torch.log_softmax(logits.float() / temperature, -1)
        old_logprobs.append(logp.gather(-1, responses[sl].unsqueeze(-1)).squeeze(-1))
        entropy.append(-(logp.exp() * logp).sum(-1))
        values.append(v)
        ref_logits, _ = ref(input_ids[sl], attn[sl], P)
        ref_logprobs.append(logprobs_of(ref_logits, responses[sl], temperature))
    return tuple(None if x[0] is None else torch.cat(x) for x in (old_logprobs, values, ref_logprobs, entropy))


def minibatches(n_rows, local_mini, args, step):
    """This rank's rows as optimizer steps, each a tuple of micro-batches (index tensors): --ppo_epochs passes, each in
    an order of its own seed per (step, pass), so a resumed run repeats it (1000 > ppo_epochs)."""
    for e in range(args.ppo_epochs):
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(args.seed + step * 1000 + e))
        for mb in range(0, n_rows, local_mini):
            yield perm[mb:mb + local_mini].split(args.micro_batch_size)


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


def count_skipped(run, args, stepped):
    """Count an optimizer step that clipped_step skipped, and stop the run after --max_skipped_steps of them in a row:
    a gradient that is never finite would otherwise burn days of GPU time, only skipped_steps growing. Every rank
    sees the same norm, so every rank stops."""
    run.skipped += not stepped
    run.skipped_in_a_row = 0 if stepped else run.skipped_in_a_row + 1
    if 0 < args.max_skipped_steps <= run.skipped_in_a_row:
        raise SystemExit(f"error: step {run.step + 1}: {run.skipped_in_a_row} optimizer steps in a row skipped "
                         f"(--max_skipped_steps {args.max_skipped_steps}), {run.skipped} in all: the gradient norm is "
                         f"not finite, NaN or inf in the loss. Likely causes: fully masked attention rows on GPU, a "
                         f"learning rate too high, bf16 overflow")


def ppo_backward(model, micro_batches, rollout, P, mini, world, beta, args, device, stats):
    """Step 6 for one minibatch: forward and backward of this rank's micro-batches, the gradient accumulating.

    Each micro-batch's loss is the sum of its per-sequence terms (aggregate_loss: their mean over the minibatch is its
    loss) × world / mini, the minibatch's sequences on all ranks: FSDP averages gradients over ranks, so the gradient
    is the minibatch's whatever the micro-batches and the processes. `rollout` holds this rank's (b, ...) tensors of
    steps 1-5 (returns and old_values None without a value head); the micro-batches' losses are appended to `stats`."""
    r = rollout
    aggregation = dict(how=args.loss_aggregation, n_seq=mini, max_length=args.max_length)
    if args.loss_aggregation == "token_mean":  # the count of the whole minibatch, on all ranks: one all-reduce
        aggregation["n_tokens"] = global_sums([r["mask"][torch.cat(micro_batches)].sum()], device)[0]
    clip_range_high = args.clip_range if args.clip_range_high < 0 else args.clip_range_high
    for idx in micro_batches:
        mask = r["mask"][idx]
        logits, values = model(r["input_ids"][idx], r["attn"][idx], P)
        logprobs = logprobs_of(logits, r["responses"][idx], args.temperature)
        pg, pg_clip, approx_kl = policy_loss(logprobs, r["old_logprobs"][idx], r["advantages"][idx], mask,
                                             args.clip_range, clip_range_high, aggregation)
        loss, st = pg, dict(pg_loss=pg.mean(), pg_clipfrac=pg_clip, approx_kl=approx_kl,
                            ratio=masked_mean(torch.exp(logprobs - r["old_logprobs"][idx]), mask))
        if values is not None:  # GAE's value head
            vf, vf_clip = value_loss(values, r["old_values"][idx], r["returns"][idx], mask, args.clip_range_value,
                                     aggregation)
            loss = loss + args.vf_coef * vf
            st.update(vf_loss=vf.mean(), vf_clipfrac=vf_clip)
        if args.kl_in_loss:  # aggregated as the policy loss
            kl_loss = aggregate_loss(k3_kl(logprobs, r["ref_logprobs"][idx]), mask, **aggregation)
            loss = loss + beta * kl_loss
            st.update(kl_loss=kl_loss.mean())
        # The minibatch's loss is the mean of its `mini` sequences' terms on all ranks; this rank holds mini / world of
        # them, and FSDP averages the ranks' gradients (÷ world). So × world / mini: with mini 8 on 2 ranks, each rank
        # sums its 4 terms × 2 / 8, the average over ranks gives the sum of all 8 / 8, their mean, as 1 process would.
        # Each backward reduce-scatters at once: FSDP2 keeps the accumulated gradient sharded.
        (loss.sum() * world / mini).backward()
        for k, v in st.items():
            stats.setdefault(k, []).append(v.item())


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
    sample None unless it scored 1. A micro-batch of rows is one forward of both (≤ 2 × --micro_batch_size
    sequences), so every rank runs as many forwards, as FSDP needs. Returns (stats, whether each optimizer step
    stepped: clipped_step)."""
    model.train()
    loss_sum, stepped = 0.0, []
    for micro_batches in minibatches(len(examples), mini // world, args, step):
        rows = [examples[i] for i in torch.cat(micro_batches).tolist()]
        n_tokens = global_sums([sum(len(r[h][0]) - r[h][1] for r in rows if r[h] is not None) for h in (0, 1)], device)
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
    absent: KL and entropy without a reference (Online-ST), the values' explained variance without GAE's returns, the
    fraction of questions whose samples all scored alike (zero_variance_groups) with one sample per question."""
    sums = dict(n=len(scores), score=scores.sum(), correct=(scores == 1.0).sum(), no_answer=no_answer.sum(),
                tokens=mask.sum(), ended=ended.sum(), **{k: sum(v) / len(v) for k, v in stats.items()})
    if num_samples >= 2:
        sums["zero_variance"] = zero_variance_groups(scores, num_samples)
    if kl is not None:
        sums.update(kl=kl.sum(), entropy=masked_mean(entropy, mask, 1).sum())
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
    return args.max_length - max(len(reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot,
                                                                                    sampling=True))) for r in records)


# a copy kept identical across stage files: tests/test_copies.py
def eval_questions(args):
    """The questions of the evaluation during training: --eval_data (a file as it is, or the --eval_split of a
    prepared dataset or folder), else the --eval_split of --data. A --data file is training data only: evaluating
    it would report (and --save_best select on) the training questions as validation. A test split is refused: the
    checkpoint picked on it would be scored on the questions it was picked with."""
    if args.eval_split.startswith("test") and not reward.is_data_file(args.eval_data or args.data):
        raise SystemExit(f"error: --eval_split {args.eval_split}: the evaluation during training picks a checkpoint, "
                         f"never on a test split; pass --eval_split validation (evaluate.py scores the test split "
                         f"once, at the end)")
    if args.eval_data:
        records = reward.load_records(args.eval_data, None if reward.is_data_file(args.eval_data) else args.eval_split,
                                      args.cot)
    elif reward.is_data_file(args.data):
        raise SystemExit(f"error: --data {args.data} is a file, training data only: the evaluation during training "
                         f"needs --eval_data (a file or a prepared dataset), a prepared --data, or to be turned off")
    else:
        records = reward.load_records(args.data, args.eval_split, args.cot)
    return records[:args.eval_limit] if args.eval_limit > 0 else records


# a copy kept identical across stage files: tests/test_copies.py
@torch.no_grad()
def greedy_accuracy(model, lm, tok, records, cot, max_new_tokens, rank, world, device, batch_size, reward_fn):
    """Greedy top-1 accuracy computed as `evaluate.py --mode greedy` computes it: transformers' generate from the
    rollout prompt (for python CoTs it ends with the program header), the same budget of new tokens for every
    question, correct where `reward_fn` gives 1.0 (reft.py: its --reward; sft.py: reward.py's), questions split
    across ranks and counts summed. `model` is the sharded root, gathered once; `lm` the causal LM inside it that
    generates (sft.py: the model itself; reft.py: the policy's `lm`)."""
    training = model.training
    model.eval()
    mine = records[rank::world]
    correct = 0
    tok.padding_side = "left"
    # Its own bar (rank 0's questions): an evaluation of 500 questions with a long budget takes minutes on a CPU.
    bar = tqdm(total=len(mine), desc=f"greedy evaluation, ≤ {max_new_tokens} new tokens", leave=False,
               disable=rank != 0)
    with gathered_for_generation(model):
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
    bar.close()
    total = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    model.train(training)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------- the steps of Algorithm 1

def step_questions(run, args, epoch, i):
    """This rank's questions of step i of an epoch: the epoch's order depends only on (seed, epoch), so a resumed run
    sees the same batches; the batch's questions are dealt out round-robin, so a rank holds all --num_samples samples
    of each of its questions (the groups GRPO and RLOO compare) and N ranks together hold the one-process batch."""
    order = torch.randperm(len(run.records), generator=torch.Generator().manual_seed(args.seed + epoch))
    # Questions [7, 2, 9, 4] on 2 ranks: rank 0 takes [7, 9], rank 1 [2, 4].
    return order[i * args.batch_size:(i + 1) * args.batch_size].tolist()[run.rank::run.world]


def rollout(run, args, qids):
    """Sample e' ~ π_θ(x): --num_samples CoTs per question from the current policy, up to --max_length tokens with the
    prompt. Returns the batch: rows (the question of each sequence), the left-padded prompts (b, P), the responses
    (b, R) with PAD after each one's first EOS, and their mask (1 up to and including EOS)."""
    rows = [q for q in qids for _ in range(args.num_samples)]  # this rank's sequences
    run.model.eval()
    prompt_ids, prompt_mask = left_pad([run.prompts[q] for q in rows], run.tok.pad_token_id, run.device)  # (b, P)
    P = prompt_ids.size(1)
    with gathered_for_generation(run.model):
        responses = sample(run.model.lm, prompt_ids, prompt_mask, args.max_length - P, run.tok.eos_token_id,
                           run.tok.pad_token_id, args.temperature,
                           rollout_seeds(args.seed, run.step, qids, args.num_samples))  # (b, R)
    mask = response_mask(responses, run.tok.eos_token_id)  # (b, R)
    responses = torch.where(mask.bool(), responses, run.tok.pad_token_id)
    return SimpleNamespace(rows=rows, prompt_ids=prompt_ids, prompt_mask=prompt_mask, P=P, responses=responses,
                           mask=mask)


def score(run, args, batch):
    """y' = EXTRACT(e') and its reward: programs run in the sandbox pool, --reward compares the answer with the gold
    one (reward.py's: 1 right, 0.1 wrong, 0 none). Adds scores (b,) and no_answer (b,) to the batch."""
    texts = run.tok.batch_decode(batch.responses, skip_special_tokens=True)
    answers = reward.extract_answers(texts, args.cot, [run.records[q]["question"] for q in batch.rows])
    batch.scores = torch.tensor(reward.score_completions(run.reward_fn, texts, answers,
                                                         [run.records[q] for q in batch.rows], args.cot,
                                                         args.partial_reward), device=run.device)  # (b,)
    batch.no_answer = torch.tensor([a is None for a in answers], dtype=torch.float32, device=run.device)  # (b,)


def old_and_reference(run, args, batch):
    """π_θold ← π_θ: the old log-probs and values of the sampled tokens from the training forward (so the first PPO
    ratio is exactly 1), the reference's log-probs from the frozen warm-up model, the policy's entropy per
    token."""
    batch.input_ids = torch.cat([batch.prompt_ids, batch.responses], 1)
    batch.attn = torch.cat([batch.prompt_mask, batch.mask.long()], 1)
    batch.old_logprobs, batch.old_values, batch.ref_logprobs, batch.entropy = rollout_forwards(
        run.model, run.ref, batch.input_ids, batch.attn, batch.responses, batch.P, args.micro_batch_size,
        args.temperature)


def advantages(run, args, batch):
    """The total reward r_t = score · [t is last] - β (log π_θold - log π_ref) of ReFT's sec. 3 (kl_shaped_rewards;
    --kl_in_loss moves β k3 into the loss instead, as verl's use_kl_loss) and, from it, GAE's advantages Â_t (whitened
    over all ranks) and returns R̂_t; or GRPO's or RLOO's of the summed reward score - β Σ_t kl_t (as TRL's
    RLOOTrainer), with no all-reduce (a rank holds all samples of its questions) nor whitening (GRPO normalises;
    RLOO stays in reward units, as TRL)."""
    rewards, batch.kl = kl_shaped_rewards(batch.scores, batch.old_logprobs, batch.ref_logprobs, batch.mask,
                                          0.0 if args.kl_in_loss else run.beta)
    if args.advantage == "gae":
        batch.advantages, batch.returns = compute_gae(rewards, batch.old_values, batch.mask, args.gamma, args.lam)
        batch.advantages = masked_whiten(batch.advantages, batch.mask)
    else:
        batch.returns = None
        group = torch.tensor(batch.rows, device=run.device)
        batch.advantages = grpo_advantages(rewards.sum(1), group, batch.mask, args.scale_rewards == "group") \
            if args.advantage == "grpo" else rloo_advantages(rewards.sum(1), group, batch.mask)


def ppo_update(run, args, batch):
    """The U updates of L_RL = L_policy + α L_value: --ppo_epochs passes over the batch, each minibatch one optimizer
    step (ppo_backward, then the clipped step). Returns the micro-batches' losses."""
    run.model.train()
    stats = {}
    # A minibatch of `mini` sequences is spread over the ranks: each takes mini // world of its own rows per step.
    for micro_batches in minibatches(len(batch.rows), run.mini // run.world, args, run.step):
        ppo_backward(run.model, micro_batches, vars(batch), batch.P, run.mini, run.world, run.beta, args, run.device,
                     stats)
        count_skipped(run, args, clipped_step(run.model, run.opt))
    return stats


def online_st_step(run, args, batch):
    """The paper's Online-ST baseline instead of the PPO steps: NLL steps on the samples that scored 1 and the gold
    CoTs (online_st_update). Returns its losses."""
    examples = online_st_examples(run.gold, run.prompts, batch.rows, batch.responses, batch.mask, batch.scores)
    stats, stepped = online_st_update(run.model, run.opt, examples, run.tok.pad_token_id, run.mini, run.world,
                                      run.step, args, run.device)
    for s in stepped:
        count_skipped(run, args, s)
    batch.kl = batch.entropy = batch.returns = batch.old_values = None
    return stats


def step_log(run, args, batch, stats, epoch, i, times):
    """The step's metrics row: means over all ranks' sequences and tokens (step_metrics), β, the first ratio, the
    seconds of each phase. Adapts β afterwards with --adaptive_kl."""
    t0, t1, t2, t3 = times
    m = dict(step=run.step + 1, epoch=epoch + (i + 1) / run.steps_per_epoch,
             **step_metrics(batch.scores, batch.no_answer, batch.kl, batch.entropy, batch.mask,
                            (batch.responses == run.tok.eos_token_id).any(1), batch.returns, batch.old_values, stats,
                            run.world, run.device, args.num_samples))
    if args.objective == "ppo":
        m.update({} if args.kl_in_loss else {"kl_penalty": -run.beta * m["kl"]}, beta=run.beta,
                 ratio_first=stats["ratio"][0])
    m.update(skipped_steps=run.skipped, tokens_per_s=m.pop("tokens") / (t1 - t0), time_generation=t1 - t0,
             time_scoring=t2 - t1, time_training=t3 - t2)
    if args.adaptive_kl:
        run.beta = adaptive_beta(run.beta, m["kl"], args.target_kl, args.batch_size * args.num_samples)
    return m


def main(args):
    run = setup(args)  # every check, then the data, the models, the optimizer, the run folder and its resume state
    bar = tqdm(total=run.total_steps, initial=run.step, desc="reft", disable=run.rank != 0)
    while run.step < run.total_steps:
        epoch, i = divmod(run.step, run.steps_per_epoch)
        qids = step_questions(run, args, epoch, i)
        t0 = time.time()
        # Algorithm 1's RL stage, for each question x of the batch: sample CoTs e' ~ π_θ(x).
        batch = rollout(run, args, qids)
        t1 = time.time()
        # Extract each answer y' = EXTRACT(e') and reward it: 1 right, 0.1 wrong, 0 none.
        score(run, args, batch)
        t2 = time.time()
        if args.objective == "online_st":
            # The paper's Online-ST baseline: NLL on the samples that scored 1 and the gold CoTs, instead of PPO.
            stats = online_st_step(run, args, batch)
        else:
            # π_θold ← π_θ: old log-probs and values; the reference's log-probs.
            old_and_reference(run, args, batch)
            # δ_t, Â_t and R̂_t from the KL-shaped total reward (GAE), or a group baseline (GRPO, RLOO).
            advantages(run, args, batch)
            # U updates of L_RL: --ppo_epochs passes, one clipped optimizer step per minibatch.
            stats = ppo_update(run, args, batch)
        t3 = time.time()
        m = step_log(run, args, batch, stats, epoch, i, (t0, t1, t2, t3))
        run.step += 1
        end_of_epoch = (i + 1) == run.steps_per_epoch
        if run.eval_records is not None and run.step % args.eval_every == 0:  # the last step too only on its turn
            m["eval_accuracy"] = greedy_evaluation(run, args)
        write_metrics(run, args, m, bar)
        save(run, args, epoch, end_of_epoch)
    bar.close()
    save_checkpoint(run.model, run.tok, args, os.path.join(args.output_dir, "final"), run.rank,
                    compute_dtype(run.device))
    run.log(f"done: {run.step} {args.objective} steps; policy in {args.output_dir}/final, metrics in "
            f"{run.metrics_path}")
    dist.destroy_process_group()


# =====================================================================================================================
# infrastructure: identical in every stage, tests/test_copies.py; skip on a first read
# setup() (every check, the loading, the run folder and resume state), the evaluation, metrics and saving of the loop;
# then the flags and the run-folder rules, the distributed setup, checkpoints and the resume state. A function marked
# "a copy" is the same in every stage file that has it; the others are this stage's own.
# =====================================================================================================================

def fill_recipe(args):
    """Flags left at -1 take RECIPES' values (per --cot where a dict) for the size of the model trained (--init, else
    --model), read before anything loads; returns what was filled, in words for the log."""
    n = checkpoint_params(getattr(args, "init", "") or args.model)
    name = "small" if n is not None and n < SMALL_MODEL else "paper"
    filled = {f: v[args.cot] if isinstance(v, dict) else v for f, v in RECIPES[name].items() if getattr(args, f) == -1}
    for flag, value in filled.items():
        setattr(args, flag, value)
    size = "a hub model" if n is None else f"{n / 1e6:.1f} M parameters"
    said = ", ".join(f"--{flag} {value:g}" for flag, value in filled.items())
    return f"{name} ({size}){': ' + said if said else ', every flag given'}"


def memory_error(args, n_params, config, world, bf16, device_bytes):
    """None when this run's estimated peak memory per device (memory_estimate) fits `device_bytes`, else the error
    line (memory_advice). Resident: the policy's fp32 weights and AdamW's moments, 12 bytes per parameter (a separate
    critic counted as a second policy), and the fp32 reference, 4 (none for Online-ST); the fp32 gradients, 4, during
    the PPO update. Generation: this rank's rollout (--batch_size × --num_samples / processes sequences) or a greedy
    evaluation (--eval_batch_size sequences), each up to --max_length tokens. Training: --micro_batch_size sequences
    of up to --max_length tokens (the old-policy and reference forwards take the same micro-batches, without
    gradients)."""
    models = 1 + args.separate_value_model
    state = 12 * models + 4 * (args.objective != "online_st")

    def peak(world, batches, gradient_checkpointing):
        seqs = max(args.batch_size * args.num_samples // world,
                   batches["--eval_batch_size"] if args.eval_every > 0 else 0)
        return max(memory_estimate(n_params, config, world, bf16, state, 4 * models,
                                   batches["--micro_batch_size"] * args.max_length, gradient_checkpointing,
                                   seqs * args.max_length).values())
    return memory_advice(device_bytes, peak, world, {"--micro_batch_size": args.micro_batch_size,
                                                     "--eval_batch_size": args.eval_batch_size},
                         args.gradient_checkpointing)


def setup(args):
    """Everything before the first step, as one namespace `run` that the steps read and update: every check of the
    flags, the checkpoint, the data and the output folder (all before any model loads), then the tokenizer and the
    prompts, the policy and the reference, the optimizer, the run folder and, with --resume, the resume state.

    run: rank, world, device, log, reward_fn, tok, model, ref, opt, records, prompts, gold (Online-ST's gold CoTs),
    eval_records, eval_budget, keep_epochs, mini (sequences per minibatch, all ranks), steps_per_epoch, total_steps,
    metrics_path, and the loop state step, beta, skipped (optimizer steps), skipped_in_a_row, best."""
    check_ranges(args, RANGES)
    reward_fn = reward.load_reward(args.reward)
    check_default_model(args.model, Args.model)
    check_checkpoint(args.model, "--model")
    resolve_cot(args, {"--model": args.model})
    flags = dataclasses.asdict(args)  # as started: args.json, and what a --resume must match
    recipe = fill_recipe(args)
    check_model_config(args.model, "--model", {"max_length": args.max_length,
                                               "max_prompt_length": args.max_prompt_length})
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
    if args.objective == "online_st" and (args.loss_aggregation != "seq_mean" or args.clip_range_high >= 0):
        raise SystemExit("error: --loss_aggregation and --clip_range_high shape PPO's loss: --objective online_st has "
                         "its own (½ NLL of correct samples + ½ NLL of gold CoTs, each a token mean)")
    keep_epochs = epochs_to_save(args.save_epochs)
    # The training questions (answers only: ReFT never looks at the annotated CoT; Online-ST trains on it).
    records = reward.load_records(args.data, "train", args.cot, require_cot=args.objective == "online_st")
    eval_records = eval_questions(args) if args.eval_every > 0 else None
    resuming = plan_run(args, flags, MAY_CHANGE)

    rank, world, device, mesh = init_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"recipe: {recipe}")
    beta = args.kl_coef
    n_seq = args.batch_size * args.num_samples  # sequences per rollout batch, all ranks
    mini = n_seq if args.mini_batch_size <= 0 else args.mini_batch_size
    if args.batch_size % world or n_seq % mini or mini % world:
        raise SystemExit(f"error: --batch_size {args.batch_size} × --num_samples {args.num_samples} must split "
                         f"into minibatches of {mini}, each divisible by the {world} processes")
    tok = load_tokenizer(args)
    prompts = [reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot, sampling=True)) for r in records]
    keep = [i for i, p in enumerate(prompts) if len(p) <= args.max_prompt_length]
    log(f"data: {len(records)} questions from {args.data}, {len(records) - len(keep)} dropped as prompts longer "
        f"than --max_prompt_length {args.max_prompt_length}")
    records, prompts = [records[i] for i in keep], [prompts[i] for i in keep]
    steps_per_epoch = len(records) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(records)} questions are fewer than one --batch_size {args.batch_size}")
    if max(len(p) for p in prompts) >= args.max_length:
        raise SystemExit(f"error: --max_length {args.max_length} leaves no room to generate after the longest "
                         f"training prompt ({max(len(p) for p in prompts)} tokens; see --max_prompt_length)")
    gold = [gold_example(tok, r, args.cot) for r in records] if args.objective == "online_st" else None
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs
    eval_budget = None
    if eval_records is not None:
        eval_budget = greedy_budget(tok, eval_records, args)
        if eval_budget < 1:
            raise SystemExit(f"error: --max_length {args.max_length} leaves no room to generate after the longest "
                             f"--eval_split {args.eval_split} prompt")

    device_bytes = device_memory(device)
    if device_bytes is not None:  # a run that cannot fit stops now, not at its first OOM after minutes of loading
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(args.model)
        error = memory_error(args, config_params(config), config, world, compute_dtype(device) == torch.bfloat16,
                             device_bytes)
        if error is not None:
            raise SystemExit(error)

    tok, model, ref = load_models(args, mesh, device)
    log(f"policy: {sum(p.numel() for p in model.lm.parameters()):,} params, lr {args.lr:g}")
    if args.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-8, weight_decay=0.0)  # on the sharded params
    with torch.no_grad():  # FSDP2 picks its root at the first forward: run one before any manual unshard()
        model(*left_pad(prompts[:1], tok.pad_token_id, device), len(prompts[0]))

    if rank == 0:
        begin_run(args, flags, world, resuming)
    dist.barrier()
    check_disk_space(args.output_dir, sum(p.numel() for p in model.parameters()))
    run = SimpleNamespace(rank=rank, world=world, device=device, log=log, reward_fn=reward_fn, tok=tok, model=model,
                          ref=ref, opt=opt, records=records, prompts=prompts, gold=gold, eval_records=eval_records,
                          eval_budget=eval_budget, keep_epochs=keep_epochs, mini=mini, steps_per_epoch=steps_per_epoch,
                          total_steps=total_steps, metrics_path=os.path.join(args.output_dir, "metrics.jsonl"),
                          step=0, beta=beta, skipped=0, skipped_in_a_row=0, best=-1.0)
    if resuming:
        state = load_resume_state(model, opt, args)
        run.step, run.beta, run.skipped, run.best = state["step"], state["beta"], state["skipped"], state["best"]
        if rank == 0:
            trim_metrics(run.metrics_path, run.step)
    if args.objective == "ppo":
        log(f"ppo: loss aggregation {args.loss_aggregation}, clip range [1 - {args.clip_range:g}, 1 + "
            f"{args.clip_range if args.clip_range_high < 0 else args.clip_range_high:g}]")
    return run


def greedy_evaluation(run, args):
    """Greedy accuracy on the evaluation questions; with --save_best, the best so far is kept as {output_dir}/best."""
    accuracy = greedy_accuracy(run.model, run.model.lm, run.tok, run.eval_records, args.cot, run.eval_budget,
                               run.rank, run.world, run.device, args.eval_batch_size, run.reward_fn)
    if args.save_best and accuracy > run.best:
        run.best = accuracy
        save_checkpoint(run.model, run.tok, args, os.path.join(args.output_dir, "best"), run.rank,
                        compute_dtype(run.device))
    return accuracy


def write_metrics(run, args, m, bar):
    """The step's row to metrics.jsonl (rank 0), the progress bar and, every --log_every steps, a log line."""
    if run.rank == 0:
        append_metrics(run.metrics_path, m)
    bar.set_postfix({k: f"{m[k]:.3f}" for k in ("score", "accuracy", "kl") if k in m})
    if run.rank == 0 and args.log_every > 0 and run.step % args.log_every == 0:
        tqdm.write(summary(m))
    bar.update(1)


def save(run, args, epoch, end_of_epoch):
    """An HF checkpoint epoch_K/ at the end of each epoch --save_epochs names; the resume state every --save_steps
    steps, at each epoch end and at the last step."""
    if end_of_epoch and run.keep_epochs(epoch + 1):
        save_checkpoint(run.model, run.tok, args, os.path.join(args.output_dir, f"epoch_{epoch + 1}"), run.rank,
                        compute_dtype(run.device))
    if (args.save_steps > 0 and run.step % args.save_steps == 0) or end_of_epoch or run.step == run.total_steps:
        save_resume_state(run.model, run.opt, {"step": run.step, "beta": run.beta, "skipped": run.skipped,
                                               "best": run.best}, args, run.rank)


# ----------------------------------------------------------------------------- flags and run folders

def parse_args(cls, argv=None):
    """The dataclass `cls` from the command line: `--name` per field (`-x` for one letter), never abbreviated; --help
    shows each field's docstring, read from the source (attribute docstrings do not exist at run time). With --resume,
    a flag not given takes the run's value: its args.json, updated by the last launch's `changed` (launches.jsonl)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        kind = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
                {"choices": get_args(f.type)} if get_origin(f.type) is Literal else {"type": type(f.default)})
        # An empty default is "not given" (its docstring says what that means), not a value to show as "(default: )"
        p.add_argument(f"--{f.name}", *([f"-{f.name}"] if len(f.name) == 1 else []), **kind,
                       default=argparse.SUPPRESS if f.default == "" else f.default,
                       help=docs.get(f.name, "").replace("%", "%%"))
    args = p.parse_args(argv)
    if getattr(args, "resume", False):
        run = {}
        try:  # when this fails, plan_run says what is wrong
            with open(os.path.join(args.output_dir, "args.json")) as f:
                run = json.load(f)
            with open(os.path.join(args.output_dir, "launches.jsonl")) as f:
                last = [line for line in f if line.endswith("\n")][-1:]  # not a line cut by a kill
            # Each launch records every flag that differed from args.json then: the last one is the run's now.
            run.update({k: new for line in last for k, (_, new) in json.loads(line)["changed"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        # The run's flags become the defaults; where the run is and whether to continue it are this launch's own.
        own = {f.name for f in dataclasses.fields(cls)} - {"output_dir", "resume", "overwrite"}
        p.set_defaults(**{k: v for k, v in run.items() if k in own})
        args = p.parse_args(argv)
    return cls(**vars(args))


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


def check_checkpoint(path, flag):
    """One error line, before any model loads, for a missing checkpoint folder, one without config.json (a run folder
    suggests its checkpoint), or a safetensors file cut short or garbled (transformers would give a traceback)."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path!r}: no such checkpoint folder")
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
    classifier = next((a for a in config.get("architectures") or [] if str(a).endswith("ForSequenceClassification")),
                      None)
    if policy and classifier:
        raise SystemExit(f"error: {flag} {path}: a verifier ({classifier}, as rerank.py writes), not a policy; pass a "
                         f"checkpoint written by sft.py or reft.py")
    maximum = config.get("max_position_embeddings", positions)
    for name, value in lengths.items():
        if isinstance(maximum, int) and value > maximum:
            raise SystemExit(f"error: --{name} {value} is over the model's maximum of {maximum} positions "
                             f"({flag} {path}); pass at most {maximum}")


def check_default_model(model, default):
    """The default --model, sft.py's warm-up, missing: one error line saying which command writes it."""
    if model == default and not os.path.isdir(model):
        raise SystemExit(f"error: --model {default} (the default) not found: `python sft.py` writes it (its epoch "
                         f"--warmup_epoch, which --epochs must reach; with this run's --data and --cot), or pass --model "
                         f"PATH, a checkpoint written by sft.py or reft.py")


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
    """How far the run in `output_dir` got, in words for an error line; None when the folder holds no run."""
    entries, said = run_entries(output_dir), []
    for name, unit in (("metrics.jsonl", "steps logged"), ("samples.jsonl", "samples drawn")):
        if name in entries:
            with open(os.path.join(output_dir, name), "rb") as f:
                lines = f.read().splitlines()
            count = len(lines)
            if name == "metrics.jsonl":
                try:  # the last step logged
                    count = json.loads([line for line in lines if line.strip()][-1])["step"]
                except (ValueError, KeyError, IndexError, TypeError):
                    pass
            said.append(f"{count} {unit} in {name}")
    state = find_resume_state(output_dir)
    said += [f"a resume state at step {state[1]}"] if state else []
    said += [f"{e}/" for e in entries if e in ("final", "best", "warmup")]
    return ", ".join(said) or ", ".join(entries) or None


def plan_run(args, flags, may_change, resumable=()):
    """The run-folder rule, before any model loads: a folder holding a run is never written over without --resume
    (continue it) or --overwrite (start over). --resume refuses a flag of `flags` (as started: -1 and auto
    unresolved) that differs from args.json unless it is in `may_change`, and with nothing to resume (no resume state
    nor a `resumable` file) starts at step 0, so that a requeued job works the first time. Returns: does it resume."""
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
    """Rank 0, once every check passed: a run starting at step 0 removes what an earlier run left, naming it, and
    writes args.json (`flags` as started); a resumed one keeps its own. Each launch appends a line to launches.jsonl:
    time, world size and the flags that differ from args.json."""
    if resuming:
        saved = read_json(os.path.join(args.output_dir, "args.json"))
    else:
        removed = []
        for entry in run_entries(args.output_dir):
            path = os.path.join(args.output_dir, entry)
            removed.append(entry + "/" * os.path.isdir(path))
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if removed:
            print(f"{'--overwrite' if args.overwrite else '--resume with nothing to resume'}: removed "
                  f"{os.path.join(args.output_dir, '')}{{{', '.join(removed)}}}", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        write_run_args(flags, world)
        saved = flags
    changed = {k: [saved.get(k), v] for k, v in flags.items()
               if saved.get(k) != v and k not in ("resume", "overwrite")}
    with open(os.path.join(args.output_dir, "launches.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world, "resumed": resuming,
                            "changed": changed, "argv": sys.argv[1:]}) + "\n")


def write_run_args(flags, world):
    """{output_dir}/args.json: every flag as the run started, the world size and the versions."""
    import transformers
    with open(os.path.join(flags["output_dir"], "args.json"), "w") as f:
        json.dump({**flags, "world_size": world, "python": sys.version.split()[0], "torch": torch.__version__,
                   "transformers": transformers.__version__}, f, indent=2)


def summary(row):
    """A metrics row as one log line (the progress bar shows none in a log file)."""
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


# ----------------------------------------------------------------------------- distributed setup
# Repeated in sft.py, reft.py, rerank.py and evaluate.py, from here to `gathered_for_generation`: each stage stays one
# self-contained file, and tests/test_copies.py checks that the copies are identical.

def init_distributed():
    """One process group whether launched by torchrun or by plain python (a 1-process group)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # On CUDA the group is bound to this rank's GPU: NCCL and barrier() would otherwise guess the device.
    device_id = device if device.type == "cuda" else None
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
        else:
            # Rank 0 alone reads checkpoints and writes them (27 GB for a 7B model in fp32) while the other ranks
            # wait in a collective: longer than the 10-minute default timeout on slow disks.
            dist.init_process_group(backend, timeout=timedelta(hours=2), device_id=device_id)
    mesh = init_device_mesh(device.type, (world,))
    return rank, world, device, mesh


def compute_dtype(device):
    """The dtype the trunk computes in: bf16 on GPU (fp32 master weights, gradients and optimizer states), fp32 on
    CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def decoder_blocks(model):
    """The repeated decoder blocks of every transformers model inside `model`: the classes its
    `_no_split_modules` names (LlamaDecoderLayer, OPTDecoderLayer, ...), so any decoder-only family shards."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]  # also once sharded


def head_groups(model):
    """The modules that turn hidden states into log-probs, values or scores: the output embedding (with the input
    embedding when both share one weight, as one group), reft's value head `v_head`, the verifier's `score`.

    They compute in fp32 even under bf16 mixed precision: bf16 rounds a logit near 20 by up to 0.06 nats and a
    value near 1 by 0.004, more than the per-token KL rewards (~1e-4) PPO has to resolve, and makes verifier
    scores tie. Costs: the output embedding is ~2% of a 7B model's FLOPs, now at fp32 speed."""
    groups = []
    for m in model.modules():
        out = m.get_output_embeddings() if isinstance(m, PreTrainedModel) else None
        if out is not None:
            inp = m.get_input_embeddings()
            groups.append([inp, out] if inp.weight is out.weight else [out])
    return groups + [[m] for name, m in model.named_children() if name in ("v_head", "score")]


def shard(model, mesh, dtype):
    """FSDP2: one group per decoder block and one fp32 group per head, the rest at the root. `dtype` is the
    trunk's compute dtype (compute_dtype); master weights and gradient reductions stay fp32."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for heads in head_groups(model):
        fully_shard(heads, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def without_empty_attention_rows(config):
    """`config`, set to build models whose attention has no fully masked query row (returned for chaining).

    A left-padded batch gives each pad position a causal mask row that allows no key. transformers 5 hands such rows
    to scaled_dot_product_attention unchanged (4.x un-masked them; its `allow_torch_fix` is gone): the CPU kernel
    returns zeros there, but cuDNN, which torch prefers on H100/H200 (sm90), returns NaN, which the next layer carries
    into the real tokens and the gradient norm into every weight. Here such a row attends to every key instead. No
    real token attends to a pad key, so real tokens compute exactly as before, bit for bit. It is SDPA under its own
    name, "sdpa_no_empty_rows" (transformers picks the mask function by that name), for configs that ask for sdpa."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, **kwargs):
        allowed = sdpa_mask(*args, **kwargs)  # (B, 1, Q, K) bool, or None for a plain causal mask (no padding)
        return None if allowed is None else allowed | ~allowed.any(-1, keepdim=True)

    AttentionInterface.register("sdpa_no_empty_rows", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_no_empty_rows", mask)
    if config._attn_implementation == "sdpa":
        config._attn_implementation = "sdpa_no_empty_rows"
    return config


def load_sharded(load, make, mesh, device):
    """The model that `load()` builds on rank 0, sharded over all ranks without a full copy anywhere else.

    Only rank 0 calls load() (it reads the checkpoint into host memory); every rank builds the same structure on
    the meta device with `make(config)` (no memory), shards it, allocates just its own shards on `device` and
    receives them from rank 0. Loading a 7B model then costs one full fp32 copy in rank 0's host memory and a
    shard per GPU, instead of a full copy per rank on every GPU and 8 in host memory. A SystemExit in load()
    (a bad checkpoint) reaches every rank instead of leaving the others waiting."""
    full, error = None, None
    if dist.get_rank() == 0:
        try:
            full = load()
        except SystemExit as e:
            error = str(e)
    msg = [(error, full.config if full is not None else None, getattr(full, "generation_config", None))]
    dist.broadcast_object_list(msg, src=0)
    error, config, generation_config = msg[0]
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
    buffers = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, b in model.named_buffers():  # outside the state dict when non-persistent (rotary frequencies)
            if full is not None:
                b.copy_(buffers[name])
            dist.broadcast(b, src=0)
    return model


@contextmanager
def gathered_for_generation(model):
    """Gather the full parameters once for a whole generation, then shard them again.

    Without this FSDP2 all-gathers every block for every generated token, and ranks whose sequences end at
    different lengths would wait on each other's collectives. A critic (reft.py --separate_value_model) does not
    generate and stays sharded. Afterwards the root keeps its parameters between forward and backward again (FSDP2's
    default for the root), and the forward order FSDP2 records for backward prefetching is cleared: only a
    backward clears it, so inference-only loops would grow it by one entry per block and generated token."""
    mods = [m for name, m in model.named_modules() if isinstance(m, FSDPModule) and not name.startswith("critic")]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()
        if isinstance(model, FSDPModule):  # private: FSDP2 has no public call for this
            state = model._get_fsdp_state()
            state._comm_ctx.post_forward_order.clear()
            for s in state._state_ctx.all_states:
                groups = s._fsdp_param_groups if hasattr(s, "_fsdp_param_groups") else [s._fsdp_param_group]
                for group in groups:  # (older torch: one group per module)
                    if group is not None:
                        group._post_forward_indices.clear()


# ----------------------------------------------------------------------------- memory before loading

# a copy kept identical across stage files: tests/test_copies.py
def device_memory(device):
    """The device's memory in bytes on CUDA; None elsewhere (no memory check on the CPU)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


# a copy kept identical across stage files: tests/test_copies.py
def config_params(config):
    """The parameter count of a causal LM of `config` (config.json, read before anything loads), built on the meta
    device: no memory, no weights read."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


# a copy kept identical across stage files: tests/test_copies.py
def memory_estimate(n_params, config, world, bf16, state_bytes, grad_bytes, train_tokens, gradient_checkpointing,
                    gen_tokens):
    """Estimated peak bytes per device of each phase of a stage, {"training": ..., "generation": ...} (0 for a phase
    it does not run), before anything loads: the arithmetic of docs/scaling.md's table "Memory per GPU", row by row,
    for any model from its config.json. P = n_params, N = world (one device per process), c = 2 bytes per gathered
    parameter in bf16 (4 in fp32).

    Every phase: `state_bytes` per parameter, sharded (÷ N): the fp32 weights 4, AdamW's two moments 8, ReFT's fp32
    reference 4. Generation (gathered_for_generation; one call's KV cache holds `gen_tokens` = sequences × their
    prompt + new tokens): the model gathered once, c · P with the LM head in fp32 (head_groups), and the KV cache,
    2 · layers · KV width · c bytes per token; no gradients (zero_grad frees them after every step).
    Training (one micro-batch of `train_tokens`): `grad_bytes` per parameter of sharded fp32 gradients; two blocks
    gathered (one computing, the next prefetched) and one block's unsharded fp32 gradient before its reduce-scatter,
    P / layers parameters each; the LM head gathered in fp32; fp32 logits of tokens × vocabulary, ~3 live copies
    (logits, log-softmax, its gradient); activations: 34 · tokens · hidden bytes per layer in 16 bits (Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1 without its attention-score term,
    which SDPA's fused kernels never store) in every layer, or with gradient checkpointing each layer's input
    (tokens · hidden · c) and one layer recomputed.
    Not counted: the CUDA context, NCCL's buffers and the allocator's fragmentation (a few GB): an estimate just under
    the device's memory can still run out."""
    c = 2 if bf16 else 4
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    kv_width = hidden // heads * (getattr(config, "num_key_value_heads", None) or heads)
    head = config.vocab_size * hidden
    resident = state_bytes * n_params / world
    generation = training = 0
    if gen_tokens:
        generation = resident + c * (n_params - head) + 4 * head + gen_tokens * 2 * layers * kv_width * c
    if train_tokens:
        layer = 34 * train_tokens * hidden * c / 2
        activations = layers * train_tokens * hidden * c + layer if gradient_checkpointing else layers * layer
        training = (resident + grad_bytes * n_params / world + (2 * c + 4) * n_params / layers + 4 * head
                    + 3 * 4 * train_tokens * config.vocab_size + activations)
    return {"training": training, "generation": generation}


# a copy kept identical across stage files: tests/test_copies.py
def memory_advice(device_bytes, peak, world, batches, gradient_checkpointing):
    """None when the estimated peak bytes per device, peak(world, batches, gradient_checkpointing), fit in
    `device_bytes`; else the one error line: the estimate, the device's memory and each single change that fits:
    more processes (one device each: the fewest of 2, 4, ..., 1024 times as many), --gradient_checkpointing (unless
    `gradient_checkpointing` is None: a stage without the flag), or the largest smaller value of one of `batches`
    ({flag: value})."""
    gc = bool(gradient_checkpointing)
    need = peak(world, batches, gc)
    if need <= device_bytes:
        return None
    more = next((world * 2 ** i for i in range(1, 11) if peak(world * 2 ** i, batches, gc) <= device_bytes), None)
    fits = [] if more is None else [f"{more} processes"]
    if gradient_checkpointing is False and peak(world, batches, True) <= device_bytes:
        fits.append("--gradient_checkpointing")
    for flag, value in batches.items():
        smaller = next((b for b in range(value - 1, 0, -1) if peak(world, {**batches, flag: b}, gc) <= device_bytes),
                       None)
        fits += [] if smaller is None else [f"{flag} {smaller}"]
    return (f"error: the estimated peak memory is {need / 1e9:.3g} GB per device on {world} process(es) "
            f"(docs/scaling.md), more than this device's {device_bytes / 1e9:.3g} GB; "
            + (f"would fit: {' or '.join(fits)}" if fits else "no single change fits (more processes, "
               "--gradient_checkpointing, smaller batches): combine them, or use devices with more memory"))


# ----------------------------------------------------------------------------- loading and saving

# a copy kept identical across stage files: tests/test_copies.py
def checkpoint_params(path):
    """The parameter count of a local HF checkpoint, read from its safetensors headers (a few KB) before anything
    loads: the defaults of flags left at -1 depend on it. None for a hub id or a folder without safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    total = 0
    for name in files:
        with open(os.path.join(path, name), "rb") as f:  # 8 bytes of header length, then the header's JSON
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def load_tokenizer(args):
    """The warm-up checkpoint's tokenizer, with one error line when it cannot serve: PPO needs a pad token distinct
    from EOS (the EOS token carries the reward)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model {args.model}: cannot load ({str(e).splitlines()[0]})")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise SystemExit(f"error: --model {args.model}: needs a pad token distinct from EOS (sft.py adds one)")
    return tok


def load_models(args, mesh, device):
    """Tokenizer, policy (+ value head with GAE) and frozen reference (none for Online-ST, which has no KL), both from
    the warm-up checkpoint: sharded, dropout off."""
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

    value_head = args.objective == "ppo" and args.advantage == "gae"
    policy = load_sharded(lambda: read(value_head), make(value_head), mesh, device)
    if args.objective == "online_st":
        return tok, policy, None
    reference = load_sharded(lambda: read(False), make(False), mesh, device)
    return tok, policy, reference.requires_grad_(False).eval()


# a copy kept identical across stage files: tests/test_copies.py
def epochs_to_save(spec):
    """--save_epochs as a test of an epoch number: `all`, `none` or comma-separated epochs such as `2,40`."""
    if spec in ("all", "none"):
        return lambda epoch: spec == "all"
    try:
        return {int(e) for e in spec.split(",")}.__contains__
    except ValueError:
        raise SystemExit(f"error: --save_epochs must be all, none or epoch numbers such as 2,40, not {spec!r}")


def save_checkpoint(model, tok, args, path, rank, dtype):
    """HF policy (loadable by AutoModelForCausalLM) plus value_head.safetensors beside it when there is a value head,
    from rank 0, in `dtype`, the run's compute dtype: bf16 on GPU halves it, and the fp32 master weights live in the
    resume state."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for k in sd:
            sd[k] = sd[k].to(dtype)
        model.lm.config.dtype = dtype
        with stop_if_disk_full(path):
            model.lm.save_pretrained(path, state_dict={k[3:]: v for k, v in sd.items() if k.startswith("lm.")})
            tok.save_pretrained(path)
            head = {k: v.contiguous() for k, v in sd.items() if not k.startswith("lm.")}
            if head:
                save_file(head, os.path.join(path, "value_head.safetensors"))
            with open(os.path.join(path, "train_args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
    dist.barrier()


# ----------------------------------------------------------------------------- resume state and metrics on disk
# Repeated in sft.py, reft.py and rerank.py, from here to `trim_metrics`: tests/test_copies.py checks the copies.
# A resume state is the folder {output_dir}/checkpoint-{step}: DCP's shards, what the stage adds, and manifest.json
# (every file's size and sha256), written last. It is written as checkpoint-{step}.tmp and published by one rename.

def resume_states(output_dir):
    """The complete resume states in `output_dir` as (path, step), newest first; reads folder names only. A folder
    is complete when it holds manifest.json, written last: checkpoint-{step}, or checkpoint-{step}.tmp when a kill
    came between the manifest and the rename that publishes it (after the published one of the same step)."""
    found = []
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        stem = name.removesuffix(".tmp")
        if (stem.startswith("checkpoint-") and stem[len("checkpoint-"):].isdigit()
                and os.path.isfile(os.path.join(output_dir, name, "manifest.json"))):
            found.append((-int(stem[len("checkpoint-"):]), name != stem, os.path.join(output_dir, name)))
    return [(path, -neg_step) for neg_step, _, path in sorted(found)]


def find_resume_state(output_dir):
    """(path, step) of the newest complete resume state in `output_dir`, or None. Pure Python, cheap (no checksum,
    no torch.distributed, nothing removed), so a caller can tell before loading any model whether --resume has
    something to continue from; load_resume_state verifies the files and falls back to the previous state."""
    states = resume_states(output_dir)
    return states[0] if states else None


def file_digest(path):
    """(size, sha256 hex) of a file, synced to disk on the way (fsync): a state is published only once its bytes
    are durable, and the hash reads them anyway."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
        os.fsync(f.fileno())
    return os.path.getsize(path), h.hexdigest()


def fsync_dir(path):
    """Make the names in a folder durable (a rename is only on disk once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder, step):
    """Rank 0, once every rank's files are in `folder`: manifest.json, each other file's size and sha256, written
    through a temporary name so that its presence means the folder is whole."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if os.path.relpath(path, folder) not in ("manifest.json", "manifest.json.tmp"):
                files[os.path.relpath(path, folder)] = dict(zip(("size", "sha256"), file_digest(path)))
    tmp = os.path.join(folder, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, "manifest.json"))
    fsync_dir(folder)


def damaged_file(folder):
    """None when every file of the resume state `folder` has its manifest's size and sha256, else what is wrong,
    naming the file."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            files = json.load(f)["files"]
        expected = [(name, want["size"], want["sha256"]) for name, want in sorted(files.items())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    for name, size, sha256 in expected:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, its manifest says {size}"
        if file_digest(path)[1] != sha256:
            return f"{name} does not match its sha256"
    return None


def check_disk_space(output_dir, n_params):
    """Once, before the first save: one error line unless the disk of `output_dir` has room for two resume states,
    what a save holds during the switch (12 bytes per parameter each: fp32 weights and AdamW's two moments), less
    what the states already there take (a save removes all but one first)."""
    held = sum(os.path.getsize(os.path.join(root, name)) for path, _ in resume_states(output_dir)
               for root, _, names in os.walk(path) for name in names)
    need, free = 2 * 12 * n_params - held, shutil.disk_usage(output_dir).free
    if free < need:
        raise SystemExit(f"error: --output_dir {output_dir}: {free / 1e9:.3g} GB free, saving the resume state needs "
                         f"{need / 1e9:.3g} GB (two states during the switch, 12 bytes per parameter each)")


def is_disk_full(error):
    """Whether a failed save ran out of disk: ENOSPC in the exception or any it wraps (DCP gathers every rank's
    failure into one CheckpointException), or in safetensors' message."""
    pending = [error]
    while pending:
        e = pending.pop()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(e):
            return True  # the second: safetensors' writer, whose Rust I/O errors are not OSError
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
        if isinstance(e, dcp.CheckpointException):
            pending += [exc for exc, _ in e.failures.values()]
    return False


@contextmanager
def stop_if_disk_full(path):
    """Around a write of `path` by one rank (an HF checkpoint, samples, metrics): a full disk ends the run with one
    line naming it instead of a traceback; once there is room, --resume continues from the last whole resume
    state. Under torchrun the other ranks, waiting for this one, are ended by torchrun when it exits."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        raise SystemExit(f"error: no space left on the disk of {folder} while writing {path} "
                         f"({shutil.disk_usage(folder).free / 1e9:.3g} GB free now): make room, then continue with "
                         f"--resume") from None


def stop_if_write_failed(error, tmp, output_dir):
    """All ranks, after a write of the state `tmp`: when any rank failed, the partial folder is removed and every
    rank stops, with one line naming the folder and its free space when the disk is full."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else "full" if is_disk_full(error) else repr(error))
    if all(f is None for f in failures):
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if "full" in failures:
        name, free = os.path.basename(tmp).removesuffix(".tmp"), shutil.disk_usage(output_dir).free
        raise SystemExit(f"error: no space left on the disk of {output_dir} while saving the resume state {name} "
                         f"(removed; {free / 1e9:.3g} GB free now): a save needs room for two states, 12 bytes per "
                         f"parameter each")
    if error is not None:
        raise error
    raise SystemExit(f"error: another process failed to write the resume state {tmp}: {next(filter(None, failures))}")


def save_state(model, opt, step, output_dir, files):
    """All ranks: write the sharded model and optimizer (DCP) and this rank's `files` ({name: bytes}) as the resume
    state of `step`, visible only once whole. Rank 0 first removes every state folder but the newest complete one
    before `step` (partial ones, those of a later step left by a run that resumed from an earlier state, the older of
    the two kept), so the disk holds at most two states; then the new one is written as checkpoint-{step}.tmp,
    gets its manifest and is published by one atomic rename, leaving it and the previous one.

    DCP runs its collectives on a gloo group of its own, destroyed right after. Gloo copies DCP's plans on its worker
    threads, and with OMP_NUM_THREADS > 1 such a copy gives the worker an OpenMP team of its own that lives as long
    as the group. libgomp then counts more threads than cores and stops spin-waiting, so on the default group every
    later training step ran ~10-25% slower (1 process, 2 threads); destroying the group ends those threads."""
    tmp = os.path.join(output_dir, f"checkpoint-{step}.tmp")
    if dist.get_rank() == 0:
        keep = [path for path, saved in resume_states(output_dir) if saved < step][:1]
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if name.startswith("checkpoint-") and os.path.isdir(path) and path not in keep:
                shutil.rmtree(path)
    dist.barrier()
    error = None
    group = dist.new_group(backend="gloo")
    try:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=tmp, process_group=group)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
    except (OSError, dcp.CheckpointException) as e:
        error = e
    finally:
        dist.destroy_process_group(group)
    stop_if_write_failed(error, tmp, output_dir)
    if dist.get_rank() == 0:
        try:
            write_manifest(tmp, step)
        except OSError as e:
            error = e
    stop_if_write_failed(error, tmp, output_dir)
    if dist.get_rank() == 0:
        os.rename(tmp, tmp.removesuffix(".tmp"))
        fsync_dir(output_dir)
    dist.barrier()


def load_state(model, opt, output_dir):
    """All ranks: load the model and optimizer from the newest resume state whose files match its manifest (rank 0
    checks them and tells the others; DCP on a gloo group of its own, as in save_state) and return its path. A
    damaged state gets one warning line naming the file and the previous state is tried; none intact is one error
    line."""
    choice = [None, None]
    if dist.get_rank() == 0:
        problems = []
        for path, _ in resume_states(output_dir):
            damage = damaged_file(path)
            if damage is None:
                choice[0] = path
                break
            # Set aside: no later --resume or save takes it for a good state; the next save removes it.
            aside = path.removesuffix(".tmp") + ".damaged"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(path, aside)
            problems.append(f"{os.path.basename(path)}: {damage}")
            print(f"warning: the resume state {path} is damaged ({damage}); set aside as {aside}, trying the "
                  f"previous one", flush=True)
        else:
            choice[1] = (f"error: --output_dir {output_dir}: no intact resume state to continue from"
                         + (f" ({'; '.join(problems)})" if problems else ""))
    dist.broadcast_object_list(choice, src=0)
    path, error = choice
    if error is not None:
        raise SystemExit(error)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    group = dist.new_group(backend="gloo")
    dcp.load(sd, checkpoint_id=path, process_group=group)
    dist.destroy_process_group(group)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    if dist.get_rank() == 0:
        print(f"resumed from {path}", flush=True)
    return path


def append_metrics(path, row):
    """Rank 0: one metrics row as one whole line in one write, so a kill can cut only the line being written."""
    with stop_if_disk_full(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(path, step):
    """Rank 0, on resume: keep the rows up to the resumed `step` (those logged after the saved state are logged
    again), dropping a last line a kill cut (one warning line). The rows go to a new file renamed over the old one,
    so a kill here leaves one of the two whole."""
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


def save_resume_state(model, opt, state, args, rank):
    """The resume state of step state["step"] (save_state): the sharded policy and optimizer, and the loop state."""
    save_state(model, opt, state["step"], args.output_dir,
               {"loop_state.json": json.dumps(state).encode()} if rank == 0 else {})


def load_resume_state(model, opt, args):
    """Inverse of save_resume_state, from the newest intact state (load_state); returns the saved loop state."""
    with open(os.path.join(load_state(model, opt, args.output_dir), "loop_state.json")) as f:
        return json.load(f)


# a copy kept identical across stage files: tests/test_copies.py
def stop_on_interrupt(args):
    """Ctrl-C (SIGINT, which torchrun passes to every rank) ends each process at once with status 130, and rank 0
    says in one line how far the run got and how to continue it, instead of a traceback per rank. A thread ends the
    process, woken by the byte Python's signal handler writes from any thread: it works while the main thread waits
    in a collective whose other ranks are gone. Ending without unwinding is what a kill does, which a run survives."""
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
