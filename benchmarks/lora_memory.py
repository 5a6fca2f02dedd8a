"""Peak RSS of one reft.py step on the CPU, full fine-tuning against --lora_rank, next to reft.py's arithmetic.

The measured check of docs/scaling.md's section "ReFT on one GPU with LoRA": the arithmetic is reft.py's own
(memory_error and memory_estimate, fp32 as on the CPU).

    python benchmarks/lora_memory.py            # a random 309 M-parameter Llama: 8.7 GB at most, ~15 min on 2 cores
    python benchmarks/lora_memory.py --layers 2 --hidden 256 --intermediate 688 --heads 4   # a quick look
    python benchmarks/lora_memory.py --paper    # the arithmetic only: CodeLlama-7B ReFT, full and LoRA, per GPU

The model: a LlamaConfig of --hidden, --layers and --intermediate with the `tiny` benchmark checkpoint's tokenizer
(benchmarks/common.py: a pad token distinct from EOS, as reft.py requires), random weights saved in fp32, built in a
child process so that no run inherits this process's memory. Each run is `reft.py --max_steps 1` in its own process
(loading, a rollout, the old-policy and reference forwards, one PPO update, the resume state and the final
checkpoint). Three peaks of its resident memory (peak_rss: VmHWM, reset through /proc/PID/clear_refs at each mark):
loading, up to reft.py's `ppo:` line (after load_run); the step, up to its log line; saving, to the end (LoRA's merge
makes a merged copy of the weights). The step's is what the arithmetic estimates. Each counts what every process
holds (Python, torch, transformers): the imports alone are measured too.
"""
import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_checkpoint, machine, write_json  # noqa: E402


def build_checkpoint(path, tokenizer, hidden, layers, intermediate, heads):
    """A random-initialised Llama (seed 0, fp32, untied head) with `tokenizer`'s vocabulary and special tokens, saved
    with that tokenizer to `path`; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def reft_estimate(args, n_params, config, world=1, bf16=False):
    """{"training", "generation"}: the peak bytes per device that reft.py's memory_error computes for its Args
    `args` (its own code, run with memory_estimate's answer recorded)."""
    import reft
    recorded, estimate = [], reft.memory_estimate

    def record(*a):
        recorded.append(estimate(*a))
        return recorded[-1]
    with mock.patch.object(reft, "memory_estimate", record):
        reft.memory_error(args, n_params, config, world, bf16, float("inf"))
    return recorded[0]


def run_flags(ckpt, out, max_length, lora_rank):
    """reft.py's flags for one short PPO step on `ckpt`: one question, one sample, no evaluation, its log line (the
    step's end, before the resume state and the final checkpoint are saved)."""
    return dict(model=str(ckpt), data="minigsm", cot="nl", output_dir=str(out), max_steps=1, batch_size=1,
                num_samples=1, micro_batch_size=1, max_prompt_length=max_length - 16, max_length=max_length,
                eval_every=0, lr=1e-5, lora_rank=lora_rank, log_every=1)


def peak_rss(cmd, threads, marks=()):
    """The peak resident bytes of `cmd` in each part of its run, its output lines starting with `marks` (in turn)
    ending one part and starting the next: len(marks) + 1 peaks. Its own, not its siblings'. Each is VmHWM, read at
    the mark, and for the last part polled every 20 ms until the process ends: getrusage's ru_maxrss would not do, as
    a child's starts from its parent's peak (the exec of a vfork'ed child records the parent's high-water mark)."""
    import subprocess
    import threading
    import time
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    print("$", " ".join(cmd), flush=True)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)

    def hwm():
        with open(f"/proc/{p.pid}/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
    last = [0]

    def poll():  # until the process ends (an exited one has no VmHWM line, and then no status file)
        while True:
            try:
                last[0] = hwm()
            except (OSError, StopIteration):
                return
            time.sleep(0.02)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    peaks = []
    for line in p.stdout:
        print(line, end="", flush=True)
        if len(peaks) < len(marks) and line.startswith(marks[len(peaks)]):
            peaks.append(hwm())
            with open(f"/proc/{p.pid}/clear_refs", "w") as f:
                f.write("5")  # the high-water mark starts again from the current resident size (Linux >= 4.0)
    poller.join()
    p.wait()
    if p.returncode or len(peaks) < len(marks):
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {p.returncode}) or never printed {marks[len(peaks):]}")
    return [*peaks, last[0]]


