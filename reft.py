"""Stage 2 of ReFT: Reinforced Fine-Tuning, PPO from the SFT warm-up checkpoint (Luong et al. 2024, Algorithm 1).

For every batch of training questions: sample a chain of thought per question from the policy, score its
answer with reward.py (1 correct / 0.1 wrong / 0 no answer, on the token that emits EOS), subtract a per-token
KL penalty against the frozen warm-up model, estimate advantages with GAE on a value head that shares the
policy's trunk, and take clipped PPO steps. The PPO formulas are the small pure functions below, each named
after its equation; `main()` reads top to bottom like Algorithm 1.

Run it (CPU, the offline default: a tiny warm-up checkpoint made by sft.py on `minigsm`):
    python reft.py --model runs/warmup/final --data minigsm --cot nl --output_dir runs/reft
    torchrun --standalone --nproc_per_node 2 reft.py --model runs/warmup/final --data minigsm   # 2 CPU processes
The paper's setting (8 GPUs, CodeLlama-7B warm-up = epoch 2 of SFT, GSM8K program CoT):
    torchrun --nproc_per_node 8 reft.py --model runs/sft7b/epoch_2 --data gsm8k --cot python \\
        --batch_size 32 --lr 3e-7 --epochs 300 --kl_coef 0.01 --max_prompt_length 300 --max_length 700 \\
        --gradient_checkpointing

One code path: plain `python reft.py` is a 1-process group; under `torchrun` the policy (with its value head)
and the reference are sharded with FSDP2, gloo + fp32 on CPU and NCCL + bf16 mixed precision on GPU.
"""
import argparse
import dataclasses
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

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
from transformers.utils import logging as hf_logging

import reward

hf_logging.disable_progress_bar()


@dataclass
class Args:
    model: str = "runs/warmup/final"
    """the SFT warm-up checkpoint (HF folder); it initialises the policy and is the frozen KL reference"""
    data: str = "minigsm"
    """a prepared dataset name under data/ or a .jsonl/.json file of {item_id, question, answer_value}"""
    cot: str = "nl"
    """chain-of-thought kind: `nl` or `python` (then the prompt ends with the `def solution():` header)"""
    output_dir: str = "runs/reft"
    """where checkpoints (epoch_K/, final/ with value_head.safetensors), the resume state and metrics go"""
    epochs: int = 10
    """passes over the training questions (paper: 300 for 7B models)"""
    max_steps: int = -1
    """stop after this many PPO steps (rollout batches); overrides epochs when > 0"""
    batch_size: int = 32
    """questions per PPO step, summed over processes (paper: 32 = 8 GPUs × 4)"""
    num_samples: int = 1
    """CoTs sampled per question per step (paper: 1)"""
    mini_batch_size: int = -1
    """sequences per optimizer step, summed over processes; -1 = the whole rollout batch (paper)"""
    micro_batch_size: int = 32
    """sequences per forward/backward on one process (gradient accumulation inside a minibatch)"""
    ppo_epochs: int = 2
    """optimisation passes over each rollout batch (paper: 2)"""
    lr: float = 5e-5
    """constant learning rate (paper for 7B: 3e-7; the tiny CPU model wants far more)"""
    kl_coef: float = -1.0
    """β of the per-token KL penalty; -1 = the paper's value for --cot: 0.05 for nl, 0.01 for python"""
    adaptive_kl: bool = False
    """adapt β towards --target_kl (Ziegler et al. 2019) instead of keeping it fixed (paper: fixed)"""
    target_kl: float = 1.0
    """with --adaptive_kl: the per-sequence KL (nats) to steer towards"""
    gamma: float = 1.0
    """GAE discount γ (paper's code: 1.0)"""
    lam: float = 0.95
    """GAE λ (paper's code: 0.95)"""
    clip_range: float = 0.2
    """ε of the clipped policy objective"""
    clip_range_value: float = 0.2
    """ε_v of the clipped value loss, in reward units"""
    vf_coef: float = 5.0
    """weight of the value loss (paper: 5)"""
    partial_reward: bool = True
    """0.1 for an extracted but wrong answer on numeric datasets (paper); off gives 1/0 rewards"""
    separate_value_model: bool = False
    """give the value head its own trunk, a copy of the warm-up model (the paper's ablation) instead of sharing"""
    temperature: float = 1.0
    """sampling temperature; the same value divides the logits in every forward feeding ratios and KL"""
    max_prompt_length: int = 300
    """longer prompts are dropped and counted (paper: 300 tokens)"""
    max_length: int = 700
    """prompt + generated tokens (paper: 700)"""
    seed: int = 42
    """seed for data order and sampling; a question's sample depends on (seed, step, question), not on ranks"""
    resume: bool = False
    """continue from {output_dir}/checkpoint"""
    save_steps: int = 50
    """write the resume state every this many steps (and at each epoch end)"""
    eval_every: int = 50
    """greedy accuracy on --eval_split every this many steps (0: never)"""
    eval_split: str = "validation"
    """split for the periodic greedy evaluation (never pick settings on test)"""
    eval_limit: int = 500
    """questions in each periodic evaluation (-1: all)"""
    save_best: bool = False
    """also keep the checkpoint with the best periodic evaluation as {output_dir}/best"""
    gradient_checkpointing: bool = False
    """recompute activations in the PPO backward to save memory (7B models)"""


