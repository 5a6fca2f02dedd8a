"""Bytes one Llama layer at 7B width moves per decoded token: DynamicLayer's KV cache against reft's preallocated one.

    python benchmarks/kv_cache_bytes.py                 # 7B width, batch 64, 1,000 cached tokens, bf16: 4 GB, 1 min
    python benchmarks/kv_cache_bytes.py --hidden 256 --heads 4 --intermediate 688 --batch 4 --cached 64 --copy_mb 16

Issue 36's item 4, measured on the CPU. The model: a LlamaForCausalLM of one decoder layer (LlamaConfig with
num_hidden_layers=1; Llama-2-7B's hidden 4096, 32 heads of 128, intermediate 11008, no grouped-query attention),
random weights in --dtype, sdpa attention. Its vocabulary is --vocab (256), so that the embedding and the LM head
are a negligible part of the step and its time is the layer's. Both caches hold --cached tokens of random keys and
values for --batch rows, written through each layer's own update (a real prefill of 64,000 tokens at this width
would take minutes on 2 cores).

One decode step is reft.decode_step, what reft.sample calls on every token: one new token per row, its position,
and an all-ones mask of --cached + 1 columns (reft.sample's mask on unpadded prompts), on a
Cache(layers=[DynamicLayer()]) (transformers' default: torch.cat of the whole cache each token) or on
Cache(layers=[reft.RolloutCacheLayer(cached + 1)]) (keys and values written in place). Before each timed step, the
cache is cropped back to --cached tokens, untimed, so that every step starts from the same length. The two, and the
cat alone (the two torch.cat calls of DynamicLayer.update on the cache's tensors), are interleaved over --repeats
rounds after one warm-up round; the figures are medians.

Figures:
- the arithmetic, from the shapes and --dtype: per decoded token, the layer's weights are read once, attention reads
  the cached K and V, and DynamicLayer's cat reads and writes them once more (2 x the cache's bytes);
- this machine's copy bandwidth: dst.copy_(src) on --copy_mb MB, bytes read + written per second; also into fresh
  memory (src.clone()), as torch.cat's output is: a new allocation, whose pages the kernel zeroes at first touch;
- the measured step times, their difference, and the difference x each bandwidth: the measured estimate of the
  bytes DynamicLayer's step moves beyond the preallocated one's (the arithmetic's is 2 x the cache's bytes);
- the bytes aten::cat allocates in one step of each (torch.profiler, profile_memory=True);
- peak RSS (ru_maxrss).
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, write_json  # noqa: E402

import reft  # noqa: E402  (common put the repo root on sys.path)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def arithmetic(hidden, heads, intermediate, batch, cached, itemsize):
    """Bytes one decoder layer moves per decoded token (no grouped-query attention: as many K/V heads as heads).
    weights: q, k, v, o (hidden x hidden each), gate, up, down (hidden x intermediate each), the two RMSNorms;
    cache: the K and V attention reads, (batch, heads, cached, hidden / heads) each; cat: DynamicLayer's torch.cat
    reads the cache and writes it again, one token longer (the token is left out: 1/cached of it)."""
    weights = (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) * itemsize
    cache = 2 * batch * cached * hidden * itemsize
    return {"weights_bytes": weights, "cache_bytes": cache, "cat_bytes": 2 * cache,
            "preallocated_bytes": weights + cache, "dynamic_bytes": weights + 3 * cache}


def copy_bandwidth(nbytes, dtype, repeats):
    """Bytes read + written per second by dst.copy_(src) into a preallocated dst, and by src.clone() into fresh
    memory; medians over `repeats` after a warm-up that touches every page of src and dst."""
    src = torch.ones(nbytes // dtype.itemsize, dtype=dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    into, fresh = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        into.append(time.perf_counter() - t)
        t = time.perf_counter()
        new = src.clone()
        fresh.append(time.perf_counter() - t)
        del new  # unmapped (glibc mmaps blocks this large): the next clone gets fresh pages again, as each cat does
    moved = 2 * src.numel() * dtype.itemsize
    return moved / median(into), moved / median(fresh)


def cat_bytes_allocated(step):
    """Bytes aten::cat allocates in one call of step() (torch.profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.key == "aten::cat")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (Llama-2-7B's)")
    p.add_argument("--heads", type=int, default=32, help="attention heads, as many K/V heads")
    p.add_argument("--intermediate", type=int, default=11008, help="MLP width")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary: small, so that the step is the layer's")
    p.add_argument("--batch", type=int, default=64, help="rows decoded together")
    p.add_argument("--cached", type=int, default=1000, help="tokens in the KV cache before each timed step")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights, activations and cache")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds of each variant, after one warm-up round")
    p.add_argument("--copy_mb", type=int, default=1024, help="size of the copy-bandwidth tensor, MB (1e6 bytes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", help="write the figures to this JSON file (None: print only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    B, n, H = args.batch, args.cached, args.heads

    # First, while nothing else is allocated: its 3 x copy_mb (src, dst, a clone) do not add to the caches' peak.
    copy_bps, fresh_bps = copy_bandwidth(args.copy_mb * 10 ** 6, dtype, args.repeats)

    config = LlamaConfig(hidden_size=args.hidden, num_attention_heads=H, num_key_value_heads=H,
                         intermediate_size=args.intermediate, num_hidden_layers=1, vocab_size=args.vocab,
                         attn_implementation="sdpa")
    lm = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    layer_bytes = sum(q.numel() * q.element_size() for q in lm.model.layers[0].parameters())
    caches = {"dynamic": Cache(layers=[DynamicLayer()]), "preallocated": Cache(layers=[reft.RolloutCacheLayer(n + 1)])}
    k, v = (torch.randn(B, H, n, args.hidden // H, dtype=dtype) for _ in range(2))
    for c in caches.values():
        c.layers[0].update(k, v)
    del k, v
    inp = torch.randint(args.vocab, (B, 1))
    pos = torch.full((B, 1), n)  # reft.sample's position of the token after an unpadded prompt of n tokens
    mask = torch.ones(B, n + 1, dtype=torch.long)  # its mask[:, :P + t]: the prompt's n columns and this token's
    one_k, one_v = (torch.randn(B, H, 1, args.hidden // H, dtype=dtype) for _ in range(2))

    def step(name):
        past = caches[name]
        past.layers[0].crop(-1)  # back to n tokens: a view of the first n, the storage stays
        t = time.perf_counter()
        reft.decode_step(lm, inp, mask, pos, past)
        return time.perf_counter() - t

    def cat_alone():
        lay = caches["dynamic"].layers[0]
        t = time.perf_counter()
        torch.cat([lay.keys, one_k], -2), torch.cat([lay.values, one_v], -2)
        return time.perf_counter() - t

    with torch.no_grad():
        for name in caches:  # crop drops one token: start each from n + 1
            reft.decode_step(lm, inp, mask, pos, caches[name])
        times = {"dynamic": [], "preallocated": [], "cat": []}
        for r in range(args.repeats + 1):  # the first round is a warm-up
            order = ("dynamic", "preallocated") if r % 2 else ("preallocated", "dynamic")
            got = {name: step(name) for name in order}
            got["cat"] = cat_alone()
            if r:
                for name, t in got.items():
                    times[name].append(t)
            assert all(c.get_seq_length() == n + 1 for c in caches.values())
        profiled = {}
        for name in caches:
            caches[name].layers[0].crop(-1)
            profiled[name] = cat_bytes_allocated(lambda: reft.decode_step(lm, inp, mask, pos, caches[name]))

    ar = arithmetic(args.hidden, H, args.intermediate, B, n, dtype.itemsize)
    s = {name: median(ts) for name, ts in times.items()}
    extra_s = s["dynamic"] - s["preallocated"]
    res = {"machine": machine(), "torch": torch.__version__, "threads": args.threads, "dtype": args.dtype,
           "hidden": args.hidden, "heads": H, "intermediate": args.intermediate, "vocab": args.vocab, "batch": B,
           "cached": n, "repeats": args.repeats, **ar, "layer_param_bytes": layer_bytes,
           "copy_gbps": copy_bps / 1e9, "fresh_copy_gbps": fresh_bps / 1e9,
           "dynamic_s": s["dynamic"], "preallocated_s": s["preallocated"], "cat_s": s["cat"],
           "dynamic_all": times["dynamic"], "preallocated_all": times["preallocated"], "cat_all": times["cat"],
           "extra_s": extra_s, "extra_bytes_measured": extra_s * copy_bps,
           "extra_bytes_measured_fresh": extra_s * fresh_bps, "cat_gbps": ar["cat_bytes"] / s["cat"] / 1e9,
           "profiled_cat_alloc_dynamic_bytes": profiled["dynamic"],
           "profiled_cat_alloc_preallocated_bytes": profiled["preallocated"],
           "profiled_cat_alloc_extra_bytes": profiled["dynamic"] - profiled["preallocated"],
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}

    def gb(x):
        return f"{x / 1e9:.3g} GB"
    print(f"one Llama layer, hidden {args.hidden}, {H} heads, intermediate {args.intermediate}, {args.dtype}; "
          f"batch {B}, {n} cached tokens; {args.threads} threads")
    print(f"arithmetic per decoded token: weights {gb(ar['weights_bytes'])} (the layer's parameters: "
          f"{gb(layer_bytes)}), attention's K and V {gb(ar['cache_bytes'])}, DynamicLayer's cat {gb(ar['cat_bytes'])}"
          f"; preallocated {gb(ar['preallocated_bytes'])}, DynamicLayer {gb(ar['dynamic_bytes'])}")
    print(f"copy bandwidth (read + write): {res['copy_gbps']:.2f} GB/s into preallocated memory, "
          f"{res['fresh_copy_gbps']:.2f} GB/s into fresh memory (clone)")
    print(f"decode step (median of {args.repeats}): DynamicLayer {1e3 * s['dynamic']:.1f} ms, preallocated "
          f"{1e3 * s['preallocated']:.1f} ms, difference {1e3 * extra_s:.1f} ms; the cat alone {1e3 * s['cat']:.1f} ms "
          f"({res['cat_gbps']:.2f} GB/s for its arithmetic {gb(ar['cat_bytes'])})")
    print(f"DynamicLayer's extra bytes, measured: difference x copy bandwidth = {gb(res['extra_bytes_measured'])} "
          f"({gb(res['extra_bytes_measured_fresh'])} at the fresh-memory rate); arithmetic {gb(ar['cat_bytes'])}")
    print(f"aten::cat allocates per step (profiler): DynamicLayer {gb(profiled['dynamic'])}, preallocated "
          f"{gb(profiled['preallocated'])} (rotary embedding's), difference {gb(res['profiled_cat_alloc_extra_bytes'])}"
          f"; a cache of {n + 1} tokens holds {gb(ar['cache_bytes'] * (n + 1) // n)}")
    print(f"peak RSS {res['peak_rss_gb']:.2f} GB")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
