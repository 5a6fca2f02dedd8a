"""scripts/quickstart.py --preset paper: the paper's pipeline in one command. Its code path end to end on a CPU (the
tiny model, small sizes, two processes per stage under torchrun), and its cost estimate for CodeLlama-7B on 8 GPUs
against an independent computation."""
import dataclasses
import json
import random
import re
import sys
from types import SimpleNamespace

import pytest

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT / "scripts"))
import quickstart  # noqa: E402
import reward  # noqa: E402

STAGES = {"sft": "sft.py", "reft": "reft.py", "verifier_sft": "rerank.py", "verifier_reft": "rerank.py",
          "evaluate_sft": "evaluate.py", "evaluate_reft": "evaluate.py"}
TORCHRUN = f"{PY} -m torch.distributed.run --standalone --nproc_per_node"


def bootstrap(a, b, n=2000):
    """The paired bootstrap as a plain loop: questions drawn with random.Random(0).randrange; 2.5% and 97.5%."""
    rng = random.Random(0)
    means = sorted(sum(b[i] - a[i] for i in [rng.randrange(len(a)) for _ in a]) / len(a) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def test_paper_preset_runs_end_to_end_under_torchrun_and_skips_finished_stages(tmp_path):
    """The paper preset with `tiny` and the size flags on a small minigsm folder, 2 processes per stage. Asserts: the
    estimate with its per-token costs, then every stage's torchrun command with the paper's flags; only the
    checkpoints the pipeline uses are left (no epoch_K/, no resume state); the table has top-1, voting@k and
    rerank@k for SFT and ReFT and ReFT − SFT with its interval; run again, every stage is skipped and the report is
    made again from the evaluations' predictions: with random flags put in them, the table equals a recomputation."""
    data, out = tmp_path / "data", tmp_path / "run"
    run([PY, "data/minigsm/prepare.py", "--out_dir", data, "--n_train", 96, "--n_validation", 16, "--n_test", 16,
         "--n_shifted", 8, "--min_steps", 1, "--max_steps", 2, "--max_number", 9])
    cmd = [PY, "scripts/quickstart.py", "--preset", "paper", "--model", "tiny", "--data", data, "--nproc", 2,
           "--threads", 1, "--out_dir", out, "--sft_epochs", 2, "--warmup_epoch", 1, "--sft_lr", 2e-3,
           "--reft_steps", 2, "-k", 2, "--verifier_samples", 2, "--max_new_tokens", 16, "--reft_max_length", 112,
           "--gold_samples"]  # the 2-epoch warm-up gets no sample right: the verifiers need correct ones
    p = run(cmd, timeout=900)
    estimate = p.stdout[:p.stdout.index("[sft]")]
    for cost in ("estimate, --preset paper: tiny", "6·N FLOPs (forward 2·N + backward 4·N", "8·N with gradient "
                 "checkpointing", "312 TFLOP/s bf16", "2,039 GB/s", "assumed MFU of 40%", "assumed 50% of the "
                 "bandwidth", "tokens = characters / 4", "| SFT training |", "| ReFT rollouts |", "total: ",
                 "~2 hours per epoch of 233 steps on 8 × A100", "disk: 8 checkpoints"):
        assert cost in estimate, cost
    lines = {line.split("] ")[0][1:]: line for line in p.stdout.splitlines() if line.startswith("[")
             and line.split("] ", 1)[1].startswith(PY)}  # the command lines, not the stages' other messages
    for name, script in STAGES.items():
        assert lines[name].startswith(f"[{name}] {TORCHRUN} 2 {script} "), lines[name]
        assert json.loads((out / ("eval_" + name[9:] if name.startswith("eval") else name) / "args.json")
                          .read_text())["world_size"] == 2
    for name, flags in (("sft", "--lr 0.002 --eval_every_epoch --max_new_tokens 16 --warmup_epoch 1 --save_epochs "
                                "none --batch_size 48 --micro_batch_size 6 --warmup_ratio 0.1 --weight_decay 0 "
                                "--max_length 1024 --gradient_checkpointing"),
                        ("reft", f"--model {out}/sft/warmup --epochs 300 --max_steps 2 --lr 3e-07 --batch_size 32 "
                                 "--num_samples 1 --kl_coef 0.01 --vf_coef 5.0 --lam 0.95 --max_length 112 "
                                 "--micro_batch_size 4 --ppo_epochs 2 --gamma 1.0 --max_prompt_length 300 "
                                 "--gradient_checkpointing --eval_every 2 --save_steps 2 --save_best"),
                        ("verifier_sft", f"--model {out}/sft/warmup --init {out}/sft/best --num_samples 2 "
                                         "--max_new_tokens 16 --gold_samples --lr 1e-06 --epochs 3 --batch_size 48 "
                                         "--micro_batch_size 6 --max_length 700"),
                        ("verifier_reft", f"--init {out}/reft/best --samples {out}/verifier_sft/samples.jsonl"),
                        ("evaluate_reft", f"--mode all --model {out}/reft/best --verifier {out}/verifier_reft/final "
                                          f"--data {data} --cot python --split test -k 2 --max_new_tokens 16")):
        assert flags in lines[name], (name, lines[name])

    # Only what the pipeline uses: no epoch_K/, and the finished stages' resume states removed
    assert sorted(f.name for f in (out / "sft").iterdir() if f.is_dir()) == ["best", "final", "init", "warmup"]
    assert sorted(f.name for f in (out / "reft").iterdir() if f.is_dir()) == ["best", "final"]
    for verifier in ("verifier_sft", "verifier_reft"):
        assert [f.name for f in (out / verifier).iterdir() if f.is_dir()] == ["final"]
    results = json.loads((out / "results.json").read_text())
    assert results["table"]["SFT"]["checkpoint"] == "sft/best" and results["table"]["ReFT"]["checkpoint"] == "reft/best"
    assert "| ReFT − SFT [95% interval] |" in (out / "results.md").read_text()

    rng = random.Random(0)
    flags = {}
    for name in ("sft", "reft"):
        ev = out / f"eval_{name}"
        rows = [json.loads(line) for line in open(ev / "predictions.jsonl")]
        for r in rows:
            r.update({f: rng.random() < 0.5 for f in ("greedy_correct", "vote_correct", "rerank_correct",
                                                       "pass_at_k")})
        (ev / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        flags[name] = {m: [float(r[f]) for r in rows] for m, f in (("greedy", "greedy_correct"), ("vote",
                       "vote_correct"), ("rerank", "rerank_correct"), ("pass@k", "pass_at_k"))}
        res = json.loads((ev / "results.json").read_text())
        res["accuracy"].update({m: sum(v) / len(v) for m, v in flags[name].items()})
        (ev / "results.json").write_text(json.dumps(res))
    (out / "results.json").unlink()

    again = run(cmd, timeout=300)
    assert again.stdout.count("done already") == len(STAGES) and f"{TORCHRUN} 2" not in again.stdout
    results = json.loads((out / "results.json").read_text())
    for metric in ("greedy", "vote", "rerank", "pass@k"):
        a, b = flags["sft"][metric], flags["reft"][metric]
        assert results["table"]["SFT"][metric] == sum(a) / 16 and results["table"]["ReFT"][metric] == sum(b) / 16
        assert results["reft_minus_sft"][metric]["diff"] == pytest.approx(sum(b) / 16 - sum(a) / 16, abs=1e-12)
        assert tuple(results["reft_minus_sft"][metric]["ci95"]) == bootstrap(a, b), metric
    table = (out / "results.md").read_text()
    sft_row = next(line for line in table.splitlines() if line.startswith("| SFT (sft/best) |"))
    assert sft_row.split(" | ")[1:4] == [f"{100 * sum(flags['sft'][m]) / 16:.1f}" for m in ("greedy", "vote",
                                                                                              "rerank")]
    assert "| model (checkpoint) | top-1 | voting@2 | rerank@2 | pass@2 |" in table


def fake_reft_data(folder, n_train=100, n_validation=10, n_test=20):
    """A prepared folder as data/mwp_reft/prepare.py writes it, with questions and programs of varied lengths."""
    rng = random.Random(0)
    folder.mkdir()
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        with open(folder / f"{split}_python.jsonl", "w") as f:
            for i in range(n):
                a, b = rng.randrange(100), rng.randrange(100)
                question = f"Tom has {a} apples" + " and a long story" * rng.randrange(20) + f". He gets {b}. How many?"
                cot = f"def solution():\n    a = {a}\n    b = {b}\n" + "    c = a\n" * rng.randrange(10) + \
                    "    return a + b"
                f.write(json.dumps({"item_id": f"{split}{i}", "question": question, "answer_cot": cot,
                                    "answer_value": str(a + b)}) + "\n")
    return folder


def test_estimate_only_for_codellama_on_8_gpus_matches_an_independent_computation(tmp_path):
    """--estimate_only for the real paper preset (CodeLlama-7B, python CoTs, 8 GPUs) on a small gsm8k_reft-like
    folder: it writes nothing, prints every stage's torchrun command, and its figures equal the arithmetic written
    out here from CodeLlama-7B's shapes, the files' characters / 4, 8·N / 20·N / 6·N / 2·N FLOPs per token, 312
    TFLOP/s at 40%, decoding at half of 2,039 GB/s, 16 GPU-hours per 233 ReFT steps as reported, and docs/scaling.md's
    memory per GPU."""
    data, out = fake_reft_data(tmp_path / "gsm8k_like"), tmp_path / "run"
    p = run([PY, "scripts/quickstart.py", "--preset", "paper", "--nproc", 8, "--data", data, "--cot", "python",
             "--estimate_only", "--out_dir", out], timeout=120)
    assert not out.exists()
    for name, script in STAGES.items():
        assert f"[{name}] {TORCHRUN} 8 {script} " in p.stdout, name
    assert "--model codellama/CodeLlama-7b-hf" in p.stdout

    n = 2 * 32016 * 4096 + 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert f"N = {n:,} parameters" in p.stdout
    train = [json.loads(line) for line in open(data / "train_python.jsonl")]
    test = [json.loads(line) for line in open(data / "test_python.jsonl")]
    tp = sum(len(reward.build_prompt(r["question"], "python")) for r in train) / len(train) / 4
    tc = sum(len(reward.build_target(r, "python")) for r in train) / len(train) / 4 + 1  # + EOS
    tt = sum(len(reward.build_prompt(r["question"], "python")) for r in test) / len(test) / 4
    steps = 100 // 32 * 300
    flops_hour = 312e12 * 0.4 * 3600

    def decode_hours(tokens, batch, context):
        return tokens / batch * (2 * n + batch * context * 2 * 32 * 4096 * 2) / (2.039e12 * 0.5) / 3600

    expected = {  # stage: (tokens, FLOPs, GPU-hours)
        "SFT training": (40 * 100 * (tp + tc), 8 * n * 40 * 100 * (tp + tc)),
        "ReFT rollouts": (steps * 32 * tc, 2 * n * steps * 32 * tc, decode_hours(steps * 32 * tc, 4, tp + tc / 2)),
        "ReFT forwards + PPO": (steps * 32 * (tp + tc), 20 * n * steps * 32 * (tp + tc)),
        "ReFT validation": (300 * 10 * tc, 2 * n * 300 * 10 * tc, decode_hours(300 * 10 * tc, 64, tp + tc / 2)),
        "verifier training ×2": (6 * 100 * 100 * (tp + tc), 6 * n * 6 * 100 * 100 * (tp + tc)),
        "test generation ×2": (2 * 20 * 101 * tc, 2 * n * 2 * 20 * 101 * tc,
                               decode_hours(2 * 20 * 101 * tc, 64, tt + tc / 2)),
        "test verifier scores ×2": (2 * 20 * 100 * (tt + tc), 2 * n * 2 * 20 * 100 * (tt + tc)),
    }
    printed = {m[0]: tuple(float(x.replace(",", "")) for x in m[1:]) for m in
               re.findall(r"\| ([^|]+?) \| ([\d,]+) \| ([\d.e+-]+) \| ([\d.e+-]+) \|", p.stdout)}
    assert len(printed) == 9
    for stage, values in expected.items():
        tokens, flops, hours = (*values, values[1] / flops_hour) if len(values) == 2 else values
        assert printed[stage][0] == round(tokens), stage
        assert printed[stage][1] == pytest.approx(flops, rel=1e-3), stage
        assert printed[stage][2] == pytest.approx(hours, rel=1e-3), stage
    total = float(re.search(r"total: ([\d.e+-]+) GPU-hours", p.stdout).group(1))
    assert total == pytest.approx(sum(v[2] for v in printed.values()), rel=1e-3)
    reft = sum(v[2] for k, v in printed.items() if k.startswith("ReFT"))
    reported = steps * 2 * 8 / 233
    assert f"{reported:.4g} GPU-hours for these {steps:,} steps" in p.stdout
    with_reported = float(re.search(r"With that figure the total is ([\d.e+-]+) GPU-hours", p.stdout).group(1))
    assert with_reported == pytest.approx(total - reft + reported, rel=1e-3)
    # memory per GPU, docs/scaling.md's table for each stage's paper flags on 8 GPUs: the larger of its training
    # micro-batch and its generation call; KV cache 2 × 32 layers × 4096 × 2 bytes per token
    head, kv = 32016 * 4096, 2 * 32 * 4096 * 2
    gathered = 2 * (n - head) + 4 * head
    longest = max(len(reward.build_prompt(r["question"], "python", sampling=True)) for r in train) / 4
    longest_test = max(len(reward.build_prompt(r["question"], "python", sampling=True)) for r in test) / 4

    def training(state, tokens, checkpointing):
        activations = 32 * tokens * 4096 * 2 + 34 * tokens * 4096 if checkpointing else 32 * 34 * tokens * 4096
        return (state + 4) * n / 8 + 8 * n / 32 + 4 * head + 12 * tokens * 32016 + activations

    memory = {"SFT": max(training(12, 6 * 1024, True), 12 * n / 8 + gathered + 64 * (longest + 700) * kv),
              "ReFT": max(training(16, 4 * 700, True), 16 * n / 8 + gathered + 64 * 700 * kv),
              "verifier": max(training(12, 6 * 700, False), 4 * n / 8 + gathered + 64 * (longest + 700) * kv),
              "evaluation": 4 * n / 8 + gathered + 64 * (longest_test + 700) * kv}
    assert ", ".join(f"{stage} {b / 1e9:,.1f} GB" for stage, b in memory.items()) + " on 8 GPUs; an A100 has 80 GB\n" \
        in p.stdout
    text = (100 * 100 + 2 * 20 * 101) * (tc * 4 + 200)
    assert f"= {(7 * 2 * n + text) / 1e9:,.1f} GB at the end; at the peak {(7 * 2 * n + text + 24 * n) / 1e9:,.1f} " \
           f"GB" in p.stdout


def test_paper_preset_refuses_missing_data_and_unknown_models_in_one_line(tmp_path):
    """No prepare step runs (it needs network): one line naming the command; a model whose size is unknown."""
    # a dataset of the paper's that this checkout has not prepared (a developer's may hold some)
    name = next(n for n in quickstart.MWP_REFT if not (ROOT / "data" / n / "train_python.jsonl").exists())
    for argv, message in (
            (["--data", name], f"error: --data {name}: " + str(ROOT / f"data/{name}/train_python.jsonl") +
             f" not found; prepare it first: `python data/mwp_reft/prepare.py --dataset {quickstart.MWP_REFT[name]}`"),
            (["--data", fake_reft_data(tmp_path / "d"), "--model", "someone/some-7b"],
             "error: --model someone/some-7b: the paper preset takes codellama/CodeLlama-7b-hf, "
             "facebook/galactica-6.7b, `tiny` or a local HF folder"),
            (["--fast"], "error: --fast is the cpu preset's")):
        with pytest.raises(SystemExit) as e:
            quickstart.quickstart_args(["--preset", "paper", *map(str, argv)])
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_lora_parameter_count_from_the_sizes_is_reft_s(family):
    """The quickstart's LoRA count (r × (in + out) per projection, from the config's sizes) equals reft.py's, which
    builds the model on the meta device and wraps its LORA_TARGETS: a Llama with grouped KV heads and an OPT, and
    the paper's two 7B models as KNOWN_MODELS gives their sizes."""
    import reft
    from transformers import LlamaConfig, OPTConfig
    if family == "llama":
        small = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=96)
        big = LlamaConfig(**quickstart.KNOWN_MODELS["codellama/CodeLlama-7b-hf"][1], tie_word_embeddings=False)
        known = quickstart.KNOWN_MODELS["codellama/CodeLlama-7b-hf"]
    else:
        small = OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=96,
                          word_embed_proj_dim=64)
        big = OPTConfig(**quickstart.KNOWN_MODELS["facebook/galactica-6.7b"][1], word_embed_proj_dim=4096)
        known = quickstart.KNOWN_MODELS["facebook/galactica-6.7b"]
    for rank in (1, 16):
        assert quickstart.lora_params(small, rank) == reft.lora_params(small, rank)
    assert reft.config_params(big) == known[0]  # the sizes are the model's
    assert quickstart.lora_params(SimpleNamespace(**known[1]), 64) == reft.lora_params(big, 64)
    assert quickstart.lora_params(SimpleNamespace(**known[1]), 16) == \
        (16 * 32 * (11 * 4096 + 3 * 11008) if family == "llama" else 16 * 32 * (10 * 4096 + 2 * 16384))


