"""The paper's pipeline in one command, ending with its table: SFT against ReFT, top-1, voting@k and rerank@k.

    python scripts/quickstart.py                    # --preset cpu: offline, a tiny Llama on minigsm (~28 min, 2 cores)
    python scripts/quickstart.py --fast             # a few steps per stage: checks the plumbing (CI runs this)
    python scripts/quickstart.py --preset paper --nproc 8 --data gsm8k_reft --cot python   # CodeLlama-7B, 8 GPUs
    python scripts/quickstart.py --preset paper --nproc 8 --estimate_only   # the cost estimate and the commands only
    python scripts/quickstart.py --preset paper --nproc 1 --lora_rank 16 --estimate_only   # ReFT with LoRA: one GPU

Two presets fill every size and hyperparameter flag left at its -1 (or "") default; `--help` gives both values:
  cpu    (`bash run.sh quickstart`) the `minigsm` word problems, prepared here, and a tiny Llama trained from scratch,
         with the settings chosen on validation that docs/experiments.md reports.
  paper  the paper's setting and hyperparameters (README, "The paper pipeline at scale"): CodeLlama-7B (or
         Galactica-6.7B) on a dataset prepared by data/mwp_reft/prepare.py, which needs network, so it is not run
         here. `--model tiny` and the size flags run the same code path on a CPU (tests/test_paper_preset.py).
Every stage runs as `python x.py`, or `torchrun --standalone --nproc_per_node N x.py` with --nproc N. Before the
first stage the script prints what the run will cost in GPU hours and disk (`estimate`, with each per-token cost
and its source), then each stage's command line as it starts it.

The pipeline, as in the paper:
  1. data      cpu: prepare minigsm (a fixed pool of training questions with one gold CoT each, validation, test);
               paper: check that --data is prepared
  2. sft       one SFT run with greedy validation accuracy every epoch. sft.py writes its epoch `--warmup_epoch` as
               sft/warmup, the ReFT warm-up W (the paper: epoch 2 of 40), and its best epoch on validation as
               sft/best, the SFT baseline S (the paper picks its best epoch too, on test); no other epoch is kept
  3. reft      PPO from W on the same questions; the best evaluation on validation is R (reft/best)
  4. verifiers k samples per training question from W, labelled by reward.py; one verifier initialised from S
               and one from R, trained on those samples (rerank.py), as in the paper
  5. evaluate  S and R on the held-out test split: greedy top-1, voting@k and rerank@k (evaluate.py --mode all)
  6. report    {out_dir}/results.json, the table with ReFT − SFT and its 95% paired bootstrap interval per metric
               (printed and in results.md) and PNG plots
A stage whose output exists is skipped when the command runs again; an interrupted stage resumes (--resume). A
finished stage's resume states are removed (162 GB for a 7B model): nothing left reruns it.

    python scripts/quickstart.py --compare   # the cpu preset, then the paper's baselines and variants (~2 h, 2 cores)

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
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, get_args, get_origin

from compare import compare, load_predictions
from compare_methods import METHODS, METRICS, SPLITS, aggregate, markdown, provenance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import reward  # noqa: E402  (the prompt and CoT formats, for the estimate's token counts)


@dataclass
class Args:
    preset: Literal["cpu", "paper"] = "cpu"
    """what fills the flags left at -1 (or ""): `cpu`, the offline tiny-Llama run on minigsm; `paper`, the paper's
    setting and hyperparameters at the scale of 7B models and 8 GPUs (the module docstring)"""
    model: str = ""
    """cpu: `tiny` (the only one). paper: codellama/CodeLlama-7b-hf; also facebook/galactica-6.7b, a local HF folder,
    or `tiny` with small size flags to run the paper preset's code path on a CPU"""
    data: str = ""
    """cpu: none (it prepares minigsm in {out_dir}/data). paper: gsm8k_reft; any dataset prepared by
    data/mwp_reft/prepare.py (svamp, mathqa-numeric, ...) or a prepared folder"""
    out_dir: str = ""
    """where every stage writes (data/, sft/, reft/, verifier_*/, eval_*/, results.json, plots); cpu:
    runs/quickstart, paper: runs/paper"""
    nproc: int = 1
    """processes per stage (GPUs on a GPU machine): each stage runs as `torchrun --standalone --nproc_per_node N`,
    as `python` when 1"""
    lora_rank: int = 0
    """every stage that trains (sft.py, reft.py, rerank.py's verifiers) with LoRA adapters of this rank (their
    --lora_rank): the base frozen, no second copy as ReFT's reference; with --nproc 1, CodeLlama-7B's pipeline fits one
    80 GB GPU (the estimate prints its memory per GPU: docs/scaling.md). --sft_lr and --reft_lr left at -1, and the
    paper verifier's lr, become the preset's × 10 (the stages' LORA_LR_SCALE). 0 = full fine-tuning (paper)"""
    estimate_only: bool = False
    """print the cost estimate and every stage's command line, and run nothing"""
    fast: bool = False
    """cpu preset: a few steps per stage and small splits: checks that the pipeline runs (CI), numbers mean nothing
    (the verifiers also train on the gold CoTs: the few-step warm-up gets no sample right)"""
    seed: int = 0
    """seed of the data and of every stage"""
    cot: Literal["nl", "python"] = "python"
    """chain-of-thought kind: `python` (a program; the sandbox does the arithmetic) or `nl`. cpu: chosen on
    validation: nl SFT kept rising to its last epoch as its arithmetic slowly improved (52% best), and PPO from its
    epoch 30 peaked at 43%; python SFT plateaus from epoch ~24 (43-45%), and PPO from there reached 51%"""
    n_train: int = 400
    """cpu: size of the fixed minigsm training pool shared by SFT and ReFT"""
    max_number: int = 10
    """cpu: minigsm difficulty: largest starting count and step number. At 20 the SFT baseline reached only 16% on
    validation (nl; its arithmetic was right in 30% of its steps there); at 10 it lands at ~45-50%"""
    sft_epochs: int = 40
    """epochs of the SFT run (both presets; the paper: 40)"""
    sft_lr: float = -1.0
    """peak learning rate of the SFT run (linear warm-up 10%, then linear decay); cpu: 2e-3, paper: 1e-5"""
    warmup_epoch: int = -1
    """the SFT epoch whose checkpoint (sft/warmup) starts ReFT; paper: 2. cpu: 24, where the python SFT curve
    flattens. Chosen on validation (300 questions): PPO from epoch 20 (26%) peaked at 44%, from epoch 24 (43%) at 49%
    (lr 2e-4) and 51% (1e-4). A model trained from scratch needs most of the SFT run to learn what a pretrained
    model's 2-epoch warm-up brings"""
    reft_epochs: int = -1
    """paper: 300 passes of PPO over the training questions; cpu: --reft_steps sets the length instead"""
    reft_steps: int = -1
    """PPO steps (--reft_batch_size questions each), overriding --reft_epochs; paper: none (-1). cpu: 50; R is the
    best of the 10 evaluations on validation. From epoch 24 at lr 1e-4 validation accuracy peaked at step 50 (51%)
    and then held at 45-49% to step 100; python rollouts and evaluations cost more than nl, and 50 steps keep the
    whole run within 30 minutes (26.9 measured)"""
    reft_eval_every: int = -1
    """PPO steps between greedy validation evaluations (R is the best one); cpu: a tenth of --reft_steps; paper: one
    per ReFT epoch (training questions // --reft_batch_size), at most --reft_steps"""
    reft_lr: float = -1.0
    """PPO learning rate; paper: 3e-7 (constant). cpu: 1e-4. On validation (python, from epoch 24) 2e-4 swung between
    34% and 49% from one evaluation to the next, 1e-4 less so; (nl, numbers <= 20) 5e-5 rose more slowly and 5e-4
    peaked lower, KL at 4-6 nats"""
    reft_batch_size: int = 32
    """questions per PPO step (both presets; the paper: 32, 8 GPUs × 4)"""
    num_samples: int = -1
    """CoTs per question per PPO step; cpu: 4, paper: 1"""
    kl_coef: float = -1.0
    """β of the per-token KL penalty; paper: 0.01 for python, 0.05 for nl; cpu: 0.05 (not tuned)"""
    vf_coef: float = -1.0
    """value-loss weight; paper: 5. cpu: 0.1: on this 1.8M-parameter model the value loss's gradient through the
    shared trunk at weight 5 outweighs the policy gradient: in 40-step runs against a frozen-policy control it
    lowered training accuracy by 5-10 points; 0.1 did not"""
    lam: float = -1.0
    """GAE λ; paper: 0.95. cpu: 1.0: λ < 1 bootstraps from the value head, which is biased while the head is still
    poor"""
    reft_max_length: int = -1
    """ReFT's prompt + generation length; paper: 700 (prompts up to 300). cpu: 96 + --max_new_tokens (prompts up to
    96)"""
    k: int = -1
    """samples per test question for voting and reranking; cpu: 8, paper: 100"""
    verifier_samples: int = -1
    """samples per training question drawn from W to train the verifiers; cpu: 8, paper: 100"""
    max_new_tokens: int = -1
    """generation budget of SFT's validation, the verifiers' samples and the test evaluations; paper: 700. cpu: 48
    (minigsm CoTs are ~20 tokens; an untrained model rambles to the limit)"""
    gold_samples: bool = False
    """the verifiers also train on each training question's gold CoT as a correct sample (rerank.py
    --gold_samples): for a short run whose warm-up gets no sample right (--fast sets it)"""
    threads: int = 2
    """torch threads per process"""
    compare: bool = False
    """cpu preset: after the quickstart, the paper's comparison: Offline-ST, Online-ST, ReFT with GRPO and ReFT with
    a 1/0 reward from the same W, and every method on test and the two shifted test splits (compare.json,
    compare.md)"""
    offline_st_epochs: int = 20
    """--compare: epochs of the Offline-ST run (the paper's code: 20, against SFT's 40)"""


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


