"""FSDP2 rollout on 2 CPU processes: parameters gathered once per rollout against an all-gather per layer per token.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_rollout.py
    (run_all.py launches it that way; --repeats 1 for a smoke test)

The policy is reft.py's: reft.load_models, sharded by reft.shard (each decoder layer, the heads, the root;
gloo, fp32) on the `tiny` checkpoint, one warm-up forward through the root as reft.main does. Each rank samples its
half of a 32-prompt batch for exactly --response_length tokens with reft.sample (EOS id -1, so no row ever ends
and both ranks run the same number of decode steps; with per-token collectives a rank that stopped early would
leave the other waiting).

- gathered: `with reft.gathered_for_generation(model): sample(model.lm, ...)`, what reft.py does: every FSDP
  module unsharded once, no collective during decoding.
- per-token: reft.sample calls model.lm, a submodule, so the root's forward hooks never fire and the root-level
  parameters (embedding = tied LM head, final norm) would stay sharded. This variant unshards the root's own
  parameters only (`model.unshard()` on the root, which does not recurse) and leaves every decoder layer to its
  FSDP2 pre-forward hook, which all-gathers the layer and reshards it after: 4 all-gathers per decoding step.
Figures: median seconds per rollout over --repeats interleaved runs, the max over the 2 ranks.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_json  # noqa: E402

import reft  # noqa: E402
import reward  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="the policy checkpoint folder (run_all.py makes a tiny one)")
    p.add_argument("--prompts", required=True, help="a .jsonl of records whose prompts share one token length")
    p.add_argument("--batch_size", type=int, default=32, help="prompts summed over ranks")
    p.add_argument("--response_length", type=int, default=32, help="tokens sampled per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of both variants, after one warm-up round")
    p.add_argument("--json", help="write the figures to this JSON file (rank 0; None: print only)")
    args = p.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("error: run me under torchrun --standalone --nproc_per_node 2")
    rank, world, device, mesh = reft.init_distributed()
    tok, model, ref = reft.load_models(reft.Args(model=args.ckpt), mesh, device)
    del ref
    records = reward.load_records(args.prompts)[:args.batch_size][rank::world]
    ids, mask = reft.left_pad([tok(reward.build_prompt(r["question"], "nl", sampling=True),
                                   add_special_tokens=False).input_ids for r in records], tok.pad_token_id, device)
    with torch.no_grad():  # FSDP2 picks its root at the first forward (as reft.main)
        model(ids[:1], mask[:1], ids.size(1))
    model.eval()

    def rollout():
        return reft.sample(model.lm, ids, mask, args.response_length, -1, tok.pad_token_id, 1.0,
                           [1000 * rank + b for b in range(len(ids))])

    def gathered():
        with reft.gathered_for_generation(model):
            return rollout()

    def per_token():
        model.unshard()  # the root's own parameters only
        model.set_reshard_after_forward(False, recurse=False)
        try:
            return rollout()
        finally:
            model.set_reshard_after_forward(True, recurse=False)
            model.reshard()

    times = {"gathered": [], "per_token": []}
    outs = {}
    for k in range(args.repeats + 1):  # the first round is a warm-up
        for name, fn in (("gathered", gathered), ("per_token", per_token)):
            dist.barrier()
            t = time.perf_counter()
            outs[name] = fn()
            dt = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if k:
                times[name].append(dt.item())
    same = torch.equal(outs["gathered"], outs["per_token"])  # same seeds, same weights: identical samples
    res = {"ranks": world, "threads_per_rank": torch.get_num_threads(), "prompts_per_rank": len(ids),
           "response_tokens": args.response_length, "gathered_s": median(times["gathered"]),
           "per_token_s": median(times["per_token"]), "gathered_all": times["gathered"],
           "per_token_all": times["per_token"], "same_samples": same}
    res["speedup"] = res["per_token_s"] / res["gathered_s"]
    if rank == 0:
        print(f"FSDP2 rollout, {world} ranks x {len(ids)} prompts x {args.response_length} tokens: gathered "
              f"{res['gathered_s']:.2f} s, per-token all-gather {res['per_token_s']:.2f} s "
              f"({res['speedup']:.1f}x); identical samples: {same}")
        write_json(args.json, res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
