"""A prepared one-GPU check of the 7B path: the real path's checks (padded batches, the checkpoint and the resume
state round trips, FSDP against a plain copy), memory per phase, training MFU and rollout speed (under 8 minutes).

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # one GPU (H200), under 8 minutes in all
    python benchmarks/gpu_check.py --device cpu --small --out x.json   # the same code on tiny models (the tests)

Nothing is downloaded: the models are random-init Llamas of CodeLlama-7B's width (hidden 4096, 32 heads,
intermediate 11008, vocab 32,016) with 2 and 4 decoder layers instead of 32, and a tiny OPT (Galactica's
architecture), built from their configs. Everything runs through the stage scripts' own functions (`import sft,
reft, evaluate`): `init_distributed` (a 1-process NCCL group), `shard` (FSDP2 per decoder block, then the root;
fp32 master weights, bf16 compute on GPU), `sft.token_nll_sum`, `reft.PolicyWithValueHead`, `reft.sample` inside
`reft.gathered_for_generation`, the PPO losses, and `model.generate` inside `evaluate.gathered_for_generation`.
Shapes are the paper's: SFT micro-batch 4 × 1024 tokens; ReFT micro-batch 4 × (300 prompt + 400 response) = 700
tokens (the response never ends: EOS id -1, the worst case); evaluation batch 50 × (300 + 700 sampled tokens).
Sequences have different lengths everywhere, padded as the stages pad them: prompts on the left, from the full
length down to about half of it (`tokens`), SFT examples on the right (sft.collate).

The checks, each with a verdict in the JSON's `verdicts` (pass, fail with the reason, or skipped with the reason;
any fail or phase error makes the exit status 1), run early (with the first ReFT group of each family, gc off):
  padded_batch            (each layer count) a left-padded batch through the sharded policy and reference (log-probs,
                          values) and greedy generation in gathered_for_generation (generate's prefill and decoding
                          with the KV cache, and reft.sample): finite, and each row equal to that row run alone,
                          unpadded (1e-4 in fp32, 0.1 in bf16: `padded_check` says why)
  checkpoint_round_trip   reft.save_checkpoint, then reft.load_sharded (meta device, to_empty, rank 0's broadcast):
                          every tensor equal to the policy's in the saved dtype (buffers, computed on the CPU
                          by rank 0's from_pretrained, to 1e-6 relative: CUDA's pow differs in the last ulp); timed
  resume_round_trip       reft.save_resume_state (DCP, each rank's sha256s, the manifest), weights and AdamW
                          state changed, then reft.load_resume_state: all equal to what was saved; timed (both round
                          trips write to a temporary folder, removed after: ~8 GB for the 2-layer Llama's resume state)
  same_samples_fsdp_vs_plain  (rollout_compare) reft.sample on the sharded policy, teacher-forced on the tokens that
                          a plain copy computing as FSDP does (fsdp_like_copy: bf16 blocks, fp32 LM head) sampled,
                          gives them the plain copy's log-probs (padded_batch's tolerance)
  same_samples_kv_cache   (rollout_compare) the same for reft.sample on transformers' DynamicCache (the sampler
                          before issue 36) against its preallocated KV cache, on the plain copy: attention reads the
                          filled prefix of the preallocated cache, a strided view, on the GPU's kernels too.
                          Not the same tokens: random-init logits are nearly flat, and a draw near a CDF boundary
                          flips on any bf16 kernel's rounding (the fraction of equal tokens is reported: same_tokens_*)
  lora_step               (once: Llama, the fewest layers, gc on, after the first ReFT group) reft.py's policy with
                          --lora_rank 16 (reft_lora_iteration): after its PPO step every frozen base parameter is
                          bit-for-bit what it was and still in the compute dtype, every lora_B moved and is finite,
                          the value head moved; the reference log-probs (adapters off), before and after the step,
                          equal those of the same model built without LoRA (padded_batch's tolerance), and the
                          policy's with its adapters on equal them before the step (lora_B = 0) and differ after it

Phases, for each (family, layers, gradient checkpointing off/on), each timed between
torch.cuda.synchronize() calls, with its own peak (reset_peak_memory_stats / max_memory_allocated):
  sft_step              sft.py's step: token_nll_sum, backward, clip, AdamW(foreach).step, zero_grad
  rollout_compare       (checkpointing off, Llama) batch 4 and 32: reft.sample and HF generate, each on the
                        FSDP-sharded policy inside reft.gathered_for_generation and on a plain copy (fsdp_like_copy),
                        and reft.sample with transformers' DynamicCache on the plain copy (what the preallocated
                        KV cache gains: `preallocated_vs_dynamic_plain`, a tokens/s ratio)
  reft_rollout          reft.sample of 4 × 400 tokens inside gathered_for_generation
  reft_rollout_compiled (once: Llama, the fewest layers, gc off) the same with reft.py --compile's decode step
                        (CUDA graphs): tokens/s against the eager sampler's (`compiled_vs_eager`), the compile's
                        seconds (`compile_s`) and the fraction of equal tokens (`same_tokens`)
  reft_old_ref_forward  old log-probs, values and entropy from the policy, reference log-probs (bf16 model)
  reft_ppo_update       one PPO minibatch: forward, policy + value loss, backward, clip, AdamW step
  eval_generation       (checkpointing off) evaluate.py's sampling: model.generate, batch 50, 700 new tokens
  reft_lora_iteration   (once, Llama, the fewest layers, checkpointing on) reft.py --lora_rank 16: the policy built
                        as reft.load_models builds it (reft.add_lora inside reft.load_sharded: the base frozen in the
                        compute dtype, adapters and value head fp32, no reference model), then one ReFT iteration,
                        step 3 by reft.rollout_forwards with ref None (the reference: the policy with its adapters
                        off), AdamW over the trained parameters only (lr 1e-3: one step must move bf16 log-probs).
                        Its first iteration, so kernels warm up inside it. Its resident memory at the PPO update
                        (policy + AdamW, no reference) sits next to full fine-tuning's (policy + AdamW + reference,
                        the same layer count's reft_ppo_update): `full_resident_gb`
The ReFT phases are recorded on their second iteration, when AdamW's state exists (as in a running job). The
build_* phases record the model build and sharding. After each group its models are freed; anything that
survives (a model or GPU memory) is listed under `leaks`, since it would inflate the next group's figures.

Robustness: every phase runs in try/except and records its error (an OOM in one phase loses nothing else);
phases that need a failed one are recorded as skipped; after --budget_s seconds the remaining phases are
skipped; a watchdog writes the JSON and exits at --budget_s + --grace_s (a hung collective). The JSON is
rewritten after every phase, so a killed run still leaves everything measured so far.

Memory figures are GB = 1e9 bytes of torch.cuda.memory_allocated (live tensors; the allocator's reserve is
`peak_reserved_gb`). Extrapolation (`extrapolate`), done per phase from the 2- and 4-layer runs:
  - each quantity q (resident, grads, peak of forward+backward, peak of the optimizer step) is linear in the
    layer count: per_layer = (q(4) - q(2)) / 2, q(32) = q(2) + 30 · per_layer. On one GPU the FSDP "shard" is the
    whole model, so q(32) is what one GPU would need without sharding.
  - FSDP over N = 8 GPUs: resident = memory allocated when the phase starts = fp32 policy weights + AdamW m, v
    (+ the bf16 reference for ReFT): all sharded, so ÷ N. grads = the fp32 gradients alive after backward:
    FSDP reduce-scatters each block's gradient as soon as it is computed and keeps only its shard, so ÷ N too.
    Everything else at the peak (activations, logits, the bf16 block(s) all-gathered for compute, the whole
    policy gathered for a rollout, the KV cache) is per GPU: it does not divide.
        fsdp8      = resident/N + grads/N + max(0, peak_fwd_bwd - resident - grads)
                     (assumes every gradient is already alive at the peak; then max with peak_optimizer / N,
                     since the optimizer step touches only sharded tensors)
        fsdp8_max  = resident/N + grads/N + (peak_fwd_bwd - resident)
                     (an upper bound: as if no gradient were alive at the peak)
  - the estimate of docs/scaling.md for the same phase (README_GB below) is printed next to it.
FSDP2 all-gathers and reduce-scatters on one GPU too, so its full-size per-block buffers are in the measured
peaks; NCCL's own workspace for 8 ranks is not.

Speed: tokens/s of the SFT step and of the PPO update (whole step, optimizer included), and MFU =
model FLOP/s ÷ the bf16 matmul rate measured in this run (8192 × 8192, `matmul`), and ÷ the H200's nominal
989 TFLOP/s dense bf16. Model FLOPs per step (PaLM, Chowdhery et al. 2022, appendix B):
    6 · (trunk matmul weights · tokens + LM-head weights · tokens with logits) + 12 · layers · hidden · seq · tokens
i.e. 6 N per token plus the attention score and value matmuls, counted in full as PaLM does (causal masking
would halve them);
embedding look-ups are not FLOPs; recomputation under gradient checkpointing is not counted (model FLOPs,
not hardware FLOPs). Rollouts report generated tokens/s (batch × new tokens ÷ seconds) and the FSDP hook cost:
(ms per decoding step of reft.sample on the sharded, gathered policy, its one gather and reshard included) -
(the same on the plain copy, which computes as FSDP's policy does: bf16 blocks, the LM head in fp32, buffers such
as rotary inv_freq in fp32, so both give the same log-probs: `same_samples_fsdp_vs_plain`).

Versions: written for torch ≥ 2.11 and transformers ≥ 5.17 (the GPU machine's); nothing newer is used.
"""
import argparse
import copy
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA's H100/H200 SXM datasheet, dense (no sparsity)