RANGES = [(name, lambda v: v >= 1, "at least 1") for name in ("n_train", "max_number", "sft_epochs", "nproc",
                                                            "reft_batch_size", "threads", "offline_st_epochs")] + \
    [(name, lambda v: v == -1 or v >= 1, "at least 1") for name in (  # -1: the preset's value
        "warmup_epoch", "reft_epochs", "reft_steps", "reft_eval_every", "num_samples", "reft_max_length", "k",
        "verifier_samples", "max_new_tokens")] + \
    [(name, lambda v: v == -1 or v >= 0, "at least 0") for name in ("sft_lr", "reft_lr", "kl_coef", "vf_coef")] + \
    [("lam", lambda v: v == -1 or 0 <= v <= 1, "in [0, 1]"), ("lora_rank", lambda v: v >= 0, "at least 0")]

# What each preset gives the flags left at -1 (or ""). The paper's values are README's "paper pipeline at scale",
# which takes them from the paper's code (github.com/lqtrung1998/mwp_ReFT); the cpu ones are explained in --help.
PRESETS = {
    "cpu": dict(model="tiny", out_dir="runs/quickstart", sft_lr=2e-3, warmup_epoch=24, reft_steps=50, reft_lr=1e-4,
                num_samples=4, kl_coef=0.05, vf_coef=0.1, lam=1.0, k=8, verifier_samples=8, max_new_tokens=48),
    "paper": dict(model="codellama/CodeLlama-7b-hf", data="gsm8k_reft", out_dir="runs/paper", sft_lr=1e-5,
                  warmup_epoch=2, reft_epochs=300, reft_lr=3e-7, num_samples=1, vf_coef=5.0, lam=0.95, k=100,
                  verifier_samples=100, max_new_tokens=700, reft_max_length=700),
}
PAPER_KL = {"python": 0.01, "nl": 0.05}
LORA_LR_SCALE = 10  # the stages': with --lora_rank, an lr left at -1 is the recipe's × this (verl's LoRA guide: ~10×)
# The paper preset's fixed flags per stage: its other hyperparameters, none of which sets the run's size.
PAPER_FLAGS = {
    "sft": ["--batch_size", 48, "--micro_batch_size", 6, "--warmup_ratio", 0.1, "--weight_decay", 0,
            "--max_length", 1024, "--gradient_checkpointing"],
    "reft": ["--micro_batch_size", 4, "--ppo_epochs", 2, "--gamma", 1.0, "--max_prompt_length", 300,
             "--gradient_checkpointing"],
    "verifier": ["--lr", 1e-6, "--epochs", 3, "--batch_size", 48, "--micro_batch_size", 6, "--max_length", 700],
}
# data/mwp_reft/prepare.py's --dataset of each folder it writes
MWP_REFT = {"gsm8k_reft": "gsm8k", "svamp": "svamp", "mathqa": "mathqa", "mathqa-numeric": "mathqa-numeric"}