def parse_args(cls, argv=None):
    """Build argparse flags from a dataclass: one `--name` per field, the field docstring as help."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(cls):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return cls(**vars(p.parse_args(argv)))


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


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        L = max(-A r, -A clip(r, 1-ε, 1+ε)),   r = π(a_t) / π_old(a_t)

    Aggregated as the paper's code does: token mean within each sequence, then mean over sequences (so a long
    and a short CoT weigh the same). Returns (loss per sequence (B,), clip fraction, approx KL ½E[(log r)²])."""
    log_ratio = (logprobs - old_logprobs).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    clipfrac = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return masked_mean(losses, mask, dim=1), clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip_range_value):
    """Clipped value loss (as in PPO's reference code and the paper's):

        L_V = ½ max((V - R)², (V_old + clip(V - V_old, -ε_v, ε_v) - R)²)

    Same aggregation as the policy loss. Returns (loss per sequence (B,), clip fraction)."""
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    losses = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    clipfrac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)
    return masked_mean(losses, mask, dim=1), clipfrac


def explained_variance(err_sum, err_sq_sum, ret_sum, ret_sq_sum, n):
    """1 - Var(R - V) / Var(R) over n valid tokens, from sums; None when the returns do not vary (e.g. every score
    0 and no KL yet on the first step), where it is undefined."""
    var_ret = ret_sq_sum / n - (ret_sum / n) ** 2
    return 1 - (err_sq_sum / n - (err_sum / n) ** 2) / var_ret if var_ret > 0 else None


def response_mask(responses, eos_id):
    """1.0 on response tokens up to and including the first EOS (all tokens when there is none). (B, R)"""
    is_eos = (responses == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).float()


# ----------------------------------------------------------------------------- models