# docs/scaling.md (once README.md), "Memory per GPU: 7B policy + value head, 7B reference, FSDP2 over 8 × 80 GB"
# (the stages' memory_estimate): resident 16 P / N = 13.5 GB (+ 4 P / N of gradients while training); rollout peak
# ≈ 13.5 + 13.7 (gathered policy, fp32 LM head) + 1.5 (KV cache) ≈ 28.7 GB; PPO peak ≈ 13.5 + 3.4 + 0.8 + 1.3 +
# 1.1 + 1.1 ≈ 21.3 GB with --gradient_checkpointing, ≈ 32.6 GB without. Update these when that table changes.
README_GB = {("resident", None): 13.5, ("reft_rollout", None): 28.7,
             ("reft_ppo_update", True): 21.3, ("reft_ppo_update", False): 32.6}

PHASES = ("sft_step", "rollout_compare", "reft_rollout", "reft_rollout_compiled", "reft_old_ref_forward",
          "reft_ppo_update", "eval_generation", "padded_batch", "checkpoint_round_trip", "resume_round_trip",
          "reft_lora_iteration", "lora_step")
# The checks with a verdict (pass, fail, or skipped with the reason) in the JSON's `verdicts`: the three phases of
# that name (each returns "pass") and rollout_compare's same_samples_fsdp_vs_plain and same_samples_kv_cache.
CHECKS = ("same_samples_fsdp_vs_plain", "same_samples_kv_cache", "padded_batch", "checkpoint_round_trip",
          "resume_round_trip", "lora_step")
# reft.py --lora_rank 16 (its --lora_alpha default), and a learning rate at which one AdamW step (each lora_B entry
# moves by about the rate) moves the policy's bf16 log-probs: the recipe's 3e-6 may move them by less than bf16 rounds
LORA_RANK, LORA_ALPHA, LORA_LR = 16, 32.0, 1e-3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="where the phases run (cpu: with --small, for the tests)")
    p.add_argument("--small", action="store_true", help="tiny widths and shapes (for the CPU test)")
    p.add_argument("--out", default=None,
                   help="JSON path (None: $OUT/gpu_check.json when $OUT is set, else runs/gpu_check.json)")
    p.add_argument("--budget_s", type=float, default=330.0,
                   help="start no phase after this many seconds (with --grace_s and the imports: under 8 minutes)")
    p.add_argument("--grace_s", type=float, default=90.0,
                   help="watchdog: write the JSON and exit this many seconds after --budget_s")
    p.add_argument("--families", default="llama,opt", help="comma-separated model families: llama, opt")
    p.add_argument("--layers", default="2,4", help="comma-separated layer counts (extrapolation needs 2 values)")
    p.add_argument("--fail_phase", default="", help="raise inside this phase (tests the error isolation; empty: none)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") \
            else str(ROOT / "runs" / "gpu_check.json")
    args.families = [f for f in args.families.split(",") if f]
    args.layers = [int(x) for x in args.layers.split(",") if x]
    if set(args.families) - {"llama", "opt"}:
        raise SystemExit(f"error: --families takes llama and/or opt, not {args.families}")
    if args.fail_phase and args.fail_phase not in PHASES:
        raise SystemExit(f"error: --fail_phase must be one of {', '.join(PHASES)}")
    return args


def shapes(small):
    """Batch and sequence shapes: the paper's on GPU, tiny ones for the CPU test."""
    if small:
        return dict(sft_batch=2, sft_len=64, sft_prompt=16, reft_batch=2, prompt=16, response=48,
                    eval_batch=4, eval_prompt=16, eval_new=32, rollout_batches=(2, 4), rollout_prompt=16,
                    rollout_new=16, sft_steps=2, reft_iters=2, repeats=1, matmul_n=256, pad_batch=3,
                    pad_response=8, pad_new=8)
    return dict(sft_batch=4, sft_len=1024, sft_prompt=200, reft_batch=4, prompt=300, response=400,
                eval_batch=50, eval_prompt=300, eval_new=700, rollout_batches=(4, 32), rollout_prompt=300,
                rollout_new=256, sft_steps=3, reft_iters=2, repeats=2, matmul_n=8192, pad_batch=4, pad_response=16,
                pad_new=16)


def model_config(family, layers, small):
    """A random-init config: CodeLlama-7B's width (or a tiny OPT), every dropout 0, pad 0 (<unk>), EOS 2."""
    from transformers import LlamaConfig, OPTConfig
    if family == "llama":
        width = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                     vocab_size=512) if small else \
            dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                 vocab_size=32016)
        return LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, attention_dropout=0.0,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **width)
    width = dict(hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=512) if small else \
        dict(hidden_size=256, num_attention_heads=4, ffn_dim=1024, vocab_size=50272)
    return OPTConfig(num_hidden_layers=layers, max_position_embeddings=2048, word_embed_proj_dim=width["hidden_size"],
                     dropout=0.0, attention_dropout=0.0, layerdrop=0.0, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, **width)