# The estimate's figures beyond the data files, each printed with its source.
KNOWN_MODELS = {  # parameters (computed from the published config), the config's sizes, the config in words
    "codellama/CodeLlama-7b-hf": (6_738_546_688, dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                                      num_key_value_heads=32, vocab_size=32016,
                                                      intermediate_size=11008),
                                  "CodeLlama-7B's config: 32 layers, hidden 4096, MLP 11,008, vocabulary 32,016, "
                                  "untied LM head (docs/scaling.md: 6.74e9)"),
    "facebook/galactica-6.7b": (6_657_359_872, dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                                    vocab_size=50000, ffn_dim=16384),
                                "Galactica-6.7B's config (the OPT layout): 32 layers, hidden 4096, FFN 16,384, "
                                "vocabulary 50,000, 2,050 learned positions, tied head"),
}
PEAK_FLOPS = 312e12      # one A100's dense bf16 peak, FLOP/s (NVIDIA's A100 datasheet)
HBM_BYTES = 2.039e12     # an A100 80 GB SXM's memory bandwidth, bytes/s (the same datasheet)
MFU = 0.4                # assumed: the share of the peak that training and forward passes reach
DECODE_SHARE = 0.5       # assumed: the share of the bandwidth that a decoding step reaches
CHARS_PER_TOKEN = 4      # assumed: no tokenizer is read (none is local for the paper's models)
ROW_BYTES = 200          # assumed: a samples/predictions row's bytes besides its CoT (question, answer, fields)
GEN_BATCH = 64           # sequences per generation batch: the stages' default --eval_batch_size, --gen_batch_size
EVAL_LIMIT = 500         # sft.py's and reft.py's default --eval_limit: validation questions per evaluation
REFT_REPORTED = (2.0, 8, 233)  # hours per ReFT epoch of 233 steps on 8 A100s: the paper code's users (README)


def data_folder(args):
    """The paper preset's prepared --data folder, resolved as the stages resolve it (a folder, else a name under
    data/); one error line naming the prepare command when a split of --cot is missing: nothing here downloads."""
    folder = ROOT / args.data if (ROOT / args.data).is_dir() else ROOT / "data" / args.data
    for split in ("train", "validation", "test"):
        path = folder / f"{split}_{args.cot}.jsonl"
        if not path.is_file():
            name = folder.name
            how = (f"`python data/mwp_reft/prepare.py --dataset {MWP_REFT[name]}` (it downloads the paper's files; "
                   f"offline, add --source DIR with a copy)" if name in MWP_REFT else
                   f"`python data/{name}/prepare.py`" if (ROOT / "data" / name / "prepare.py").is_file() else
                   f"a prepare script of data/ with --out_dir {args.data}")
            raise SystemExit(f"error: --data {args.data}: {path} not found; prepare it first: {how}")
    return folder


