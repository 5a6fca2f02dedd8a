"""Training-step MFU of sft.py on CPU: 6 × params × tokens/s over the fp32 matmul peak measured in the same run.

    python benchmarks/mfu.py                       # tiny (30 steps) and a wider model (20 steps)
    python benchmarks/mfu.py --steps 8 --skip 3 --no-wide

Runs the real script (`sft.py --model tiny --data minigsm`, batch 32, --threads threads) and reads tokens_per_s
from its metrics.jsonl, skipping the first --skip steps; the figure is the median step. sft.py counts non-pad
tokens, and each step's wall time covers forward, backward, clipping, AdamW and the scheduler.

- params: all parameters with the tied embedding counted once: it is the LM head's matmul (the embedding lookup
  itself costs nothing), so 6·N is the right count of matmul FLOPs per token. Attention-score FLOPs are left out
  (the usual 6N convention; they would add about 5-8% at these lengths). MFU over non-embedding params too.
- peak: the best 2048×2048 fp32 matmul rate at --threads threads, measured before and after the runs (the larger
  of the two is used, so one busy moment cannot inflate MFU).
- padding: the batches are right-padded to their longest example; `padding_efficiency` is non-pad / all tokens
  of the measured steps (recomputed with sft.py's own batching), and `mfu_padded` counts the pad tokens too,
  i.e. how busy the matmuls really were.
- sft.py saves its resume state at each epoch end (12 steps on minigsm): MFU before and after that first save
  is reported apart, so a save that slows the later steps shows. One did (tiny 10-25%): DCP's collectives on the
  default gloo group left gloo's worker threads with OpenMP teams of their own, and libgomp, seeing more threads
  than cores, stopped spin-waiting (save_resume_state now gives DCP a group of its own and destroys it).
- op_profile: one replayed tiny step under torch.profiler, self time by kind of op (matmul, attention,
  optimizer, FSDP, everything else): what keeps tiny below the target.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, matmul_gflops, median, run_quiet, write_json  # noqa: E402

import reward  # noqa: E402
import sft  # noqa: E402

TARGET = 0.40


def padding_efficiency(init_dir, steps, batch_size, seed=42, max_length=512):
    """Non-pad / padded tokens over sft.py's batches number `steps` (0-based), built as sft.main builds them;
    also returns the steps per epoch."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(init_dir))
    records = reward.load_records("minigsm", "train", "nl", require_cot=True)
    examples = [e for e in (sft.encode_example(tok, r, "nl", max_length) for r in records) if e is not None]
    per_epoch = len(examples) // batch_size
    real = padded = 0
    for s in steps:
        epoch, i = divmod(s, per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
        lengths = [len(examples[j][0]) for j in order[i * batch_size:(i + 1) * batch_size].tolist()]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return real / padded, per_epoch


def measure(name, extra, args):
    """Run sft.py and return its median tokens/s with the model's parameter counts and padding efficiency."""
    from transformers import AutoModelForCausalLM
    out = BENCH_DIR / f"sft_{name}"
    cmd = [sys.executable, "sft.py", "--model", "tiny", "--data", "minigsm", "--output_dir", out, "--max_steps",
           args.steps, "--batch_size", args.batch_size, "--micro_batch_size", args.batch_size, "--save_epochs", "none",
           "--save_steps", 10 ** 6, "--overwrite", *extra]  # a measurement run again replaces the last one
    waited, foreign, runs = run_quiet(cmd, args.max_wait, threads=args.threads, retries=args.retries,
                                      log=BENCH_DIR / f"sft_{name}.log")
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f][args.skip:]
    model = AutoModelForCausalLM.from_pretrained(str(out / "init"))
    n_all = sum(p.numel() for p in model.parameters())  # parameters() yields the tied weight once
    pad_eff, per_epoch = padding_efficiency(out / "init", [r["step"] - 1 for r in rows], args.batch_size)
    # sft.py writes its resume state (torch.distributed.checkpoint) at each epoch end; the two stretches are
    # reported apart as well, so a save that slows the later steps shows.
    before = [r["tokens_per_s"] for r in rows if r["step"] <= per_epoch]
    after = [r["tokens_per_s"] for r in rows if r["step"] > per_epoch]
    c = model.config
    return {"config": {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                       "intermediate": c.intermediate_size, "vocab": c.vocab_size, "batch": args.batch_size,
                       "steps": args.steps, "skipped": args.skip},
            "params": n_all, "non_embedding_params": n_all - model.get_input_embeddings().weight.numel(),
            "tokens_per_s": median([r["tokens_per_s"] for r in rows]),
            "tokens_per_s_all": [r["tokens_per_s"] for r in rows],
            "tokens_per_s_before_first_checkpoint": median(before) if before else None,
            "tokens_per_s_after_first_checkpoint": median(after) if after else None, "steps_per_epoch": per_epoch,
            "padding_efficiency": pad_eff,
            "waited_for_quiet_s": waited, "foreign_cpu": foreign, "runs": runs}