def paper_table(ranks=(16, 64)):
    """Lines of text: the per-GPU arithmetic of CodeLlama-7B ReFT (the paper preset's reft.py flags) in bf16, full
    fine-tuning on 8 GPUs and on 1, and LoRA of each rank on 1, with the parameters each trains: each phase's peak,
    the rollout's (32 / GPUs sequences) that of a run without the periodic evaluation (64 sequences)."""
    import reft
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=32016, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=11008, tie_word_embeddings=False)
    n = reft.config_params(config)
    paper = dict(batch_size=32, num_samples=1, micro_batch_size=4, max_length=700, gradient_checkpointing=True,
                 eval_every=233)  # the quickstart's paper preset (scripts/quickstart.py PAPER_FLAGS)
    shown = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in paper.items())
    lines = [f"CodeLlama-7B, {n:,} parameters; reft.py {shown}, bf16 "
             f"(arithmetic: reft.py memory_error / memory_estimate)",
             "| run | GPUs | parameters trained | weights, AdamW, reference | rollout | evaluation | PPO update |",
             "|---|---|---|---|---|---|---|"]
    for rank, world in [(0, 8), (0, 1), *((r, 1) for r in ranks)]:
        args = reft.Args(**paper, lora_rank=rank)
        trained = reft.lora_params(config, rank) if rank else n
        state = 2 * n + 12 * trained if rank else 16 * n  # memory_error's: the weights, AdamW's moments, the reference
        phases = reft_estimate(args, n, config, world, bf16=True)
        rollout = reft_estimate(dataclasses.replace(args, eval_every=0), n, config, world, bf16=True)["generation"]
        lines.append(f"| {'LoRA rank ' + str(rank) if rank else 'full'} | {world} | {trained:,} | "
                     f"{state / world / 1e9:.1f} GB | {rollout / 1e9:.1f} GB | {phases['generation'] / 1e9:.1f} GB | "
                     f"{phases['training'] / 1e9:.1f} GB |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the random Llama")
    p.add_argument("--layers", type=int, default=24, help="decoder layers")
    p.add_argument("--intermediate", type=int, default=2816, help="MLP width")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--lora_rank", type=int, default=16, help="reft.py --lora_rank of the LoRA run")
    p.add_argument("--max_length", type=int, default=64, help="reft.py --max_length (prompt + response tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--paper", action="store_true", help="print the CodeLlama-7B arithmetic only, and run nothing")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()
    if a.paper:
        print("\n".join(paper_table()))
        return
    tokenizer = ensure_checkpoint()
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
        ckpt = Path(tmp) / "model"
        print(f"building a random Llama in {ckpt}", flush=True)
        import subprocess
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import lora_memory; print(lora_memory.build_checkpoint({str(ckpt)!r}, {str(tokenizer)!r}, "
                        f"{a.hidden}, {a.layers}, {a.intermediate}, {a.heads}))"], cwd=ROOT, check=True)
        imports = peak_rss([sys.executable, "-c", "import torch, transformers, reft"], a.threads)[0]
        loading, peaks, saving = {}, {}, {}
        for rank in (0, a.lora_rank):
            flags = run_flags(ckpt, Path(tmp) / f"run_{rank}", a.max_length, rank)
            cmd = [sys.executable, "reft.py", *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]
            loading[rank], peaks[rank], saving[rank] = peak_rss(cmd, a.threads, ("ppo:", "step "))
        import reft
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(ckpt)
        n = reft.config_params(config)
        est = {rank: max(reft_estimate(reft.Args(**run_flags(ckpt, "", a.max_length, rank)), n, config).values())
               for rank in peaks}
    full, lora = peaks[0], peaks[a.lora_rank]
    import torch
    import transformers
    res = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, transformers=transformers.__version__,
               params=n, lora_params=reft.lora_params(config, a.lora_rank), lora_rank=a.lora_rank,
               step_peak_rss_full=full, step_peak_rss_lora=lora, loading_peak_rss_full=loading[0],
               loading_peak_rss_lora=loading[a.lora_rank], saving_peak_rss_full=saving[0],
               saving_peak_rss_lora=saving[a.lora_rank], peak_rss_imports=imports, measured_ratio=lora / full,
               measured_ratio_above_imports=(lora - imports) / (full - imports), estimate_full=est[0],
               estimate_lora=est[a.lora_rank], estimate_ratio=est[a.lora_rank] / est[0], machine=machine(),
               sizes=dict(hidden=a.hidden, layers=a.layers, intermediate=a.intermediate, heads=a.heads,
                          max_length=a.max_length))
    print(f"random Llama: {n:,} parameters, LoRA rank {a.lora_rank}: {res['lora_params']:,} trained\n"
          f"peak RSS while loading: full {loading[0] / 1e9:.2f} GB, LoRA {loading[a.lora_rank] / 1e9:.2f} GB; "
          f"while saving: full {saving[0] / 1e9:.2f} GB, LoRA {saving[a.lora_rank] / 1e9:.2f} GB\n"
          f"peak RSS of one reft.py step: full {full / 1e9:.2f} GB, LoRA {lora / 1e9:.2f} GB, ratio "
          f"{res['measured_ratio']:.3f}; above the imports' {imports / 1e9:.2f} GB: ratio "
          f"{res['measured_ratio_above_imports']:.3f}\n"
          f"arithmetic (reft.py memory_estimate, fp32): full {est[0] / 1e9:.2f} GB, LoRA {est[a.lora_rank] / 1e9:.2f} "
          f"GB, ratio {res['estimate_ratio']:.3f}", flush=True)
    if a.json:
        write_json(a.json, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