def quickstart_args(argv=None):
    """The flags, with the preset's values filled in; --fast shrinks every stage of the cpu preset to a smoke
    test. Every check runs here, before any stage starts."""
    args = parse_args(Args, argv)
    check_ranges(args, RANGES)
    if args.preset == "cpu" and args.model not in ("", "tiny"):
        raise SystemExit(f"error: --model {args.model}: the cpu preset trains `tiny` (--preset paper takes others)")
    if args.preset == "cpu" and args.data:
        raise SystemExit("error: --data is the paper preset's: the cpu preset prepares minigsm itself")
    if args.preset == "paper" and (args.fast or args.compare):
        raise SystemExit(f"error: --{'fast' if args.fast else 'compare'} is the cpu preset's; a small paper-preset "
                         f"run takes the size flags (--sft_epochs, --reft_steps, -k, --verifier_samples, ...)")
    preset = dict(PRESETS[args.preset], kl_coef=PAPER_KL[args.cot]) if args.preset == "paper" else PRESETS[args.preset]
    if args.lora_rank:  # the stages scale only an lr left at -1, and the preset passes its lrs explicitly
        preset = dict(preset, sft_lr=preset["sft_lr"] * LORA_LR_SCALE, reft_lr=preset["reft_lr"] * LORA_LR_SCALE)
    args = dataclasses.replace(args, **{name: value for name, value in preset.items()
                                        if getattr(args, name) in (-1, "")})
    if args.fast:
        args = dataclasses.replace(args, n_train=64, sft_epochs=3, warmup_epoch=1, reft_steps=3, reft_batch_size=8,
                                   k=2, verifier_samples=2, max_new_tokens=16, offline_st_epochs=1,
                                   gold_samples=True)
    if args.warmup_epoch > args.sft_epochs:
        raise SystemExit(f"error: --warmup_epoch {args.warmup_epoch} is after the last of --sft_epochs "
                         f"{args.sft_epochs}")
    if args.preset == "cpu":
        args = dataclasses.replace(
            args, reft_max_length=96 + args.max_new_tokens if args.reft_max_length == -1 else args.reft_max_length,
            reft_eval_every=max(1, args.reft_steps // 10) if args.reft_eval_every == -1 else args.reft_eval_every)
    else:
        folder = data_folder(args)
        local = (ROOT / args.model / "config.json").is_file()
        if args.model not in KNOWN_MODELS and args.model != "tiny" and not local:
            raise SystemExit(f"error: --model {args.model}: the paper preset takes {', '.join(KNOWN_MODELS)}, `tiny` "
                             f"or a local HF folder (whose config.json gives the estimate its parameter count)")
        if args.reft_eval_every == -1:  # one validation evaluation per ReFT epoch, the last step's included
            per_epoch = max(1, count_lines(folder / f"train_{args.cot}.jsonl") // args.reft_batch_size)
            args = dataclasses.replace(args, reft_eval_every=min(per_epoch, args.reft_steps) if args.reft_steps > 0
                                       else per_epoch)
    check_output_dir(str(ROOT / args.out_dir), "--out_dir")
    return args


def count_lines(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def launch(args, script):
    """How a stage script starts: on one process plain, else under torchrun, as `python -m torch.distributed.run`
    so that the launcher is the one of this interpreter's environment."""
    if args.nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", args.nproc, script]


def model_size(args, out):
    """(N parameters, KV-cache bytes per token of context in bf16, where N comes from, the config's sizes). The
    paper's models: counted from their published configs; a local model: its config.json built on the meta device
    (no weights read); `tiny` before its run: sft.py's tiny Llama at its default --tiny_* sizes and the largest
    vocabulary its BPE can have."""
    if args.model in KNOWN_MODELS:
        n, sizes, source = KNOWN_MODELS[args.model]
        return n, 2 * sizes["num_hidden_layers"] * sizes["hidden_size"] * 2, source, SimpleNamespace(**sizes)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
    path = out / "sft/init" if args.model == "tiny" else ROOT / args.model
    if (path / "config.json").is_file():
        config, source = AutoConfig.from_pretrained(path), f"counted from {path}/config.json"
    else:
        import sft
        a = sft.Args()
        config = LlamaConfig(vocab_size=a.tiny_vocab, hidden_size=a.tiny_hidden, num_hidden_layers=a.tiny_layers,
                             num_attention_heads=a.tiny_heads, num_key_value_heads=a.tiny_heads,
                             intermediate_size=a.tiny_intermediate, tie_word_embeddings=True)
        source = f"sft.py's tiny Llama at its default sizes, vocabulary ≤ {a.tiny_vocab}"
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    heads = config.num_attention_heads
    kv_width = config.hidden_size // heads * (getattr(config, "num_key_value_heads", None) or heads)
    return n, 2 * config.num_hidden_layers * kv_width * 2, source, config


def data_stats(args, folder):
    """Question counts of the splits, mean token counts (characters / CHARS_PER_TOKEN) of the prompts and the gold
    CoTs (+ EOS) and the longest sampling prompts of train and test, measured on the prepared files."""
    def tokens(texts):
        return statistics.fmean(len(t) for t in texts) / CHARS_PER_TOKEN

    def longest(texts):
        return max(len(t) for t in texts) / CHARS_PER_TOKEN
    train = reward.load_records(str(folder), "train", args.cot, require_cot=True)
    test = reward.load_records(str(folder), "test", args.cot)
    n_validation = len(reward.load_records(str(folder), "validation", args.cot))
    return dict(n_train=len(train), n_validation=n_validation, n_eval=min(EVAL_LIMIT, n_validation),
                n_test=len(test), prompt=tokens(reward.build_prompt(r["question"], args.cot) for r in train),
                cot=tokens(reward.build_target(r, args.cot) for r in train) + 1,
                test_prompt=tokens(reward.build_prompt(r["question"], args.cot) for r in test),
                longest_prompt=longest(reward.build_prompt(r["question"], args.cot, sampling=True) for r in train),
                longest_test_prompt=longest(reward.build_prompt(r["question"], args.cot, sampling=True)
                                            for r in test))


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


def memory_per_gpu(args, n, config, d):
    """{stage: estimated peak bytes per GPU} of the paper preset's commands on --nproc GPUs in bf16: the stages' own
    arithmetic (memory_estimate, which each stage checks against its GPU before loading) with their flags
    (PAPER_FLAGS, the stages' defaults for the rest: a generation batch of GEN_BATCH) and the prepared data's longest
    prompts (characters / CHARS_PER_TOKEN). A stage that trains holds the weights, AdamW's moments and the gradients
    (12 + 4 bytes per parameter), ReFT also the reference (4); with --lora_rank, as the stages' memory_error: the
    frozen base in bf16 (2), no reference, 12 + 4 bytes per trained parameter (lora_params)."""
    W, prompt, test_prompt = args.nproc, d["longest_prompt"], d["longest_test_prompt"]
    trained = lora_params(config, args.lora_rank) / n  # per parameter of the whole model, as memory_estimate takes it
    state, grads = (2 + 12 * trained, 4 * trained) if args.lora_rank else (12, 4)
    sft = memory_estimate(n, config, W, True, state, grads, 6 * 1024, True, GEN_BATCH * (prompt + args.max_new_tokens))
    rollout = max(1, args.reft_batch_size * args.num_samples // W)
    reft = memory_estimate(n, config, W, True, state + 4 * (not args.lora_rank), grads, 4 * args.reft_max_length, True,
                           max(rollout, GEN_BATCH) * args.reft_max_length)
    sampling = memory_estimate(n, config, W, True, 4, 0, 0, False,
                               min(GEN_BATCH, args.verifier_samples) * (prompt + args.max_new_tokens))
    verifier = memory_estimate(n, config, W, True, state, grads, 6 * 700, False, 0)
    evaluation = memory_estimate(n, config, W, True, 4, 0, 0, False, GEN_BATCH * (test_prompt + args.max_new_tokens))
    name = f" (LoRA rank {args.lora_rank})" if args.lora_rank else ""
    return {"SFT" + name: max(sft.values()), "ReFT" + name: max(reft.values()),
            "verifier": max(sampling["generation"], verifier["training"]), "evaluation": evaluation["generation"]}


def lora_params(config, rank):
    """The parameters LoRA of `rank` trains in a causal LM of `config`, r × (in + out) per adapted projection and layer
    (reft.py's LORA_TARGETS: Llama's q, k, v, o, gate, up, down; OPT's q, k, v, out, fc1, fc2): reft.py's lora_params
    counted from the sizes, as the stages are not imported here."""
    h, heads = config.hidden_size, config.num_attention_heads
    if hasattr(config, "ffn_dim"):  # OPT (Galactica)
        per_layer = 4 * (h + h) + 2 * (h + config.ffn_dim)
    else:
        kv = h // heads * (getattr(config, "num_key_value_heads", None) or heads)
        per_layer = 2 * (h + h) + 2 * (h + kv) + 3 * (h + config.intermediate_size)
    return rank * config.num_hidden_layers * per_layer


def gb(n_bytes):
    return f"{n_bytes / 1e9:,.1f} GB"


def paper_estimate(args, out):
    """The paper preset's GPU hours and disk as lines of text: arithmetic from per-token costs, each stated with
    its source, and the data files' measured sizes."""
    n, kv, source, config = model_size(args, out)
    d = data_stats(args, data_folder(args))
    tp, tc, tt = d["prompt"], d["cot"], d["test_prompt"]
    per_epoch = max(1, d["n_train"] // args.reft_batch_size)
    steps = args.reft_steps if args.reft_steps > 0 else per_epoch * args.reft_epochs
    rollouts = steps * args.reft_batch_size * args.num_samples
    samples = d["n_train"] * args.verifier_samples

    def compute(tokens, flops_per_token):  # compute-bound: at MFU × the peak
        flops = flops_per_token * n * tokens
        return tokens, flops, flops / (PEAK_FLOPS * MFU) / 3600

    def decode(tokens, batch, context):  # memory-bound: a step reads the weights and the batch's KV cache
        seconds_per_step = (2 * n + batch * context * kv) / (HBM_BYTES * DECODE_SHARE)
        return tokens, 2 * n * tokens, tokens / batch * seconds_per_step / 3600

    rollout_batch = max(1, args.reft_batch_size * args.num_samples // args.nproc)
    rows = [  # (stage, what it counts, (tokens, FLOPs, GPU-hours))
        ("SFT training", f"{args.sft_epochs} epochs × {d['n_train']:,} examples, 8·N per token",
         compute(args.sft_epochs * d["n_train"] * (tp + tc), 8)),
        ("SFT validation", f"{args.sft_epochs} × {d['n_eval']} greedy CoTs, batch {GEN_BATCH}",
         decode(args.sft_epochs * d["n_eval"] * tc, GEN_BATCH, tp + tc / 2)),
        ("ReFT rollouts", f"{steps:,} steps × {args.reft_batch_size * args.num_samples} CoTs, {rollout_batch} per "
         f"process", decode(rollouts * tc, rollout_batch, tp + tc / 2)),
        ("ReFT forwards + PPO", "old policy and reference forwards 2 × 2·N + 2 PPO epochs × 8·N per token",
         compute(rollouts * (tp + tc), 20)),
        ("ReFT validation", f"{steps // args.reft_eval_every:,} × {d['n_eval']} greedy CoTs, batch {GEN_BATCH}",
         decode(steps // args.reft_eval_every * d["n_eval"] * tc, GEN_BATCH, tp + tc / 2)),
        ("verifier samples", f"{d['n_train']:,} questions × {args.verifier_samples}, batch {GEN_BATCH}",
         decode(samples * tc, GEN_BATCH, tp + tc / 2)),
        ("verifier training ×2", "3 epochs over every sample (at most: duplicates are dropped), 6·N per token",
         compute(2 * 3 * samples * (tp + tc), 6)),
        ("test generation ×2", f"{d['n_test']:,} questions × (greedy + {args.k} samples), batch {GEN_BATCH}",
         decode(2 * d["n_test"] * (1 + args.k) * tc, GEN_BATCH, tt + tc / 2)),
        ("test verifier scores ×2", f"{d['n_test']:,} × {args.k} samples, 2·N per token",
         compute(2 * d["n_test"] * args.k * (tt + tc), 2)),
    ]
    total = sum(r[2][2] for r in rows)
    reft = sum(r[2][2] for r in rows if r[0].startswith("ReFT"))
    hours, gpus, steps_reported = REFT_REPORTED
    reported = steps * hours * gpus / steps_reported
    lines = [
        f"estimate, --preset paper: {args.model} on {args.data} ({args.cot} CoTs), {args.nproc} processes (GPUs); "
        f"arithmetic, not a measurement",
        f"  N = {n:,} parameters: {source}",
        f"  data ({data_folder(args)}): {d['n_train']:,} training questions, {d['n_validation']:,} validation "
        f"({d['n_eval']} per evaluation), {d['n_test']:,} test; mean {tp:.1f} prompt and {tc:.1f} CoT tokens "
        f"(+ EOS), {tt:.1f} per test prompt; tokens = characters / {CHARS_PER_TOKEN} (assumed: no tokenizer is read)",
        "  per-token costs: training 6·N FLOPs (forward 2·N + backward 4·N: Kaplan et al. 2020, Scaling Laws for "
        "Neural Language Models), 8·N with gradient checkpointing (one more forward), which SFT and PPO use here; a "
        "forward 2·N",
        f"  GPU: A100 80 GB, {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 dense peak and {HBM_BYTES / 1e9:,.0f} GB/s "
        f"(NVIDIA's A100 datasheet); training and forwards at an assumed MFU of {MFU:.0%}",
        f"  decoding is memory-bound: a step reads the bf16 weights (2·N bytes) and the batch's KV cache ({kv:,} "
        f"bytes per token of context) at an assumed {DECODE_SHARE:.0%} of the bandwidth; every CoT is assumed to "
        f"stop at the gold CoTs' mean length (a batch runs as long as its longest one, so this is a lower bound)",
        "  | stage | tokens | FLOPs | GPU-hours | what |", "  |---|---|---|---|---|",
        *(f"  | {name} | {tokens:,.0f} | {flops:.3e} | {h:.4g} | {what} |" for name, what, (tokens, flops, h) in rows),
        f"  total: {total:.4g} GPU-hours, {total / args.nproc:.4g} hours on {args.nproc} GPUs if they scale "
        f"perfectly",
        f"  cross-check: this arithmetic gives ReFT {reft * per_epoch / steps / args.nproc:.3g} hours per epoch "
        f"({per_epoch} steps) on {args.nproc} GPUs; the paper code's users reported ~{hours:g} hours per epoch of "
        f"{steps_reported} steps on {gpus} × A100 (README), {reported:.4g} GPU-hours for these {steps:,} steps. "
        f"With that figure the total is {total - reft + reported:.4g} GPU-hours, "
        f"{(total - reft + reported) / args.nproc:.4g} hours on {args.nproc} GPUs",
    ]
    memory = memory_per_gpu(args, n, config, d)
    lines.append(
        "  memory per GPU, peak (docs/scaling.md's arithmetic, which each stage checks against its GPU before "
        "loading): " + ", ".join(f"{stage} {gb(b)}" for stage, b in memory.items())
        + f" on {args.nproc} GPUs; an A100 has 80 GB"
        + ("" if max(memory.values()) <= 80e9 else
           f" ({', '.join(s for s, b in memory.items() if b > 80e9)} would stop: more GPUs needed)"))
    checkpoint, state = 2 * n, 12 * n
    n_checkpoints = 7 + (args.model == "tiny")  # + sft/init, the tiny model's initial weights
    text = (samples + 2 * d["n_test"] * (1 + args.k)) * (tc * CHARS_PER_TOKEN + ROW_BYTES)
    end = n_checkpoints * checkpoint + text
    lines.append(
        f"  disk: {n_checkpoints} checkpoints × {gb(checkpoint)} (bf16, 2 bytes per parameter: sft/warmup, best, "
        f"final; reft/best, final; each verifier's final{'; sft/init' if args.model == 'tiny' else ''}) + "
        f"{gb(text)} of samples and predictions ({ROW_BYTES} bytes per row besides the CoT, assumed) = {gb(end)} at "
        f"the end; at the peak {gb(end + 2 * state)}, with the running stage's two resume states of {gb(state)} "
        f"(12 bytes per parameter: fp32 weights and AdamW's two moments; a stage keeps its last two, and this "
        f"script removes them when it finishes)")
    return lines


def cpu_estimate(args, out):
    """The cpu preset's estimate: its size and the measured time of the full run."""
    n, _, source, _ = model_size(args, out)
    peak = 8 * 4 * n + 2 * 12 * n  # fp32 checkpoints: sft/init, warmup, best, final; reft/best, final; 2 verifiers
    return [f"estimate, --preset cpu: tiny, N = {n:,} parameters ({source}), fp32 on the CPU",
            "  time: the full run took 26.9 minutes on 2 cores (measured, README and docs/experiments.md); --fast "
            "takes a few minutes, --compare adds about 1.5 hours",
            f"  disk: 8 checkpoints × 4 bytes per parameter + the running stage's 2 resume states × 12 bytes per "
            f"parameter = {peak / 1e6:.0f} MB at most, and the data and samples (a few MB)"]


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
            p.name in ("args.json", "metrics.jsonl", "samples.jsonl", "final", "best", "warmup", "init")
            or p.name.startswith(("checkpoint", "epoch_")) for p in out.iterdir()):
        cmd = cmd + [resume_flag]
        print(f"[{name}] resuming an interrupted run in {out}", flush=True)
    print(f"[{name}] {' '.join(str(c) for c in cmd)}", flush=True)
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"error: stage {name} failed (exit {p.returncode}); run the command again to resume")
    timings[name] = timings.get(name, 0.0) + time.time() - t0
    # A finished stage is skipped from now on, so its resume states (the last two, 12 bytes per parameter each:
    # 162 GB for a 7B model) are no longer needed.
    states = sorted(out.glob("checkpoint-*")) if resume_flag and out is not None else []
    for path in states:
        shutil.rmtree(path)
    if states:
        print(f"[{name}] finished: removed its resume states {', '.join(p.name for p in states)}", flush=True)


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


def rl_command(args, common, W, key, out):
    """reft.py from W for method `key`: the run's length, lr, samples per question, lengths and validation
    evaluations for every method, so that they differ only by rl_flags; the best evaluation is kept (--save_best),
    and the resume state is written at each evaluation."""
    length = (["--epochs", args.reft_epochs] if args.reft_epochs > 0 else []) + \
        (["--max_steps", args.reft_steps] if args.reft_steps > 0 else [])
    prompts = ["--max_prompt_length", 96] if args.preset == "cpu" else PAPER_FLAGS["reft"]
    lora = ["--lora_rank", args.lora_rank] if args.lora_rank else []
    return [*launch(args, "reft.py"), *common, "--model", W, *length, *lora, "--lr", args.reft_lr,
            "--batch_size", args.reft_batch_size, "--num_samples", args.num_samples, *rl_flags(args, key),
            "--max_length", args.reft_max_length, *prompts, "--eval_every", args.reft_eval_every,
            "--save_steps", args.reft_eval_every, "--save_best", "--output_dir", out / key]


def pipeline(args, out):
    """Stages 1-5 in order, each (name, the file that says it finished, command, its resume flag or "")."""
    W, S, R = out / "sft/warmup", out / "sft/best", out / "reft/best"
    lora = ["--lora_rank", args.lora_rank] if args.lora_rank else []
    lr_scale = LORA_LR_SCALE if args.lora_rank else 1  # the paper verifier's --lr, as the presets' lrs

    def paper(name):
        flags = PAPER_FLAGS[name] if args.preset == "paper" else []
        return [round(f * lr_scale, 12) if before == "--lr" else f for before, f in zip([None, *flags], flags)] + lora
    stages = []
    if args.preset == "cpu":
        data = out / "data"
        sizes = ["--n_validation", 64, "--n_test", 64, "--n_shifted", 32] if args.fast else []
        stages.append(("data", data / "test_larger_python.jsonl",  # prepare.py's last file: a kill leaves it unwritten
                       [sys.executable, "data/minigsm/prepare.py", "--out_dir", data, "--n_train", args.n_train,
                        "--max_number", args.max_number, "--seed", args.seed, *sizes], ""))
    else:
        data = args.data
    common = ["--data", data, "--cot", args.cot, "--seed", args.seed]
    stages.append(("sft", out / "sft/final/config.json",
                   [*launch(args, "sft.py"), *common, "--model", args.model, "--epochs", args.sft_epochs, "--lr",
                    args.sft_lr, "--eval_every_epoch", "--max_new_tokens", args.max_new_tokens, "--warmup_epoch",
                    args.warmup_epoch, "--save_epochs", "none", *paper("sft"), "--output_dir", out / "sft"],
                   "--resume"))
    stages.append(("reft", out / "reft/final/config.json", rl_command(args, common, W, "reft", out), "--resume"))
    samples = out / "verifier_sft/samples.jsonl"
    gold = ["--gold_samples"] if args.gold_samples else []
    stages.append(("verifier_sft", out / "verifier_sft/final/config.json",
                   [*launch(args, "rerank.py"), *common, "--model", W, "--init", S, "--num_samples",
                    args.verifier_samples, "--max_new_tokens", args.max_new_tokens, *gold, *paper("verifier"),
                    "--output_dir", out / "verifier_sft"], "--resume"))
    stages.append(("verifier_reft", out / "verifier_reft/final/config.json",
                   [*launch(args, "rerank.py"), *common, "--model", W, "--init", R, "--samples", samples, *gold,
                    *paper("verifier"), "--output_dir", out / "verifier_reft"], "--resume"))
    for name, model in (("sft", S), ("reft", R)):
        ev = out / f"eval_{name}"
        stages.append((f"evaluate_{name}", ev / "results.json",
                       [*launch(args, "evaluate.py"), "--mode", "all", "--model", model, "--verifier",
                        out / f"verifier_{name}/final", "--data", data, "--cot", args.cot, "--split", "test", "-k",
                        args.k, "--max_new_tokens", args.max_new_tokens, "--seed", args.seed, "--output_dir", ev],
                       ""))  # evaluate.py does not resume: it rewrites its results
    return stages


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def best_eval(metrics, key="eval_accuracy"):
    """(row, value) of the best evaluation; the earliest one on ties."""
    rows = [m for m in metrics if key in m]
    best = max(rows, key=lambda m: m[key])
    return best, best[key]


def plots(out, sft_metrics, reft_metrics, table, data_name):
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
    a.set(ylabel="test accuracy (%)", title=f"{data_name} test")
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
    data = out / "data"
    samples = out / "verifier_sft/samples.jsonl"
    run("offline_st", out / "offline_st/final/config.json",
        [*launch(args, "sft.py"), *common, "--model", "tiny", "--epochs", args.offline_st_epochs, "--lr",
         args.sft_lr, "--eval_every_epoch", "--max_new_tokens", args.max_new_tokens, "--warmup_epoch", 0,
         "--save_epochs", "none", "--extra_samples", samples, "--output_dir", out / "offline_st"])
    chosen["offline_st"] = (out / "offline_st/best", best_eval(read_jsonl(out / "offline_st/metrics.jsonl"))[1])
    for key in ("online_st", "reft_grpo", "reft_binary"):
        run(key, out / f"{key}/final/config.json", rl_command(args, common, W, key, out))
        chosen[key] = (out / f"{key}/best", best_eval(read_jsonl(out / f"{key}/metrics.jsonl"))[1])

    for _, key in METHODS:
        for split in SPLITS:
            name, folder = evaluation(key, split)
            run(name, out / folder / "results.json",
                [*launch(args, "evaluate.py"), "--mode", "all", "--model", chosen[key][0], "--data", data, "--cot",
                 args.cot, "--split", split, "-k", args.k, "--max_new_tokens", args.max_new_tokens, "--seed", args.seed,
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


# The table's metrics: evaluate.py's name and compare.py's mode of each
TABLE_METRICS = {"greedy": "greedy", "vote": "vote", "rerank": "rerank", "pass@k": "pass_at_k"}


def signed(diff):
    return f"{100 * diff:+.1f}".replace("-", "−")


def report(args, out, timings, t_start):
    """Stage 6: results.json, results.md and the plots from the finished stages; (S, R, best SFT row, results)."""
    sft_metrics = read_jsonl(out / "sft/metrics.jsonl")
    best_sft, _ = best_eval(sft_metrics)
    S, R = out / "sft/best", out / "reft/best"
    reft_metrics = read_jsonl(out / "reft/metrics.jsonl")
    table = {}
    for name, model in (("SFT", S), ("ReFT", R)):
        res = json.loads((out / f"eval_{name.lower()}/results.json").read_text())
        table[name] = dict(res["accuracy"], k=res["k"], n=res["n"], checkpoint=str(model.relative_to(out)))
    # ReFT − SFT per metric with its 95% paired bootstrap interval over the test questions (SFT is A, ReFT is B)
    c = compare(load_predictions(out / "eval_sft"), load_predictions(out / "eval_reft"))
    minus = {m: {"diff": c[f"{mode}_b_minus_a"], "ci95": c[f"{mode}_b_minus_a_ci95"]}
             for m, mode in TABLE_METRICS.items()}
    results = {
        "table": table, "reft_minus_sft": minus,
        "reft_minus_sft_top1": table["ReFT"]["greedy"] - table["SFT"]["greedy"],
        "reft_minus_sft_top1_ci95": minus["greedy"]["ci95"],
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
        lines.append(f"| {name} ({row['checkpoint']}) | " + " | ".join(f"{100 * row[m]:.1f}" for m in TABLE_METRICS)
                     + " |")
    lines.append("| ReFT − SFT [95% interval] | " + " | ".join(
        f"{signed(minus[m]['diff'])} [{signed(minus[m]['ci95'][0])}, {signed(minus[m]['ci95'][1])}]"
        for m in TABLE_METRICS) + " |")
    lines.append(f"\nTest accuracy in %, n = {table['SFT']['n']} test questions; ReFT − SFT in points, with its 95% "
                 f"paired bootstrap interval over the questions (scripts/compare.py); stages took "
                 f"{sum(timings.values()) / 60:.1f} min in all.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plots(out, sft_metrics, reft_metrics, table, "minigsm" if args.preset == "cpu" else Path(args.data).name)
    print("\n".join(lines))
    print(f"\nresults: {out / 'results.json'}, table: {out / 'results.md'}, plots: {out}/{{sft,reft,table}}.png")
    return S, R, best_sft, results


def main(args):
    out = (ROOT / args.out_dir).resolve()
    stages = pipeline(args, out)
    print("\n".join(paper_estimate(args, out) if args.preset == "paper" else cpu_estimate(args, out)), flush=True)
    if args.estimate_only:
        print("\nthe stages' commands (each is skipped when its output exists, and resumes when interrupted):")
        for name, _, cmd, _ in stages:
            print(f"[{name}] {' '.join(str(c) for c in cmd)}")
        return
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t_start = time.time()

    def run(name, done, cmd, **kw):
        stage(name, done, cmd, timings, **kw)
        timings_path.write_text(json.dumps(timings, indent=1))

    for name, done, cmd, resume_flag in stages:
        run(name, done, cmd, resume_flag=resume_flag)
    S, R, best_sft, results = report(args, out, timings, t_start)
    if args.compare:
        common = ["--data", out / "data", "--cot", args.cot, "--seed", args.seed]
        compare_stages(args, out, run, timings, common, out / "sft/warmup",
                       {"sft": (S, best_sft["eval_accuracy"]), "reft": (R, results["reft_best_validation"])})


if __name__ == "__main__":
    main(quickstart_args())