def test_estimate_only_with_lora_on_one_gpu_is_reft_s_memory_check(tmp_path):
    """--nproc 1 --lora_rank 16: every stage that trains gets --lora_rank 16 and the preset's lr × 10 (evaluate.py
    none), every stage fits one 80 GB GPU, and the ReFT memory printed is what reft.py's own check (memory_error)
    computes for that command on one GPU: the printed figure (0.1 GB) fits a device of its size + 0.05 GB and not one
    of its size - 0.05 GB."""
    import reft
    from transformers import LlamaConfig
    data, out = fake_reft_data(tmp_path / "gsm8k_like"), tmp_path / "run"
    p = run([PY, "scripts/quickstart.py", "--preset", "paper", "--nproc", 1, "--data", data, "--cot", "python",
             "--lora_rank", 16, "--estimate_only", "--out_dir", out], timeout=120)
    commands = {line.split("]")[0][1:]: line for line in p.stdout.splitlines() if line.startswith("[")}
    assert " --lora_rank 16 --lr 3e-06 " in commands["reft"]
    assert " --lr 0.0001 " in commands["sft"] and commands["sft"].count(" --lora_rank 16 ") == 1
    assert all(" --lr 1e-05 " in commands[v] and " --lora_rank 16 " in commands[v]
               for v in ("verifier_sft", "verifier_reft"))
    assert not any("--lora_rank" in line for name, line in commands.items() if name.startswith("evaluate"))
    need = float(re.search(r"ReFT \(LoRA rank 16\) ([\d.]+) GB", p.stdout).group(1)) * 1e9
    assert "SFT (LoRA rank 16) " in p.stdout and "would stop" not in p.stdout  # full fine-tuning: SFT, verifier
    config = LlamaConfig(**quickstart.KNOWN_MODELS["codellama/CodeLlama-7b-hf"][1], tie_word_embeddings=False)
    args = reft.Args(batch_size=32, num_samples=1, micro_batch_size=4, max_length=700, gradient_checkpointing=True,
                     eval_every=3, lora_rank=16)
    n = quickstart.KNOWN_MODELS["codellama/CodeLlama-7b-hf"][0]
    assert reft.memory_error(args, n, config, 1, True, need + 0.05e9) is None
    assert reft.memory_error(args, n, config, 1, True, need - 0.05e9) is not None
    assert reft.memory_error(dataclasses.replace(args, lora_rank=0), n, config, 1, True, 80e9) is not None


def test_lora_rank_scales_the_preset_s_lrs_left_automatic_and_is_checked_first(tmp_path):
    """--lora_rank makes a --reft_lr or --sft_lr left at -1 the preset's × 10 (the cpu preset's 1e-4 and 2e-3 too); a
    given one stays; a negative rank is one error line before anything runs."""
    out = ["--out_dir", str(tmp_path / "q")]
    plain, lora = quickstart.quickstart_args(out), quickstart.quickstart_args([*out, "--lora_rank", "8"])
    assert (plain.reft_lr, plain.sft_lr) == (1e-4, 2e-3)
    assert (lora.reft_lr, lora.sft_lr) == (pytest.approx(1e-3), pytest.approx(2e-2))
    given = quickstart.quickstart_args([*out, "--lora_rank", "8", "--reft_lr", "2e-4", "--sft_lr", "1e-3"])
    assert (given.reft_lr, given.sft_lr) == (2e-4, 1e-3)
    with pytest.raises(SystemExit) as e:
        quickstart.quickstart_args([*out, "--lora_rank", "-1"])
    assert str(e.value) == "error: --lora_rank must be at least 0, not -1"