class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head Linear(hidden, 1) on the last hidden state of the shared trunk.

    With `critic` set, the values come from that separate trunk instead (the paper's ablation). A reference
    model is the same class without a head. forward() returns the logits and values of the response part only:
    position P-1+t predicts response token t, and V_t is read at the same position."""

    def __init__(self, lm, value_head=True, critic=None):
        super().__init__()
        self.lm = lm
        self.critic = critic
        self.v_head = nn.Linear(lm.config.hidden_size, 1) if value_head else None

    def forward(self, input_ids, attention_mask, prompt_len):
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: count real tokens only
        h = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state[:, prompt_len - 1:-1]  # (B, R, H)
        logits = self.lm.lm_head(h)  # (B, R, V)
        if self.v_head is None:
            return logits, None
        if self.critic is not None:
            h = self.critic(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state[:, prompt_len - 1:-1]
        return logits, self.v_head(h).squeeze(-1).float().clone()  # (B, R); clone: FSDP2 dislikes views


def disable_dropout(model):
    """Dropout off in every forward, so rollout, old, new and reference log-probs come from one function."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.lm.config.attention_dropout = 0.0


@torch.no_grad()
def sample(lm, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, seeds):
    """Sample responses token by token with a KV cache (temperature 0 = greedy). (B, P) -> (B, R)

    Row b draws Gumbel noise from its own generator seeded with seeds[b] (Gumbel-max: argmax(logits/T + G) is
    an exact sample of softmax(logits/T)), so a question's sample does not depend on which batch or rank it is
    in: 1 and N processes see the same rollouts, and a resumed run repeats them. Stops when all rows ended."""
    B, device = prompt_ids.size(0), prompt_ids.device
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


# ----------------------------------------------------------------------------- distributed setup

def init_distributed():
    """One process group whether launched by torchrun or by plain python (a 1-process group)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    mesh = init_device_mesh(device.type, (world,))
    return rank, world, device, mesh


def shard(model, mesh, device):
    """FSDP2: shard each decoder layer (policy trunk, and critic trunk if any), then the whole module."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    layers = list(model.lm.model.layers) + (list(model.critic.layers) if model.critic is not None else [])
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextmanager
def gathered_for_generation(model):
    """Gather the full parameters once for a whole rollout, then shard them again.

    Without this FSDP2 all-gathers every layer for every generated token, and ranks whose responses end at
    different lengths would deadlock on each other's collectives."""
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def load_models(args, device):
    """Policy (+ value head) and frozen reference, both from the warm-up checkpoint."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    if not os.path.isdir(args.model):
        raise SystemExit(f"error: --model {args.model}: not a checkpoint folder (make one with sft.py)")
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=ref_dtype)
        critic = AutoModel.from_pretrained(args.model, dtype=torch.float32) if args.separate_value_model else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model {args.model}: cannot load ({str(e).splitlines()[0]})")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise SystemExit(f"error: --model {args.model}: needs a pad token distinct from EOS (sft.py adds one)")
    torch.manual_seed(args.seed)  # the value head's random init must be the same on every rank
    policy = PolicyWithValueHead(lm, critic=critic)
    reference = PolicyWithValueHead(ref, value_head=False).requires_grad_(False).eval()
    disable_dropout(policy)
    return tok, policy, reference


def save_checkpoint(model, tok, args, path, rank):
    """HF policy (loadable by AutoModelForCausalLM) plus value_head.safetensors beside it, from rank 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.lm.save_pretrained(path, state_dict={k[3:]: v for k, v in sd.items() if k.startswith("lm.")})
        tok.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("lm.")},
                  os.path.join(path, "value_head.safetensors"))
        with open(os.path.join(path, "train_args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    dist.barrier()


def save_resume_state(model, opt, state, args, rank):
    """Sharded policy + optimizer (torch.distributed.checkpoint) and the loop state, swapped in atomically.

    DCP runs its collectives on a gloo group of its own, destroyed right after. Gloo copies DCP's plans on its worker
    threads, and with OMP_NUM_THREADS > 1 such a copy gives the worker an OpenMP team of its own that lives as long
    as the group. libgomp then counts more threads than cores and stops spin-waiting, so on the default group every
    later training step ran ~10-25% slower (1 process, 2 threads); destroying the group ends those threads."""
    final, tmp = os.path.join(args.output_dir, "checkpoint"), os.path.join(args.output_dir, "checkpoint.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    group = dist.new_group(backend="gloo")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp,
             process_group=group)
    dist.destroy_process_group(group)
    if rank == 0:
        with open(os.path.join(tmp, "loop_state.json"), "w") as f:
            json.dump(state, f)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final + ".old", ignore_errors=True)
        if os.path.isdir(final):
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    dist.barrier()


def load_resume_state(model, opt, args):
    """Inverse of save_resume_state (DCP on a gloo group of its own too); returns the saved loop state."""
    path = os.path.join(args.output_dir, "checkpoint")
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    group = dist.new_group(backend="gloo")
    dcp.load(sd, checkpoint_id=path, process_group=group)
    dist.destroy_process_group(group)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    with open(os.path.join(path, "loop_state.json")) as f:
        return json.load(f)


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
    """One sampling seed per (question, sample) of this step, independent of ranks and batch order."""
    return [(seed * 1_000_003 + step) * 1_000_003 + q * 101 + s for q in question_ids for s in range(num_samples)]


@torch.no_grad()
def greedy_accuracy(model, tok, records, args, rank, world, device, batch_size=64):
    """Greedy top-1 accuracy through reward.py; questions split across ranks and counts summed."""
    mine = records[rank::world]
    correct = 0
    with gathered_for_generation(model):
        for b in range(0, len(mine), batch_size):
            chunk = mine[b:b + batch_size]
            prompts = [tok(reward.build_prompt(r["question"], args.cot, sampling=True),
                           add_special_tokens=False).input_ids for r in chunk]
            ids, mask = left_pad(prompts, tok.pad_token_id, device)
            resp = sample(model.lm, ids, mask, args.max_length - ids.size(1), tok.eos_token_id,
                          tok.pad_token_id, 0.0, [0] * len(chunk))
            texts = tok.batch_decode(resp, skip_special_tokens=True)
            scores = reward.compute_rewards(texts, [r["answer_value"] for r in chunk], args.cot,
                                            [r["question"] for r in chunk], partial_reward=False)
            correct += sum(s == 1.0 for s in scores)
    total = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main(args):
    rank, world, device, mesh = init_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if args.cot not in ("nl", "python"):
        raise SystemExit(f"error: --cot must be nl or python, not {args.cot!r}")
    beta = args.kl_coef if args.kl_coef >= 0 else {"nl": 0.05, "python": 0.01}[args.cot]
    n_seq = args.batch_size * args.num_samples  # sequences per rollout batch, all ranks
    mini = n_seq if args.mini_batch_size <= 0 else args.mini_batch_size
    if args.batch_size % world or n_seq % mini or mini % world:
        raise SystemExit(f"error: --batch_size {args.batch_size} × --num_samples {args.num_samples} must split "
                         f"into minibatches of {mini}, each divisible by the {world} processes")

    # The training questions (answers only: ReFT never looks at the annotated CoT) and their prompts.
    tok, model, ref = load_models(args, device)
    records = reward.load_records(args.data, "train", args.cot)
    prompts = [tok(reward.build_prompt(r["question"], args.cot, sampling=True), add_special_tokens=False).input_ids
               for r in records]
    keep = [i for i, p in enumerate(prompts) if len(p) <= args.max_prompt_length]
    log(f"data: {len(records)} questions from {args.data}, {len(records) - len(keep)} dropped as prompts longer "
        f"than --max_prompt_length {args.max_prompt_length}")
    records, prompts = [records[i] for i in keep], [prompts[i] for i in keep]
    steps_per_epoch = len(records) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(records)} questions are fewer than one --batch_size {args.batch_size}")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs
    eval_records = None
    if args.eval_every > 0:
        eval_records = reward.load_records(args.data, args.eval_split, args.cot)
        eval_records = eval_records[:args.eval_limit] if args.eval_limit > 0 else eval_records

    if args.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    ref.to(device)
    shard(model, mesh, device)
    shard(ref, mesh, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-8, weight_decay=0.0)  # on the sharded params
    with torch.no_grad():  # FSDP2 picks its root at the first forward: run one before any manual unshard()
        model(*left_pad(prompts[:1], tok.pad_token_id, device), len(prompts[0]))

    os.makedirs(args.output_dir, exist_ok=True)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    step, skipped, best = 0, 0, -1.0
    if args.resume and os.path.isdir(os.path.join(args.output_dir, "checkpoint")):
        state = load_resume_state(model, opt, args)
        step, beta, skipped, best = state["step"], state["beta"], state["skipped"], state["best"]
        log(f"resumed from {args.output_dir}/checkpoint at step {step}")
        if rank == 0 and os.path.exists(metrics_path):  # drop lines logged after the saved state
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    elif rank == 0:
        open(metrics_path, "w").close()

    bar = tqdm(total=total_steps, initial=step, desc="reft", disable=rank != 0)
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed + epoch))
        qids = order[i * args.batch_size:(i + 1) * args.batch_size].tolist()[rank::world]
        rows = [q for q in qids for _ in range(args.num_samples)]  # this rank's sequences

        # 1. Rollout: sample one CoT per (question, sample) from the current policy.
        t0 = time.time()
        model.eval()
        prompt_ids, prompt_mask = left_pad([prompts[q] for q in rows], tok.pad_token_id, device)  # (b, P)
        P = prompt_ids.size(1)
        with gathered_for_generation(model):
            responses = sample(model.lm, prompt_ids, prompt_mask, args.max_length - P, tok.eos_token_id,
                               tok.pad_token_id, args.temperature,
                               rollout_seeds(args.seed, step, qids, args.num_samples))  # (b, R)
        mask = response_mask(responses, tok.eos_token_id)  # (b, R)
        responses = torch.where(mask.bool(), responses, tok.pad_token_id)
        t1 = time.time()

        # 2. Score: extract each answer and compare with the gold one (1 / 0.1 / 0), in the sandbox pool.
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        scores = torch.tensor(reward.compute_rewards(texts, [records[q]["answer_value"] for q in rows], args.cot,
                                                     [records[q]["question"] for q in rows], args.partial_reward),
                              device=device)
        t2 = time.time()

        # 3. Old log-probs and values from the training forward (so the first PPO ratio is exactly 1),
        #    reference log-probs from the frozen warm-up model.
        input_ids = torch.cat([prompt_ids, responses], 1)
        attn = torch.cat([prompt_mask, mask.long()], 1)
        with torch.no_grad():
            old_logprobs, old_values, ref_logprobs, entropy = [], [], [], []
            for s in range(0, len(rows), args.micro_batch_size):
                sl = slice(s, s + args.micro_batch_size)
                logits, values = model(input_ids[sl], attn[sl], P)
                old_logprobs.append(logprobs_of(logits, responses[sl], args.temperature))
                old_values.append(values)
                logp = torch.log_softmax(logits.float() / args.temperature, -1)
                entropy.append(-(logp.exp() * logp).sum(-1))
                ref_logits, _ = ref(input_ids[sl], attn[sl], P)
                ref_logprobs.append(logprobs_of(ref_logits, responses[sl], args.temperature))
            old_logprobs, old_values, ref_logprobs, entropy = (torch.cat(x) for x in
                                                               (old_logprobs, old_values, ref_logprobs, entropy))

        # 4. Shape the rewards with the KL penalty, 5. GAE advantages and returns, whitened over all ranks.
        rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, beta)
        advantages, returns = compute_gae(rewards, old_values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)

        # 6. PPO epochs: each minibatch is one optimizer step; the loss is a mean over the *global* number of
        #    sequences in the minibatch (× world, since FSDP averages gradients over ranks).
        model.train()
        local_mini = mini // world
        stats = {k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl", "ratio")}
        for e in range(args.ppo_epochs):
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + step * 1000 + e))
            for mb in range(0, len(rows), local_mini):
                idx_mb = perm[mb:mb + local_mini]
                for s in range(0, len(idx_mb), args.micro_batch_size):
                    idx = idx_mb[s:s + args.micro_batch_size]
                    logits, values = model(input_ids[idx], attn[idx], P)
                    logprobs = logprobs_of(logits, responses[idx], args.temperature)
                    pg, pg_clip, approx_kl = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx],
                                                         args.clip_range)
                    vf, vf_clip = value_loss(values, old_values[idx], returns[idx], mask[idx], args.clip_range_value)
                    loss = (pg + args.vf_coef * vf).sum() * world / mini
                    model.set_requires_gradient_sync(s + args.micro_batch_size >= len(idx_mb))
                    loss.backward()
                    for k, v in (("pg_loss", pg.mean()), ("vf_loss", vf.mean()), ("pg_clipfrac", pg_clip),
                                 ("vf_clipfrac", vf_clip), ("approx_kl", approx_kl),
                                 ("ratio", masked_mean(torch.exp(logprobs - old_logprobs[idx]), mask[idx]))):
                        stats[k].append(v.item())
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                if torch.isfinite(grad_norm):
                    opt.step()
                else:  # one bad minibatch must not poison the weights (every rank sees the same norm)
                    skipped += 1
                opt.zero_grad(set_to_none=True)
        t3 = time.time()

        # 7. Log: means over all ranks' sequences and tokens.
        n, score, correct, seq_kl, ent, ntok, ended, err, err2, ret, ret2, *losses = global_sums([
            len(rows), scores.sum(), (scores == 1.0).sum(), kl.sum(), masked_mean(entropy, mask, 1).sum(),
            mask.sum(), (responses == tok.eos_token_id).any(1).sum(), ((returns - old_values) * mask).sum(),
            ((returns - old_values) ** 2 * mask).sum(), returns.sum(), (returns ** 2).sum(),
            *[sum(v) / len(v) for v in stats.values()]], device)  # equal micro-batch counts: a mean of means
        m = dict(step=step + 1, epoch=epoch + (i + 1) / steps_per_epoch, score=score / n, accuracy=correct / n,
                 kl=seq_kl / n, kl_penalty=-beta * seq_kl / n, entropy=ent / n, response_length=ntok / n,
                 eos_fraction=ended / n, beta=beta, skipped_steps=skipped, ratio_first=stats["ratio"][0],
                 explained_variance=explained_variance(err, err2, ret, ret2, ntok),
                 tokens_per_s=ntok / (t1 - t0), time_generation=t1 - t0, time_scoring=t2 - t1,
                 time_training=t3 - t2, **{k: v / world for k, v in zip(stats, losses)})
        if args.adaptive_kl:  # Ziegler et al. 2019: proportional controller on the per-sequence KL
            beta *= 1 + max(-0.2, min(0.2, m["kl"] / args.target_kl - 1)) * n_seq / 10_000
        step += 1
        end_of_epoch = (i + 1) == steps_per_epoch
        if eval_records is not None and (step % args.eval_every == 0 or step == total_steps):
            m["eval_accuracy"] = greedy_accuracy(model, tok, eval_records, args, rank, world, device)
            if args.save_best and m["eval_accuracy"] > best:
                best = m["eval_accuracy"]
                save_checkpoint(model, tok, args, os.path.join(args.output_dir, "best"), rank)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
        bar.set_postfix(score=f"{m['score']:.3f}", acc=f"{m['accuracy']:.3f}", kl=f"{m['kl']:.3f}")
        bar.update(1)
        if end_of_epoch:
            save_checkpoint(model, tok, args, os.path.join(args.output_dir, f"epoch_{epoch + 1}"), rank)
        if step % args.save_steps == 0 or end_of_epoch or step == total_steps:
            save_resume_state(model, opt, {"step": step, "beta": beta, "skipped": skipped, "best": best}, args, rank)
    bar.close()
    save_checkpoint(model, tok, args, os.path.join(args.output_dir, "final"), rank)
    log(f"done: {step} PPO steps; policy in {args.output_dir}/final, metrics in {metrics_path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args(Args))