def params_to(model, dtype):
    """Cast the parameters only, as FSDP's MixedPrecisionPolicy and from_pretrained(dtype=...) do: buffers such as
    the rotary inv_freq stay fp32 (model.to(bf16) would round them and change every sample)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def fsdp_like_copy(lm, dtype, stage):
    """A plain (unsharded) copy of `lm` that computes as the stages' FSDP2 sharding (stage.shard) does: parameters in
    `dtype`, buffers untouched (as params_to), but the head groups' (stage.fsdp_groups: the LM head, with the input
    embedding when tied) kept in fp32; each module's floating inputs cast as FSDP's MixedPrecisionPolicy casts them
    (cast_forward_inputs): to fp32 for a head group, to `dtype` for a decoder block. A copy whose LM head is bf16
    too draws other Gumbel-max tokens than the sharded policy (0.23% of them at 7B width and batch 32 × 256)."""
    import torch
    plain = copy.deepcopy(lm)
    blocks, heads = stage.fsdp_groups(plain)
    fp32 = {id(p) for group in heads for module in group for p in module.parameters()}
    for p in plain.parameters():
        if id(p) not in fp32:
            p.data = p.data.to(dtype)

    def cast_inputs(to):
        def hook(module, args, kwargs):
            def cast(x):
                return x.to(to) if torch.is_tensor(x) and x.is_floating_point() else x
            return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        return hook
    for block in blocks:
        block.register_forward_pre_hook(cast_inputs(dtype), with_kwargs=True)
    for group in heads:
        for module in group:
            module.register_forward_pre_hook(cast_inputs(torch.float32), with_kwargs=True)
    return plain


# ----------------------------------------------------------------------------- arithmetic (pure)

def train_flops(trunk_params, head_params, tokens, logit_tokens, layers, hidden, seq):
    """Model FLOPs of one forward+backward (PaLM's count, see the module docstring)."""
    return 6 * (trunk_params * tokens + head_params * logit_tokens) + 12 * layers * hidden * seq * tokens


def linear_at(points, x):
    """Value at x of the line through two (layers, value) points; None if a value is missing."""
    (x0, y0), (x1, y1) = points
    if y0 is None or y1 is None:
        return None
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def fsdp_estimate(resident, grads, peak_fwd_bwd, peak_opt, world):
    """(estimate, upper bound) of a phase's peak per GPU under FSDP over `world` GPUs, from one-GPU figures.

    Sharded: resident state and gradients. Not sharded: everything else alive at the peak (activations,
    gathered bf16 blocks, KV cache, logits). The estimate assumes all gradients are alive at the peak, the bound
    that none are (see the module docstring)."""
    grads = grads or 0.0
    sharded = (resident + grads) / world
    est = sharded + max(0.0, peak_fwd_bwd - resident - grads)
    upper = sharded + (peak_fwd_bwd - resident)
    if peak_opt is not None:
        est, upper = max(est, peak_opt / world), max(upper, peak_opt / world)
    return est, upper


def extrapolate(by_layers, to_layers=32, world=8):
    """From {layers: record} of one phase at two layer counts: growth per layer, the figures at `to_layers` on one
    GPU and per GPU under FSDP over `world` GPUs (GB). Records carry resident_gb, peak_gb and, for training
    phases, grads_gb, peak_fwd_bwd_gb, peak_opt_gb. Returns None unless exactly two layer counts have numbers."""
    if len(by_layers) != 2:
        return None
    (l0, r0), (l1, r1) = sorted(by_layers.items())
    if any(r.get(k) is None for r in (r0, r1) for k in ("resident_gb", "peak_gb")):
        return None

    def at(key, x, default=None):
        return linear_at([(l0, r0.get(key, default)), (l1, r1.get(key, default))], x)

    res = {"layers": [l0, l1], "to_layers": to_layers, "world": world,
           "peak_per_layer_gb": (r1["peak_gb"] - r0["peak_gb"]) / (l1 - l0),
           "resident_per_layer_gb": (r1["resident_gb"] - r0["resident_gb"]) / (l1 - l0)}
    q = {k: at(k, to_layers) for k in ("resident_gb", "peak_gb", "grads_gb", "peak_fwd_bwd_gb", "peak_opt_gb")}
    res.update({f"{k[:-3]}_{to_layers}L_gb": v for k, v in q.items() if v is not None})
    peak_fwd_bwd = q["peak_fwd_bwd_gb"] if q["peak_fwd_bwd_gb"] is not None else q["peak_gb"]
    est, upper = fsdp_estimate(q["resident_gb"], q["grads_gb"], peak_fwd_bwd, q["peak_opt_gb"], world)
    res[f"fsdp{world}_gb"], res[f"fsdp{world}_max_gb"] = est, upper
    res[f"fsdp{world}_resident_gb"] = q["resident_gb"] / world
    return res


def readme_estimate(phase, gc_on):
    return README_GB.get((phase, gc_on), README_GB.get((phase, None)))


def summarize(phases):
    """(extrapolations, rollout rows) from the recorded phases: one extrapolation per (Llama phase, gc) measured
    at two layer counts (only the Llama runs have a 7B model's width), and the FSDP-hook figures per batch."""
    groups = {}
    for r in phases:
        if r["status"] == "ok" and r.get("family") == "llama" and r["phase"] in (
                "sft_step", "reft_rollout", "reft_old_ref_forward", "reft_ppo_update", "eval_generation"):
            groups.setdefault((r["phase"], r["gc"]), {})[r["layers"]] = r
    ext = []
    for (phase, gc_on), by_layers in groups.items():
        e = extrapolate(by_layers)
        if e is not None:
            ext.append(dict(e, phase=phase, gc=gc_on, readme_gb=readme_estimate(phase, gc_on)))
    rollout = [{k: r[k] for k in ("family", "layers", "batch", "fsdp_hook_ms_per_step",
                                  "fsdp_hook_ms_per_step_per_layer", "sampler_vs_generate_fsdp",
                                  "preallocated_vs_dynamic_plain", "same_samples_fsdp_vs_plain",
                                  "same_samples_kv_cache", "max_diff_logprobs_fsdp_vs_plain", "max_diff_logprobs_kv_cache",
                                  "same_tokens_fsdp_vs_plain", "same_tokens_kv_cache")}
               for r in phases if r["phase"] == "rollout_compare" and r["status"] == "ok"]
    return ext, rollout


def verdicts(phases):
    """{check: {"verdict": "pass" | "fail" | "skipped", ...}} for each of CHECKS from the recorded phases: fail when
    any of its runs failed or raised (each named, with its reason), skipped (with the reason) when none ran, else
    pass with the number of runs."""
    out = {}
    for name in CHECKS:
        phase, key = ("rollout_compare", name) if name.startswith("same_samples") else (name, "pass")
        recs = [r for r in phases if r["phase"] == phase]
        ran = [r for r in recs if r["status"] != "skipped"]
        failed = [r for r in ran if r["status"] == "error" or not r.get(key)]
        where = lambda r: " ".join(f"{k}={r[k]}" for k in ("family", "layers", "batch") if k in r)  # noqa: E731
        if failed:
            out[name] = {"verdict": "fail", "reason": "; ".join(
                f"{where(r)}: {r.get('error') or r.get('reason') or r.get(f'{key}_reason') or 'failed'}"
                for r in failed)[:2000]}
        elif ran:
            out[name] = {"verdict": "pass", "runs": len(ran)}
        else:
            out[name] = {"verdict": "skipped", "reason": recs[0]["reason"] if recs else
                         "not reached (its family or layer count was not asked for, or the run stopped before it)"}
    return out


# ----------------------------------------------------------------------------- the check

class Check:
    """Runs phases in order, each isolated, and keeps the JSON on disk up to date."""

    def __init__(self, args):
        import torch
        self.torch, self.args, self.sh = torch, args, shapes(args.small)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.lock = threading.Lock()
        self.result = {"args": {k: v for k, v in vars(args).items()}, "shapes": self.sh, "env": {}, "matmul": None,
                       "phases": [], "extrapolation": [], "rollout": [], "leaks": [],
                       "status": "running"}

    # -- bookkeeping
    def elapsed(self):
        return time.monotonic() - self.t0

    def save(self):
        with self.lock:
            self.result["elapsed_s"] = round(self.elapsed(), 1)
            text = json.dumps(self.result, indent=1, default=str)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp{threading.get_ident()}")  # the watchdog may write at the same time
        tmp.write_text(text)
        os.replace(tmp, out)

    def watchdog(self):
        """Write what was measured and exit if the run hangs past budget + grace (e.g. a stuck collective)."""
        def fire():
            with self.lock:
                self.result["status"] = f"watchdog: killed after {self.elapsed():.0f} s"
            self.save()
            print(f"watchdog: no end after {self.elapsed():.0f} s; partial JSON in {self.args.out}", flush=True)
            os._exit(3)
        t = threading.Timer(self.args.budget_s + self.args.grace_s, fire)
        t.daemon = True
        t.start()

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def phase(self, name, fn, needs=True, **labels):
        """Run fn() -> dict of figures as one recorded phase; returns True if it ran without error."""
        rec = {"phase": name, **labels}
        if needs is not True:
            rec.update(status="skipped", reason=needs)
        elif time.monotonic() > self.deadline:
            rec.update(status="skipped", reason=f"budget of {self.args.budget_s:.0f} s spent")
        else:
            start = time.monotonic()
            try:
                if name == self.args.fail_phase:
                    raise RuntimeError(f"--fail_phase {name}")
                rec.update(fn() or {})
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - any failure is a finding: record it and go on
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                           traceback=traceback.format_exc()[-2500:])
            rec["wall_s"] = round(time.monotonic() - start, 2)
        with self.lock:
            self.result["phases"].append(rec)
        if rec["status"] == "error":
            self.free()  # an OOM's traceback held tensors: return them before the next phase
        self.save()
        tag = " ".join(f"{k}={v}" for k, v in labels.items())
        print(f"[{self.elapsed():6.1f} s] {name:<22} {tag:<32} {rec['status']}"
              + (f": {rec.get('error', rec.get('reason', ''))[:200]}" if rec["status"] != "ok" else ""), flush=True)
        return rec["status"] == "ok"

    def end_group(self, group, labels):
        """Free the group's models (FSDP's hooks make reference cycles: only gc frees them) and record any model or
        GPU memory that survived it, since it would inflate the next group's figures."""
        from transformers import PreTrainedModel
        self.free()
        with warnings.catch_warnings():  # isinstance on every object wakes deprecated module attributes
            warnings.simplefilter("ignore")
            alive = sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())
        left = self.mem()
        if alive or (left or 0) > 0.05:
            with self.lock:
                self.result["leaks"].append({"after": group, **labels, "models_alive": alive, "allocated_gb": left})

    def after(self, ok, what):
        """The `needs` value for phases that depend on an earlier one."""
        return True if ok else f"needs {what}, which did not run"

    def measure(self, fn):
        """Run fn() once between synchronizations: (its result, seconds, resident GB before, peak GB during)."""
        cuda = self.device.type == "cuda"
        self.sync()
        if cuda:
            self.torch.cuda.reset_peak_memory_stats()
        resident = self.torch.cuda.memory_allocated() / GB if cuda else None
        t = time.perf_counter()
        out = fn()
        self.sync()
        dt = time.perf_counter() - t
        peak = self.torch.cuda.max_memory_allocated() / GB if cuda else None
        return out, dt, resident, peak

    def mem(self):
        return self.torch.cuda.memory_allocated() / GB if self.device.type == "cuda" else None

    def peak_reserved(self):
        return self.torch.cuda.max_memory_reserved() / GB if self.device.type == "cuda" else None

    # -- setup
    def setup(self):
        torch = self.torch
        import transformers
        from transformers.utils import logging as hf_logging
        sys.path.insert(0, str(ROOT))
        import evaluate
        import reft
        import sft
        self.sft, self.reft, self.evaluate = sft, reft, evaluate
        hf_logging.set_verbosity_error()
        self.rank, self.world, self.device, self.mesh = reft.init_distributed()
        if self.device.type != self.args.device:
            raise SystemExit(f"error: --device {self.args.device} asked for, init_distributed gave {self.device}")
        # bf16 compute under FSDP's MixedPrecisionPolicy on GPU; the reference is stored in fp32 like the policy (as
        # reft.load_models), so that its fp32 heads match the policy's at step 0
        self.compute_dtype = reft.compute_dtype(self.device)
        self.ref_dtype = torch.float32
        env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(self.device),
               "world": self.world, "python": sys.version.split()[0]}
        if self.device.type == "cuda":
            env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                       gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / GB,
                       cuda=torch.version.cuda)
        try:
            import subprocess
            env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["git_commit"] = None
        self.result["env"] = env
        self.save()

    def matmul(self):
        """Best-of-3 rate of an n × n matmul in the compute dtype: the denominator of the measured MFU."""
        torch, n = self.torch, self.sh["matmul_n"]
        a = torch.randn(n, n, device=self.device, dtype=self.compute_dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.compute_dtype)
        for _ in range(3):
            a @ b
        reps, best = 20, 0.0
        for _ in range(3):
            self.sync()
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            self.sync()
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
        self.result["matmul"] = {"n": n, "dtype": str(self.compute_dtype), "flops": best}
        return {"tflops": best / 1e12}

    # -- models
    def build_lm(self, family, layers):
        """A random-init causal LM in fp32 (the master weights), built directly on the device, with the stages'
        attention (reft.without_empty_attention_rows, as their load_sharded builds it): no left-padded row reaches
        SDPA fully masked, which cuDNN on sm90 answers with NaN."""
        from transformers import LlamaForCausalLM, OPTForCausalLM
        cls = LlamaForCausalLM if family == "llama" else OPTForCausalLM
        self.torch.manual_seed(0)
        with self.torch.device(self.device):
            lm = cls(model_config(family, layers, self.args.small))
        self.reft.without_empty_attention_rows(lm.config)  # read at every forward: switching after the build works
        return lm

    def matmul_params(self, lm):
        """(trunk, LM head) weights that take part in matmuls: every nn.Linear but the output layer, and that one."""
        head = lm.get_output_embeddings()
        lin = [m for m in lm.modules() if isinstance(m, self.torch.nn.Linear)]
        return sum(m.weight.numel() for m in lin if m is not head), head.weight.numel()

    def mfu(self, flops, seconds):
        m = self.result["matmul"]
        out = {"model_tflops_per_s": flops / seconds / 1e12}
        if m:
            out["mfu_vs_matmul"] = flops / seconds / m["flops"]
        if self.device.type == "cuda":
            out["mfu_vs_989"] = flops / seconds / H200_BF16_DENSE_FLOPS
        return out

    def tokens(self, batch, length, side="left"):
        """Random token ids above the special ones (0 pad, 1 bos, 2 eos) for `batch` sequences of different lengths,
        from `length` (the first row) down to about half of it, padded with 0 on `side` as the stages pad: prompts on
        the left (rollouts, generation), SFT examples on the right (sft.collate). Returns (ids, mask), (batch, length)."""
        torch = self.torch
        ids = torch.randint(3, self.cfg_vocab, (batch, length), device=self.device)
        lengths = torch.tensor([length - i * (length // 2) // max(1, batch - 1) for i in range(batch)],
                               device=self.device)
        cols = torch.arange(length, device=self.device)
        mask = (cols >= length - lengths[:, None]) if side == "left" else (cols < lengths[:, None])
        return ids.masked_fill(~mask, 0), mask.long()

    # -- SFT
    def sft_group(self, family, layers, gc_on):
        torch, sh, labels = self.torch, self.sh, dict(family=family, layers=layers, gc=gc_on)
        state = {}

        def build():
            lm = self.build_lm(family, layers)
            state["flops_params"] = self.matmul_params(lm)
            lm.config.use_cache = False
            if gc_on:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.train()
            self.sft.shard(lm, self.mesh, self.compute_dtype)
            state["lm"] = lm
            state["opt"] = torch.optim.AdamW(lm.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                                             weight_decay=0.0, foreach=self.device.type == "cuda")
            return {"params": sum(p.numel() for p in lm.parameters()), "resident_gb": self.mem(),
                    "attn_implementation": getattr(lm.config, "_attn_implementation", None)}

        def step():
            lm, opt = state["lm"], state["opt"]
            ids, attn = self.tokens(sh["sft_batch"], sh["sft_len"], side="right")
            labels_ = ids.masked_fill(attn == 0, -100)
            labels_[:, :sh["sft_prompt"]] = -100
            n_tokens = int((labels_[:, 1:] != -100).sum())
            rec = {}

            def fwd_bwd():
                nll = self.sft.token_nll_sum(lm, ids, labels_, attn)
                (nll / n_tokens).backward()
                return nll.item()

            def update():
                gn = torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
                gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
                opt.step()
                opt.zero_grad(set_to_none=True)
                return gn.item()

            loss, t1, resident, p1 = self.measure(fwd_bwd)
            grads = self.mem()
            grad_norm, t2, _, p2 = self.measure(update)
            rec.update(loss=loss / n_tokens, grad_norm=grad_norm, seconds=t1 + t2, resident_gb=resident,
                       grads_gb=None if grads is None else grads - resident, peak_fwd_bwd_gb=p1, peak_opt_gb=p2,
                       peak_gb=None if p1 is None else max(p1, p2))
            return rec

        def steps():
            for _ in range(sh["sft_steps"] - 1):  # warm-up: kernels and AdamW's state
                step()
            rec = step()
            tokens = sh["sft_batch"] * sh["sft_len"]
            trunk, head = state["flops_params"]
            cfg = state["lm"].config
            rec.update(tokens=tokens, tokens_per_s=tokens / rec["seconds"], peak_reserved_gb=self.peak_reserved(),
                       **self.mfu(train_flops(trunk, head, tokens, tokens, cfg.num_hidden_layers, cfg.hidden_size,
                                              sh["sft_len"]), rec["seconds"]))
            return rec

        ok = self.phase("build_sft", build, **labels)
        self.phase("sft_step", steps, needs=self.after(ok, "build_sft"), **labels)

    # -- ReFT (+ rollout comparison)
    def reft_group(self, family, layers, gc_on, compare):
        torch, reft, sh, labels = self.torch, self.reft, self.sh, dict(family=family, layers=layers, gc=gc_on)
        state = {}
        P = sh["prompt"]

        def build():
            lm = self.build_lm(family, layers)
            state["flops_params"] = self.matmul_params(lm)
            ref_lm = params_to(copy.deepcopy(lm), self.ref_dtype)
            if compare:
                state["plain"] = fsdp_like_copy(lm, self.compute_dtype, reft).eval()
            with torch.device(self.device):
                torch.manual_seed(1)
                policy = reft.PolicyWithValueHead(lm)
                ref = reft.PolicyWithValueHead(ref_lm, value_head=False).requires_grad_(False).eval()
            if gc_on:
                policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.train()
            reft.shard(policy, self.mesh, self.compute_dtype)
            reft.shard(ref, self.mesh, self.compute_dtype)
            state["opt"] = torch.optim.AdamW(policy.parameters(), lr=1e-7, eps=1e-8, weight_decay=0.0,
                                             foreach=self.device.type == "cuda")
            ids, attn = self.tokens(1, P)
            with torch.no_grad():  # FSDP2 picks its root at the first forward (as reft.main)
                policy(torch.cat([ids, ids[:, :1]], 1), torch.cat([attn, attn[:, :1]], 1), P)
            state["policy"], state["ref"] = policy, ref
            return {"params": sum(p.numel() for p in policy.parameters()), "resident_gb": self.mem()}

        ok = self.phase("build_reft", build, **labels)
        if compare:
            for b in sh["rollout_batches"]:
                self.phase("rollout_compare", lambda b=b: self.rollout_compare(state, b),
                           needs=self.after(ok, "build_reft"), batch=b, **labels)
            state.pop("plain", None)
            self.free()  # before the ReFT phases measure their memory
        needs = self.after(ok, "build_reft")
        for _ in range(sh["reft_iters"] - 1):  # warm-up iterations: kernels and AdamW's state
            warm = self.phase("reft_warmup_iteration", lambda: self.reft_iteration(state), needs=needs, **labels)
            needs = needs if warm or needs is not True else "needs reft_warmup_iteration, which failed"
        rolled = self.reft_iteration(state, record=labels, needs=needs)
        if compare and layers == min(self.args.layers):  # one compile (tens of seconds): Llama, the fewest layers
            self.phase("reft_rollout_compiled", lambda: self.compiled_rollout(state),
                       needs=self.after(rolled, "reft_rollout"), **labels)
        if not gc_on:
            built = self.after(ok, "build_reft")
            self.phase("padded_batch", lambda: self.padded_check(state), needs=built, **labels)
            if layers == min(self.args.layers):  # the files do not change with depth: once per family
                self.phase("checkpoint_round_trip", lambda: self.checkpoint_round_trip(state), needs=built, **labels)
                self.phase("resume_round_trip", lambda: self.resume_round_trip(state), needs=built, **labels)

    def reft_iteration(self, state, record=None, needs=True):
        """One iteration of reft.main's loop: rollout (step 1), old/ref log-probs (3), rewards and GAE (4-5) and one
        PPO minibatch (6). With `record` (the phase labels) each part is a recorded phase and it returns whether the
        rollout ran, else returns their figures.
        `state["ref"]` None (LoRA): step 3 is reft.rollout_forwards, the reference the policy with its adapters off."""
        torch, reft, sh = self.torch, self.reft, self.sh
        P, R, B = sh["prompt"], sh["response"], sh["reft_batch"]
        policy, ref, opt = state.get("policy"), state.get("ref"), state.get("opt")
        data = {}
        cfg = policy.lm.config if policy is not None else None

        def rollout():
            prompt_ids, prompt_mask = self.tokens(B, P)
            policy.eval()

            def run():
                with reft.gathered_for_generation(policy):
                    return reft.sample(policy.lm, prompt_ids, prompt_mask, R, -1, 0, 1.0, list(range(B)))
            responses, dt, resident, peak = self.measure(run)
            mask = reft.response_mask(responses, -1)  # (B, R), all ones: no EOS id
            data.update(prompt_ids=prompt_ids, prompt_mask=prompt_mask, responses=responses, mask=mask)
            n = responses.numel()
            return {"seconds": dt, "tokens": n, "tokens_per_s": n / dt, "resident_gb": resident, "peak_gb": peak,
                    "peak_reserved_gb": self.peak_reserved(), "batch": B, "new_tokens": responses.size(1)}

        def old_ref():
            input_ids = torch.cat([data["prompt_ids"], data["responses"]], 1)  # (B, P+R)
            attn = torch.cat([data["prompt_mask"], data["mask"].long()], 1)
            responses = data["responses"]
            data.update(input_ids=input_ids, attn=attn)

            def run():
                if ref is None:  # LoRA: reft.py's own step 3, the reference being the policy with its adapters off
                    f = reft.rollout_forwards(policy, None, self.rollout_of(data), B, 1.0)
                    return f.old_logprobs, f.old_values, f.ref_logprobs, f.entropy
                with torch.no_grad():
                    logits, values = policy(input_ids, attn, P)
                    old_lp = reft.logprobs_of(logits, responses)
                    logp = torch.log_softmax(logits.float(), -1)
                    entropy = -(logp.exp() * logp).sum(-1)
                    del logits, logp
                    ref_logits, _ = ref(input_ids, attn, P)
                    ref_lp = reft.logprobs_of(ref_logits, responses)
                return old_lp, values, ref_lp, entropy
            (old_lp, values, ref_lp, entropy), dt, resident, peak = self.measure(run)
            data.update(old_lp=old_lp, old_values=values, ref_lp=ref_lp)
            n = input_ids.numel()
            return {"seconds": dt, "tokens": n, "tokens_per_s": n / dt, "resident_gb": resident, "peak_gb": peak,
                    "peak_reserved_gb": self.peak_reserved(), "values_dtype": str(values.dtype),
                    "kl_mean": float(((old_lp - ref_lp) * data["mask"]).sum() / data["mask"].sum()),
                    "entropy_mean": float(entropy.mean())}

        def ppo():
            mask = data["mask"]
            scores = torch.tensor([1.0, 0.1, 0.0, 1.0] * B, device=self.device)[:B]
            rewards, _ = reft.kl_shaped_rewards(scores, data["old_lp"], data["ref_lp"], mask, 0.01)
            adv, ret = reft.compute_gae(rewards, data["old_values"], mask, 1.0, 0.95)
            adv = reft.masked_whiten(adv, mask)
            policy.train()
            out = {}

            def fwd_bwd():
                logits, values = policy(data["input_ids"], data["attn"], P)
                lp = reft.logprobs_of(logits, data["responses"])
                pg, _, approx_kl = reft.policy_loss(lp, data["old_lp"], adv, mask, 0.2)
                vf, _ = reft.value_loss(values, data["old_values"], ret, mask, 0.2)
                loss = (pg + 5.0 * vf).sum() / B
                loss.backward()
                ratio = reft.masked_mean(torch.exp(lp.detach() - data["old_lp"]), mask)
                return loss.item(), ratio.item(), approx_kl.item()

            def update():
                gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
                opt.step()
                opt.zero_grad(set_to_none=True)
                return gn.item()

            (loss, ratio, approx_kl), t1, resident, p1 = self.measure(fwd_bwd)
            grads = self.mem()
            grad_norm, t2, _, p2 = self.measure(update)
            seconds = t1 + t2
            n = data["input_ids"].numel()
            trunk, head = state["flops_params"]
            out.update(loss=loss, ratio_mean=ratio, approx_kl=approx_kl, grad_norm=grad_norm, seconds=seconds,
                       tokens=n, tokens_per_s=n / seconds, resident_gb=resident,
                       grads_gb=None if grads is None else grads - resident, peak_fwd_bwd_gb=p1, peak_opt_gb=p2,
                       peak_gb=None if p1 is None else max(p1, p2), peak_reserved_gb=self.peak_reserved(),
                       **self.mfu(train_flops(trunk, head, n, B * R, cfg.num_hidden_layers, cfg.hidden_size, P + R),
                                  seconds))
            return out

        if record is None:
            state["data"] = data
            return {name: fn() for name, fn in (("rollout", rollout), ("old_ref_forward", old_ref), ("ppo", ppo))}
        rolled = self.phase("reft_rollout", rollout, needs=needs, **record)
        ok = self.phase("reft_old_ref_forward", old_ref, needs=self.after(rolled, "reft_rollout"), **record)
        self.phase("reft_ppo_update", ppo, needs=self.after(ok, "reft_old_ref_forward"), **record)
        return rolled

    def compiled_rollout(self, state):
        """reft_rollout's sample with reft.py --compile's decode step (CUDA graphs on GPU, inductor on CPU) against
        the eager one, on the same prompts and seeds inside gathered_for_generation: the first compiled rollout
        (compile_s: the compile and one rollout), then one timed each way. The same tokens where the compiled
        kernels round as the eager ones (fp32 on CPU: all of them; bf16 may flip near-ties: same_tokens)."""
        reft, sh = self.reft, self.sh
        P, R, B = sh["prompt"], sh["response"], sh["reft_batch"]
        policy = state["policy"]
        prompt_ids, prompt_mask = self.tokens(B, P)
        policy.eval()

        def run(compiled):
            with reft.gathered_for_generation(policy):
                return reft.sample(policy.lm, prompt_ids, prompt_mask, R, -1, 0, 1.0, list(range(B)), compiled)
        _, compile_s, _, _ = self.measure(lambda: run(True))
        eager, eager_s, _, _ = self.measure(lambda: run(False))
        compiled, dt, resident, peak = self.measure(lambda: run(True))
        n = compiled.numel()
        return {"seconds": dt, "tokens": n, "tokens_per_s": n / dt, "eager_tokens_per_s": eager.numel() / eager_s,
                "compiled_vs_eager": eager_s / dt, "compile_s": compile_s, "resident_gb": resident, "peak_gb": peak,
                "same_tokens": float((compiled == eager).float().mean()), "batch": B, "new_tokens": compiled.size(1)}

    # -- ReFT with LoRA (reft.py --lora_rank): once, Llama, the fewest layers, gradient checkpointing on
    def rollout_of(self, data):
        """reft.Rollout of reft_iteration's samples: every row its own question, no response ended (no EOS id)."""
        B = data["responses"].size(0)
        return self.reft.Rollout(list(range(B)), data["input_ids"], data["attn"], self.sh["prompt"], data["responses"],
                                 data["mask"], self.torch.zeros(B, dtype=self.torch.bool, device=self.device))

    def lora_group(self, family, layers):
        """reft.py's policy with --lora_rank LORA_RANK as its load_models builds it (reft.add_lora on rank 0's model
        and on the meta one, through reft.load_sharded: the frozen base in the compute dtype, the adapters and the
        value head fp32; no reference model), one iteration of reft_iteration (its step 3 reft.rollout_forwards with
        ref None, the PPO step over the trained parameters only), then the lora_step check."""
        torch, reft = self.torch, self.reft
        from transformers import AutoModelForCausalLM
        labels = dict(family=family, layers=layers, gc=True, lora_rank=LORA_RANK)
        state = {}

        def policy_of(lm):
            return reft.add_lora(reft.PolicyWithValueHead(lm), LORA_RANK, LORA_ALPHA, self.compute_dtype)

        def load():  # rank 0 (load_sharded): a model of its own, as reft.load_models' read() then lora()
            lm = self.build_lm(family, layers)
            state["flops_params"] = self.matmul_params(lm)
            with torch.device(self.device):
                torch.manual_seed(1)  # the value head's init
                return policy_of(lm)

        def build():
            start = self.mem()
            policy = reft.load_sharded(load, lambda config: policy_of(AutoModelForCausalLM.from_config(
                config, dtype=torch.float32)), self.mesh, self.device)
            policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.train()
            trained = [p for p in policy.parameters() if p.requires_grad]
            state["opt"] = torch.optim.AdamW(trained, lr=LORA_LR, eps=1e-8, weight_decay=0.0,
                                             foreach=self.device.type == "cuda")
            ids, attn = self.tokens(1, self.sh["prompt"])
            with torch.no_grad():  # FSDP2 picks its root at the first forward (as reft.main)
                policy(torch.cat([ids, ids[:, :1]], 1), torch.cat([attn, attn[:, :1]], 1), self.sh["prompt"])
            state["policy"], state["ref"] = policy, None
            self.free()
            state["before"] = self.local_params(policy)
            resident = self.mem()
            return {"params": sum(p.numel() for p in policy.parameters()), "trained": sum(p.numel() for p in trained),
                    "resident_gb": resident, "lora_policy_gb": None if start is None else resident - start,
                    "frozen_dtypes": sorted({str(p.dtype) for p in policy.parameters() if not p.requires_grad})}

        def iteration():
            parts = self.reft_iteration(state)
            full = [r for r in self.result["phases"] if r["phase"] == "reft_ppo_update" and r["status"] == "ok"
                    and r.get("family") == family and r.get("layers") == layers and "lora_rank" not in r]
            peaks = [r["peak_gb"] for r in parts.values() if r.get("peak_gb") is not None]
            ppo, fwd = parts["ppo"], parts["old_ref_forward"]
            return {"seconds": sum(r["seconds"] for r in parts.values()),
                    **{f"{k}_s": r["seconds"] for k, r in parts.items()},
                    **{f"{k}_peak_gb": r.get("peak_gb") for k, r in parts.items()},
                    "peak_gb": max(peaks) if peaks else None, "resident_gb": ppo["resident_gb"],
                    "grads_gb": ppo["grads_gb"], "peak_reserved_gb": self.peak_reserved(),
                    "full_resident_gb": full[0]["resident_gb"] if full else None,
                    "ppo_tokens_per_s": ppo["tokens_per_s"], "ratio_mean": ppo["ratio_mean"],
                    "approx_kl": ppo["approx_kl"], "grad_norm": ppo["grad_norm"], "kl_mean": fwd["kl_mean"]}

        ok = self.phase("build_reft_lora", build, **labels)
        ok = self.phase("reft_lora_iteration", iteration, needs=self.after(ok, "build_reft_lora"), **labels)
        self.phase("lora_step", lambda: self.lora_check(state, family, layers),
                   needs=self.after(ok, "reft_lora_iteration"), **labels)

    def local_params(self, model):
        """{name: this rank's shard of each parameter, copied to the CPU} (bit-for-bit comparisons after a step)."""
        return {n: (p.to_local() if hasattr(p, "to_local") else p).detach().cpu().clone()
                for n, p in model.named_parameters()}

    def lora_check(self, state, family, layers):
        """After the LoRA policy's PPO step: every frozen base parameter bit-for-bit what it was and still in the
        compute dtype; every lora_B moved (from zero) and finite; the value head moved. The reference log-probs of the
        rollout (the policy with its adapters off, reft.rollout_forwards with ref None), before and after the step,
        equal those of the same model built without LoRA (as reft.load_models builds the reference: fp32, computing in
        the compute dtype) to padded_check's tolerance (in bf16 the LoRA policy's frozen LM head is rounded to bf16,
        the plain reference's is not); the policy's log-probs with its adapters on equal them before the step (lora_B
        is zero) and differ after it."""
        torch, reft = self.torch, self.reft
        from transformers import AutoModelForCausalLM
        policy, data, before = state["policy"], state["data"], state["before"]
        tol = 1e-4 if self.compute_dtype == torch.float32 else 0.1
        after = self.local_params(policy)
        frozen = [n for n in before if ".lora_" not in n and not n.startswith("v_head.")]  # by name, not requires_grad
        frozen_changed = [n for n in frozen if not torch.equal(before[n], after[n])]
        frozen_dtype = [n for n in frozen if after[n].dtype != self.compute_dtype]
        lora_b = [n for n in before if n.endswith("lora_B.weight")]
        b_still = [n for n in lora_b if torch.equal(before[n], after[n]) or not bool(torch.isfinite(after[n]).all())]
        v_head_moved = any(not torch.equal(before[n], after[n]) for n in before if n.startswith("v_head."))
        rollout = self.rollout_of(data)
        policy.eval()
        now = reft.rollout_forwards(policy, None, rollout, rollout.input_ids.size(0), 1.0)
        base = reft.load_sharded(
            lambda: reft.PolicyWithValueHead(self.build_lm(family, layers), value_head=False),
            lambda config: reft.PolicyWithValueHead(AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                                                    value_head=False), self.mesh, self.device)
        plain = reft.rollout_forwards(base.requires_grad_(False).eval(), base, rollout, rollout.input_ids.size(0), 1.0,
                                      policy=False).ref_logprobs
        del base
        self.free()

        def gap(a, b):
            d = (a - b).abs().max()
            return float(d) if bool(torch.isfinite(d)) else float("inf")
        figures = {"ref_vs_plain_before": gap(data["ref_lp"], plain),
                   "ref_vs_plain_after": gap(now.ref_logprobs, plain),
                   "policy_vs_ref_before": gap(data["old_lp"], data["ref_lp"]),
                   "policy_vs_ref_after": gap(now.old_logprobs, now.ref_logprobs)}
        ok = (not frozen_changed and not frozen_dtype and lora_b and not b_still and v_head_moved
              and max(figures["ref_vs_plain_before"], figures["ref_vs_plain_after"],
                      figures["policy_vs_ref_before"]) <= tol and figures["policy_vs_ref_after"] > 0)
        rec = {"pass": bool(ok), "tolerance": tol, "frozen": len(frozen), "lora_B": len(lora_b),
               **{f"max_diff_{k}": v for k, v in figures.items()}}
        if not ok:
            rec["reason"] = (f"frozen parameters changed {frozen_changed[:5]}, not in {self.compute_dtype} "
                             f"{frozen_dtype[:5]}; lora_B unmoved or not finite {b_still[:5]} of {len(lora_b)}; "
                             f"value head moved {v_head_moved}; log-prob differences {figures} (tolerance {tol}: "
                             f"the policy's must differ from the reference's after the step)")
        return rec

    # -- the checks of the real path: padded batches, the checkpoint and the resume state
    def padded_check(self, state):
        """A batch of prompts of different lengths, left-padded, + responses: through the sharded policy (log-probs and
        values, as the rollout forwards and the PPO update take them) and the reference; and greedy generation inside
        gathered_for_generation, its prefill and decoding steps with the KV cache (transformers' generate, as
        evaluate.py and the greedy evaluations, and reft.sample). Passes when every figure is finite and each row
        equals the same row run alone, unpadded: log-probs, values and generate's logits (at every step up to the
        first where the two greedy paths part: a bf16 near-tie may flip a token) within the tolerance, and in fp32
        the same greedy tokens from reft.sample. Tolerance: 1e-4 in fp32 (CPU: the reduction order only); 0.1 in
        bf16, whose 8-bit significand rounds every activation by up to 2^-9 relative while the padded batch runs
        other kernels (masked attention, other shapes): logits of std ~1.3 at 7B width then differ by ~0.01, several
        times that at the maximum over ~10^7 entries. A NaN, a shifted position or a pad leaking into a real row
        differs by far more."""
        torch, reft, sh = self.torch, self.reft, self.sh
        policy, ref = state["policy"], state["ref"]
        policy.eval()
        B, P, R, G = sh["pad_batch"], sh["prompt"], sh["pad_response"], sh["pad_new"]
        fp32 = self.compute_dtype == torch.float32
        tol = 1e-4 if fp32 else 0.1
        ids, mask = self.tokens(B, P)
        full = torch.cat([ids, torch.randint(3, self.cfg_vocab, (B, R), device=self.device)], 1)
        attn = torch.cat([mask, torch.ones_like(mask[:, :R])], 1)
        lengths = mask.sum(1).tolist()

        def forwards(x, a, p):  # the policy's log-probs and values, the reference's log-probs: (b, R, V), (b, R), ...
            logits, values = policy(x, a, p)
            ref_logits, _ = ref(x, a, p)
            return torch.log_softmax(logits.float(), -1), values.float(), torch.log_softmax(ref_logits.float(), -1)

        def generate(x, a):  # G tokens each way (no EOS stops it): generate's tokens and raw logits, reft.sample's
            with reft.gathered_for_generation(policy):
                out = policy.lm.generate(input_ids=x, attention_mask=a, do_sample=False, max_new_tokens=G,
                                         min_new_tokens=G, pad_token_id=0, eos_token_id=2, output_logits=True,
                                         return_dict_in_generate=True)
                sampled = reft.sample(policy.lm, x, a, G, -1, 0, 0.0, list(range(x.size(0))))
            return out.sequences[:, x.size(1):], torch.stack(out.logits, 1).float(), sampled

        def gap(a, b):  # the largest difference; inf when either side is not finite
            d = (a - b).abs().max()
            return float(d) if bool(torch.isfinite(d)) else float("inf")

        worst = dict(logprobs=0.0, values=0.0, ref_logprobs=0.0, generate_logits=0.0)
        same_greedy = 0
        with torch.no_grad():
            padded = forwards(full, attn, P)
            gen_tokens, gen_logits, sampled = generate(ids, mask)
            finite = all(bool(torch.isfinite(t).all()) for t in (*padded, gen_logits))
            for i, n in enumerate(lengths):
                row = full[i:i + 1, P - n:]
                for key, a, b in zip(("logprobs", "values", "ref_logprobs"), padded, forwards(row, attn[i:i + 1, P - n:], n)):
                    worst[key] = max(worst[key], gap(a[i], b[0]))
                tokens, logits, alone = generate(ids[i:i + 1, P - n:], mask[i:i + 1, P - n:])
                parted = (gen_tokens[i] != tokens[0]).nonzero()
                upto = int(parted[0]) + 1 if len(parted) else G
                worst["generate_logits"] = max(worst["generate_logits"], gap(gen_logits[i, :upto], logits[0, :upto]))
                same_greedy += bool(torch.equal(sampled[i], alone[0]))
        ok = finite and max(worst.values()) <= tol and (same_greedy == B or not fp32)
        rec = {"pass": ok, "batch": B, "prompt_lengths": lengths, "response": R, "new_tokens": G, "finite": finite,
               "tolerance": tol, **{f"max_diff_{k}": v for k, v in worst.items()},
               "sampler_same_greedy_rows": same_greedy}
        if not ok:
            rec["reason"] = (f"finite {finite}, largest differences from the unpadded rows {worst} (tolerance {tol}), "
                             f"reft.sample's greedy tokens equal in {same_greedy} of {B} rows")
        return rec

    def tokenizer(self):
        """A small real tokenizer for save_checkpoint to save beside the weights (sft.py's tiny BPE)."""
        if getattr(self, "_tok", None) is None:
            self._tok = self.sft.train_tiny_tokenizer(["a prepared check of the GPU path"], 300)
        return self._tok

    def checkpoint_round_trip(self, state):
        """reft.save_checkpoint (rank 0 gathers the full state dict and writes the HF folder in the compute dtype,
        with value_head.safetensors) and back through reft.load_sharded as the stages read a checkpoint (rank 0 reads
        it; every rank builds the model on the meta device, shards it, to_empty, and receives rank 0's broadcast):
        passes when every weight and value-head tensor equals the policy's rounded to the saved dtype, and every buffer
        the policy's to 1e-6 relative (see below). Timed."""
        torch, reft = self.torch, self.reft
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM
        policy, dtype = state["policy"], self.compute_dtype
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        want = get_model_state_dict(policy, options=full)
        folder = tempfile.mkdtemp(prefix="gpu_check_checkpoint_")
        config_dtype = policy.lm.config.dtype  # save_checkpoint sets it to the saved dtype; the later phases keep theirs
        try:
            path = os.path.join(folder, "final")
            self.sync()
            t = time.perf_counter()
            reft.save_checkpoint(policy, self.tokenizer(), reft.Args(output_dir=folder), path, self.rank, dtype)
            save_s = time.perf_counter() - t
            t = time.perf_counter()
            loaded = reft.load_sharded(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                       lambda config: AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                                       self.mesh, self.device)
            self.sync()
            load_s = time.perf_counter() - t
            got = get_model_state_dict(loaded, options=full)
            heads = load_file(os.path.join(path, "value_head.safetensors"))
            size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
            # Buffers (rotary inv_freq) are not saved: load_sharded's come from rank 0's from_pretrained on the CPU,
            # the policy's were computed on its device, and CUDA's pow may differ from the CPU's in the last ulp
            # (the first GPU run: both inv_freq buffers, weights equal). 1e-6 relative is a few fp32 ulps; a lost
            # rope_theta or rope scaling in the saved config moves inv_freq by orders of magnitude more.
            buffers = dict(policy.lm.named_buffers())
            buffer_gaps = {n: float((b.cpu().double() - buffers[n].cpu().double()).abs().max())
                           for n, b in loaded.named_buffers()}
            bad_buffers = [n for n, b in loaded.named_buffers()
                           if not torch.allclose(b.cpu(), buffers[n].cpu(), rtol=1e-6, atol=0.0)]
        finally:
            policy.lm.config.dtype = config_dtype
            shutil.rmtree(folder, ignore_errors=True)
        expected = {k.removeprefix("lm."): v for k, v in want.items() if k.startswith("lm.")}
        bad = sorted(k for k in expected.keys() | got.keys() if k not in got or k not in expected
                     or not torch.equal(got[k].float(), expected[k].to(dtype).float()))
        bad += sorted(k for k, v in want.items() if not k.startswith("lm.")
                      and (k not in heads or not torch.equal(heads[k].float(), v.to(dtype).float())))
        rec = {"pass": not bad and not bad_buffers, "save_s": save_s, "load_s": load_s, "checkpoint_gb": size / GB,
               "tensors": len(want), "dtype": str(dtype), "max_diff_buffers": buffer_gaps}
        if not rec["pass"]:
            rec["reason"] = (f"differ after the round trip: weights {bad[:10]}, buffers (largest difference) "
                             f"{ {n: buffer_gaps[n] for n in bad_buffers[:10]} } (relative tolerance 1e-6)")
        return rec

    def resume_round_trip(self, state):
        """reft.save_resume_state (DCP on a gloo group of its own: every rank writes its shards of the fp32 policy and
        AdamW's state and hashes its own files; then rank 0's manifest) and reft.load_resume_state into the same policy and
        optimizer after every weight and optimizer tensor was changed: passes when all of them equal what was saved,
        exactly, and the loop state comes back. Timed."""
        torch, reft = self.torch, self.reft
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        policy, opt = state["policy"], state["opt"]
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)

        def snapshot():
            flat = {}

            def walk(prefix, x):
                if isinstance(x, dict):
                    for k, v in x.items():
                        walk(f"{prefix}/{k}", v)
                elif isinstance(x, (list, tuple)):
                    for k, v in enumerate(x):
                        walk(f"{prefix}/{k}", v)
                else:
                    flat[prefix] = x.clone() if torch.is_tensor(x) else x
            walk("", {"model": get_model_state_dict(policy, options=full),
                      "optim": get_optimizer_state_dict(policy, opt, options=full)})
            return flat

        def same(a, b):
            return torch.equal(a, b) if torch.is_tensor(a) and torch.is_tensor(b) else a == b
        want = snapshot()
        loop = {"step": 7, "beta": 0.01, "skipped": 0, "best": -1.0}
        folder = tempfile.mkdtemp(prefix="gpu_check_resume_")
        try:
            self.sync()
            t = time.perf_counter()
            reft.save_resume_state(policy, opt, loop, folder)
            save_s = time.perf_counter() - t
            size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)
            with torch.no_grad():  # so that only the load can bring the saved values back
                for p in policy.parameters():
                    p.add_(1.0)
                for s in opt.state.values():
                    for v in s.values():
                        if torch.is_tensor(v):
                            v.add_(1)
            changed = sum(not same(v, want[k]) for k, v in snapshot().items() if torch.is_tensor(v))
            t = time.perf_counter()
            back = reft.load_resume_state(policy, opt, folder)
            self.sync()
            load_s = time.perf_counter() - t
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        got = snapshot()
        bad = sorted(k for k in want.keys() | got.keys() if k not in got or k not in want or not same(got[k], want[k]))
        tensors = sum(torch.is_tensor(v) for v in want.values())
        rec = {"pass": not bad and back == loop and changed == tensors, "save_s": save_s, "load_s": load_s,
               "state_gb": size / GB, "tensors": tensors, "changed_before_load": changed}
        if not rec["pass"]:
            rec["reason"] = (f"differ after the round trip: {bad[:10]}; loop state {back} (saved {loop}); "
                             f"{changed} of {tensors} tensors changed before the load")
        return rec

    def rollout_compare(self, state, batch):
        """Generated tokens/s of reft.sample and HF generate, on the FSDP policy (gathered) and a plain copy that computes
        as FSDP does (fsdp_like_copy), and of reft.sample on transformers' DynamicCache on the plain copy; and the two
        same_samples checks: reft.sample on the FSDP policy and with the DynamicCache, each teacher-forced on the plain
        sampler's tokens, give them the plain sampler's log-probs (to padded_check's tolerance).

        Not the same tokens: the models are random-init, their logits nearly flat, and a draw near a boundary of the
        CDF flips on any last-bit difference between two bf16 kernels (another GEMM or SDPA kernel for a strided view,
        a gathered DTensor, another batch shape): the first GPU run drew other tokens at batch 32. Forcing the
        tokens keeps every path on the same sequences, and a wrong gather, cache slot or mask still moves log-probs by
        far more than rounding does. The fraction of identical free-running tokens is kept as information."""
        from transformers.cache_utils import DynamicLayer
        torch, reft, sh = self.torch, self.reft, self.sh
        policy, plain = state["policy"], state["plain"]
        policy.eval()
        ids, mask = self.tokens(batch, sh["rollout_prompt"])
        seeds = list(range(batch))
        n_new = sh["rollout_new"]

        def sampler(lm, n):
            return reft.sample(lm, ids, mask, n, -1, 0, 1.0, seeds)

        def dynamic_cache(lm, n):  # reft.sample on transformers' DynamicCache: torch.cat of the whole cache per token
            with mock.patch.object(reft, "RolloutCacheLayer", lambda capacity: DynamicLayer()):
                return sampler(lm, n)

        def hf(lm, n):
            out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=n, pad_token_id=0, eos_token_id=2)
            return out[:, ids.size(1):]

        def fsdp(fn):
            def run(n):
                with reft.gathered_for_generation(policy):
                    return fn(policy.lm, n)
            return run

        def forced_logprobs(lm, run, tokens):  # reft.sample via run(n), step t's token forced to tokens[:, t]: (B, R)
            steps = []

            def force(module, args, out):
                t = len(steps)
                steps.append(torch.log_softmax(out.logits[:, -1].float(), -1).gather(1, tokens[:, t:t + 1]))
                # every score -inf but the forced token's: all the CDF's mass on it, whatever the row's u
                out.logits = torch.full_like(out.logits[:, -1:], float("-inf")).scatter_(-1, tokens[:, t:t + 1, None],
                                                                                         0.0)
                return out
            handle = lm.register_forward_hook(force)
            try:
                run(tokens.size(1))
            finally:
                handle.remove()
            return torch.cat(steps, 1)

        variants = {"sampler_fsdp": fsdp(sampler), "generate_fsdp": fsdp(hf),
                    "sampler_plain": lambda n: sampler(plain, n), "generate_plain": lambda n: hf(plain, n),
                    "sampler_dynamic_plain": lambda n: dynamic_cache(plain, n)}
        rec, outs = {"batch": batch, "prompt": sh["rollout_prompt"], "new_tokens": n_new}, {}
        with torch.no_grad():
            for name, fn in variants.items():
                fn(4)  # warm-up: kernels for these shapes
                best = None
                for _ in range(sh["repeats"]):
                    out, dt, _, peak = self.measure(lambda: fn(n_new))
                    best = dt if best is None else min(best, dt)
                outs[name] = out
                steps = out.size(1)
                rec[name] = {"seconds": best, "steps": steps, "tokens_per_s": out.numel() / best,
                             "ms_per_step": 1e3 * best / steps, "peak_gb": peak}
            tokens = outs["sampler_plain"]
            want = forced_logprobs(plain, variants["sampler_plain"], tokens)
            forced = {"fsdp_vs_plain": forced_logprobs(policy.lm, variants["sampler_fsdp"], tokens),
                      "kv_cache": forced_logprobs(plain, variants["sampler_dynamic_plain"], tokens)}
        tol = 1e-4 if self.compute_dtype == torch.float32 else 0.1  # padded_check's, for the same reasons
        for key, other in forced.items():
            d = (other - want).abs().max()
            gap = float(d) if bool(torch.isfinite(d)) else float("inf")
            compared = outs["sampler_fsdp" if key == "fsdp_vs_plain" else "sampler_dynamic_plain"]
            rec.update({f"same_samples_{key}": gap <= tol, f"max_diff_logprobs_{key}": gap,
                        f"same_tokens_{key}": float((compared == tokens).float().mean())})
            if gap > tol:
                rec[f"same_samples_{key}_reason"] = (f"teacher-forced log-probs differ by up to {gap:.3g} (tolerance "
                                                     f"{tol}); {rec[f'same_tokens_{key}']:.2%} of free-running tokens equal")
        layers = policy.lm.config.num_hidden_layers
        hook = rec["sampler_fsdp"]["ms_per_step"] - rec["sampler_plain"]["ms_per_step"]
        rec.update(fsdp_hook_ms_per_step=hook, fsdp_hook_ms_per_step_per_layer=hook / layers,
                   fsdp_hook_ms_per_token=hook / batch,
                   sampler_vs_generate_fsdp=rec["sampler_fsdp"]["tokens_per_s"] / rec["generate_fsdp"]["tokens_per_s"],
                   sampler_vs_generate_plain=rec["sampler_plain"]["tokens_per_s"]
                   / rec["generate_plain"]["tokens_per_s"],
                   preallocated_vs_dynamic_plain=rec["sampler_plain"]["tokens_per_s"]
                   / rec["sampler_dynamic_plain"]["tokens_per_s"])
        return rec

    # -- evaluate
    def eval_group(self, family, layers):
        torch, sh, labels = self.torch, self.sh, dict(family=family, layers=layers, gc=False)
        state = {}

        def build():
            lm = self.build_lm(family, layers)
            lm.eval()
            self.evaluate.shard(lm, self.mesh, self.compute_dtype)
            state["lm"] = lm
            return {"resident_gb": self.mem()}

        def generate():
            lm = state["lm"]
            ids, mask = self.tokens(sh["eval_batch"], sh["eval_prompt"])

            def run():
                with torch.no_grad(), self.evaluate.gathered_for_generation(lm):
                    return lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                       top_k=0, top_p=1.0, max_new_tokens=sh["eval_new"], pad_token_id=0,
                                       eos_token_id=2)
            out, dt, resident, peak = self.measure(run)
            n = out[:, ids.size(1):].numel()
            return {"seconds": dt, "tokens": n, "tokens_per_s": n / dt, "resident_gb": resident, "peak_gb": peak,
                    "peak_reserved_gb": self.peak_reserved(), "batch": sh["eval_batch"],
                    "new_tokens": out.size(1) - ids.size(1)}

        ok = self.phase("build_eval", build, **labels)
        self.phase("eval_generation", generate, needs=self.after(ok, "build_eval"), **labels)

    # -- summary
    def summarize(self):
        ext, rollout = summarize(self.result["phases"])
        with self.lock:
            self.result["extrapolation"], self.result["rollout"] = ext, rollout
            self.result["verdicts"] = verdicts(self.result["phases"])

    def run(self):
        self.watchdog()
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001 - say why in the JSON too
            self.result.update(status=f"setup failed: {type(e).__name__}: {e}", traceback=traceback.format_exc())
            self.save()
            print(self.result["status"], flush=True)
            return 2
        self.phase("matmul", self.matmul)
        for family in self.args.families:
            self.cfg_vocab = model_config(family, 1, self.args.small).vocab_size
            for gc_on in (False, True):
                for layers in self.args.layers:
                    labels = dict(family=family, layers=layers, gc=gc_on)
                    self.sft_group(family, layers, gc_on)
                    self.end_group("sft", labels)
                    self.reft_group(family, layers, gc_on, compare=family == "llama" and not gc_on)
                    self.end_group("reft", labels)
                    if family == "llama" and not gc_on and layers == min(self.args.layers):  # once, early in the budget
                        self.lora_group(family, layers)
                        self.end_group("reft_lora", dict(labels, gc=True, lora_rank=LORA_RANK))
                    if not gc_on:
                        self.eval_group(family, layers)
                        self.end_group("eval", labels)
                    try:
                        self.summarize()
                    except Exception as e:  # noqa: BLE001 - the raw phases are still in the JSON
                        self.result["summary_error"] = f"{type(e).__name__}: {e}"
                    self.save()
        counts = {s: sum(r["status"] == s for r in self.result["phases"]) for s in ("ok", "error", "skipped")}
        self.result["status"] = "done"
        self.result["counts"] = counts
        self.result["verdicts"] = verdicts(self.result["phases"])
        self.save()
        try:
            text = report(self.result)
            Path(self.args.out).with_suffix(".txt").write_text(text + "\n")
            print(text, flush=True)
        except Exception as e:  # noqa: BLE001 - the JSON is written; the table is a convenience
            print(f"the report failed ({type(e).__name__}: {e}); the JSON has every figure", flush=True)
        failed = [name for name, v in self.result["verdicts"].items() if v["verdict"] == "fail"]
        print(f"{counts['ok']} phases ok, {counts['error']} failed, {counts['skipped']} skipped; checks failed: "
              f"{', '.join(failed) or 'none'}; {self.elapsed():.0f} s; JSON in {self.args.out}", flush=True)
        self.torch.distributed.destroy_process_group()
        return 1 if counts["error"] or failed else 0