def op_profile(init_dir, batch_size, steps=3):
    """Where one sft.py training step on this model spends its time, by kind of op (torch.profiler self time).

    A replay of sft.main's step with sft's own functions (1-process FSDP2 group, token_nll_sum, clipping, AdamW)
    on the first batch of minigsm; `matmul` is the GEMMs the 6N count is about, the rest is overhead to them."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rank, world, device, mesh = sft.init_distributed()
    tok = AutoTokenizer.from_pretrained(str(init_dir))
    model = AutoModelForCausalLM.from_pretrained(str(init_dir))
    model.config.use_cache = False
    records = reward.load_records("minigsm", "train", "nl", require_cot=True)[:batch_size]
    input_ids, labels, attn = sft.collate([sft.encode_example(tok, r, "nl", 512) for r in records], tok.pad_token_id)
    sft.shard(model, mesh, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def step():
        (sft.token_nll_sum(model, input_ids, labels, attn) / attn.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    kinds = {"matmul (mm/addmm/bmm)": 0.0, "attention (sdpa fwd+bwd)": 0.0, "optimizer + clipping (_foreach)": 0.0,
             "FSDP2 hooks and copies": 0.0, "other ops (norms, rotary, silu, softmax, loss, ...)": 0.0}
    for e in prof.key_averages():
        name, t = e.key, e.self_cpu_time_total / 1e6 / steps
        if name in ("aten::mm", "aten::addmm", "aten::bmm"):
            kinds["matmul (mm/addmm/bmm)"] += t
        elif "scaled_dot_product" in name:
            kinds["attention (sdpa fwd+bwd)"] += t
        elif "_foreach" in name or "Optimizer" in name:
            kinds["optimizer + clipping (_foreach)"] += t
        elif "FSDP" in name or "fsdp" in name or "all_gather" in name or "reduce_scatter" in name:
            kinds["FSDP2 hooks and copies"] += t
        elif name.startswith("aten::"):
            kinds["other ops (norms, rotary, silu, softmax, loss, ...)"] += t
    total = sum(kinds.values())
    tokens = int(attn.sum())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print(f"op profile of one step ({tokens} tokens, {input_ids.numel()} with padding), self time per kind:")
    for k, v in kinds.items():
        print(f"  {k:52s} {1000 * v:7.1f} ms  {100 * v / total:5.1f}%")
    return {"tokens": tokens, "padded_tokens": input_ids.numel(), "seconds_by_kind": kinds, "total_s": total,
            "top_ops_s": {e.key: e.self_cpu_time_total / 1e6 / steps for e in top}}


def add_mfu(name, r, peak):
    r["achieved_gflops"] = 6 * r["params"] * r["tokens_per_s"] / 1e9
    r["mfu"] = r["achieved_gflops"] / peak
    r["mfu_non_embedding"] = 6 * r["non_embedding_params"] * r["tokens_per_s"] / 1e9 / peak
    r["mfu_padded"] = r["mfu"] / r["padding_efficiency"]
    for part in ("before", "after"):
        tps = r[f"tokens_per_s_{part}_first_checkpoint"]
        r[f"mfu_{part}_first_checkpoint"] = tps and 6 * r["params"] * tps / 1e9 / peak
    print(f"{name}: {r['params'] / 1e6:.2f} M params, {r['tokens_per_s']:.0f} tok/s, {r['achieved_gflops']:.1f} "
          f"GFLOP/s, MFU {100 * r['mfu']:.1f}% (non-embedding {100 * r['mfu_non_embedding']:.1f}%; counting pad "
          f"tokens {100 * r['mfu_padded']:.1f}%, padding efficiency {100 * r['padding_efficiency']:.0f}%)")
    if r["mfu_before_first_checkpoint"] and r["mfu_after_first_checkpoint"]:
        print(f"  steps <= {r['steps_per_epoch']} (before sft.py's first resume-state save): MFU "
              f"{100 * r['mfu_before_first_checkpoint']:.1f}%; after it: {100 * r['mfu_after_first_checkpoint']:.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--steps", type=int, default=30, help="sft.py steps of the tiny model")
    p.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up)")
    p.add_argument("--batch_size", type=int, default=32, help="examples per step (one micro-batch)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of sft.py and of the matmul peak")
    p.add_argument("--wide", default="512,4,8,1536", help="hidden,layers,heads,intermediate of the second model")
    p.add_argument("--wide_steps", type=int, default=20, help="sft.py steps of the second model")
    p.add_argument("--no-wide", dest="no_wide", action="store_true", help="measure tiny only")
    p.add_argument("--max_wait", type=float, default=120, help="seconds to wait for a quiet machine before a run")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run measured on a busy machine")
    p.add_argument("--json", help="write the figures to this JSON file (None: print only)")
    args = p.parse_args()
    peak_before = matmul_gflops(threads=args.threads)
    res = {"tiny": measure("tiny", [], args)}
    if not args.no_wide:
        h, n_layers, heads, inter = args.wide.split(",")
        args.steps = args.wide_steps
        res["wide"] = measure("wide", ["--tiny_hidden", h, "--tiny_layers", n_layers, "--tiny_heads", heads,
                                       "--tiny_intermediate", inter], args)
    torch.set_num_threads(args.threads)
    res["tiny"]["op_profile"] = op_profile(BENCH_DIR / "sft_tiny" / "init", args.batch_size)
    peak_after = matmul_gflops(threads=args.threads)
    peak = max(peak_before, peak_after)
    print(f"fp32 2048x2048 matmul peak, {args.threads} threads: {peak:.0f} GFLOP/s (before the runs "
          f"{peak_before:.0f}, after {peak_after:.0f})")
    for name, r in res.items():
        add_mfu(name, r, peak)
    res.update(peak_gflops=peak, peak_gflops_before=peak_before, peak_gflops_after=peak_after, target=TARGET,
               target_met=res["tiny"]["mfu"] >= TARGET)
    print(f"tiny MFU {100 * res['tiny']['mfu']:.1f}% (target >= {100 * TARGET:.0f}%)")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