# ----------------------------------------------------------------------------- the printed report

def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def report(result):
    """The readable tables printed at the end (everything is also in the JSON)."""
    lines = [f"{name:<28}{v['verdict']}" + (f": {v['reason'][:300]}" if "reason" in v else "")
             for name, v in result.get("verdicts", {}).items()]
    lines += [""] if lines else []
    m = result.get("matmul")
    if m:
        lines.append(f"matmul {m['n']}x{m['n']} {m['dtype']}: {m['flops'] / 1e12:.1f} TFLOP/s")
    lines.append("")
    head = f"{'phase':<22}{'family':<7}{'L':>3} {'gc':<4}{'status':<8}{'sec':>8}{'tok/s':>11}{'MFU':>7}" \
           f"{'MFU989':>8}{'resid GB':>10}{'peak GB':>9}"
    lines += [head, "-" * len(head)]
    for r in result["phases"]:
        if r["phase"] in ("matmul", "rollout_compare", *CHECKS) or (r["status"] == "ok" and (
                r["phase"].startswith("build") or r["phase"] == "reft_warmup_iteration")):
            continue
        mfu = r.get("mfu_vs_matmul")
        mfu9 = r.get("mfu_vs_989")
        lines.append(f"{r['phase']:<22}{r.get('family', ''):<7}{r.get('layers', ''):>3} "
                     f"{'on' if r.get('gc') else 'off':<4}{r['status']:<8}{fmt(r.get('seconds'), '.3f'):>8}"
                     f"{fmt(r.get('tokens_per_s'), ',.0f'):>11}{fmt(None if mfu is None else 100 * mfu, '.1f'):>7}"
                     f"{fmt(None if mfu9 is None else 100 * mfu9, '.1f'):>8}{fmt(r.get('resident_gb')):>10}"
                     f"{fmt(r.get('peak_gb')):>9}")
        if r["status"] != "ok":
            lines.append(f"    {r.get('error', r.get('reason', ''))[:300]}")
    for r in result["phases"]:
        if r["phase"] == "reft_lora_iteration" and r["status"] == "ok":
            lines += ["", f"LoRA rank {r['lora_rank']} ({r['family']}, {r['layers']} layers, gc on): resident "
                          f"{fmt(r['resident_gb'])} GB at the PPO update (policy + AdamW, no reference), full "
                          f"fine-tuning's {fmt(r['full_resident_gb'])} GB (policy + AdamW + reference); peak "
                          f"{fmt(r['peak_gb'])} GB; "
                          f"iteration {r['seconds']:.2f} s (rollout {r['rollout_s']:.2f}, forwards "
                          f"{r['old_ref_forward_s']:.2f}, update {r['ppo_s']:.2f})"]
    for r in result["phases"]:
        if r["phase"] == "reft_rollout_compiled" and r["status"] == "ok":
            lines += ["", f"reft.py --compile ({r['family']}, {r['layers']} layers): rollout {r['tokens_per_s']:,.0f} "
                          f"tok/s against {r['eager_tokens_per_s']:,.0f} eager ({r['compiled_vs_eager']:.2f}x), "
                          f"compile {r['compile_s']:.1f} s, same tokens {r['same_tokens']:.2%}"]
    rc = [r for r in result["phases"] if r["phase"] == "rollout_compare" and r["status"] == "ok"]
    if rc:
        lines += ["", f"{'rollout (generated tok/s)':<28}{'L':>3}{'batch':>6}{'sample FSDP':>13}{'generate FSDP':>15}"
                      f"{'sample plain':>14}{'generate plain':>16}{'DynamicCache plain':>20}{'hook ms/step':>14}"
                      f"{'Δlogp FSDP':>12}{'Δlogp kv':>10}{'same tok':>10}{'same tok kv':>13}"]
        for r in rc:
            lines.append(f"{r['family']:<28}{r['layers']:>3}{r['batch']:>6}"
                         + "".join(f"{r[k]['tokens_per_s']:>{w},.0f}" for k, w in
                                   (("sampler_fsdp", 13), ("generate_fsdp", 15), ("sampler_plain", 14),
                                    ("generate_plain", 16), ("sampler_dynamic_plain", 20)))
                         + f"{r['fsdp_hook_ms_per_step']:>14.3f}{r['max_diff_logprobs_fsdp_vs_plain']:>12.2g}"
                         + f"{r['max_diff_logprobs_kv_cache']:>10.2g}{r['same_tokens_fsdp_vs_plain']:>10.2%}"
                         + f"{r['same_tokens_kv_cache']:>13.2%}")
    if result.get("extrapolation"):
        lines += ["", f"{'peak GB per GPU':<22}{'gc':<4}{'/layer':>8}{'resid/layer':>12}{'32L 1 GPU':>10}"
                      f"{'FSDP-8':>8}{'(max)':>8}{'resid/8':>8}{'README':>8}"]
        for e in result["extrapolation"]:
            lines.append(f"{e['phase']:<22}{'on' if e['gc'] else 'off':<4}{e['peak_per_layer_gb']:>8.3f}"
                         f"{e['resident_per_layer_gb']:>12.3f}{fmt(e.get('peak_32L_gb')):>10}"
                         f"{fmt(e.get('fsdp8_gb')):>8}{fmt(e.get('fsdp8_max_gb')):>8}"
                         f"{fmt(e.get('fsdp8_resident_gb')):>8}{fmt(e.get('readme_gb'), '.1f'):>8}")
        lines.append(f"(Llama at CodeLlama-7B width, 2 and 4 layers extrapolated to 32; docs/scaling.md's resident "
                     f"16 P / N = {README_GB[('resident', None)]} GB: weights, AdamW's moments and the reference)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # init_distributed picks CUDA whenever it sees one
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (use --device cpu --small for the CPU check)")
    check = Check(args)
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
