"""The 7B path, checked on CPU: any decoder-only family (a tiny OPT, Galactica's architecture), loading without a
full copy on every rank, sharded gradient accumulation, dropout off in PPO, fp32 heads under bf16 mixed precision,
checkpoints in the run's dtype and only at --save_epochs, gradient checkpointing, bounded FSDP2 bookkeeping."""
import json
import shutil
import sys
import textwrap

import pytest
import torch

from conftest import PY, ROOT, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import reft  # noqa: E402
import rerank  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402

PPO_ONE_MINIBATCH = ["--batch_size", 8, "--micro_batch_size", 8, "--ppo_epochs", 1, "--max_length", 96,
                     "--max_prompt_length", 64, "--eval_every", 0]


@pytest.fixture(scope="module")
def tiny_opt(minigsm, tmp_path_factory):
    """An untrained OPT checkpoint (the architecture of Galactica) with dropout 0.1 and LayerDrop in its config, and
    the tiny BPE tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM
    out = tmp_path_factory.mktemp("opt")
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)
    tok = sft.train_tiny_tokenizer([reward.build_prompt(r["question"], "nl") + reward.build_target(r, "nl")
                                    for r in records], 300)
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=512, dropout=0.1,
                             attention_dropout=0.1, layerdrop=0.0, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_every_stage_runs_on_opt(minigsm, tiny_opt, tmp_path):
    """Galactica's family (OPT: `model.decoder.layers`, learned positions, dropout 0.1) through all four stages."""
    run([PY, "sft.py", "--model", tiny_opt, "--data", minigsm, "--cot", "nl", "--max_steps", 4, "--batch_size", 16,
         "--micro_batch_size", 8, "--lr", 1e-3, "--save_epochs", "none", "--output_dir", tmp_path / "sft"])
    warm = tmp_path / "sft" / "final"
    assert json.loads((warm / "config.json").read_text())["dropout"] == 0.1  # SFT keeps the model's own config
    run([PY, "reft.py", "--model", warm, "--data", minigsm, "--max_steps", 2, *PPO_ONE_MINIBATCH,
         "--output_dir", tmp_path / "reft"])
    m = read_metrics(tmp_path / "reft" / "metrics.jsonl")
    assert m[0]["ratio_first"] == 1.0 and m[0]["approx_kl"] == 0.0 and m[0]["kl"] == 0.0
    # The barely trained OPT samples wrong answers only, and a verifier needs both kinds: its samples, with each
    # question's gold CoT added as a correct one, train the verifier.
    p = run([PY, "rerank.py", "--model", warm, "--data", minigsm, "--limit", 8, "--num_samples", 2,
             "--max_new_tokens", 48, "--output_dir", tmp_path / "sampled"], check=False)
    assert p.returncode == 0 or "a verifier needs both kinds" in p.stderr, p.stderr[-3000:]
    drawn = [json.loads(line) for line in (tmp_path / "sampled" / "samples.jsonl").read_text().splitlines()]
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)[:8]
    assert {r["item_id"] for r in drawn} == {r["item_id"] for r in records}
    gold = [{"item_id": r["item_id"], "question": r["question"], "completion": reward.build_target(r, "nl"),
             "correct": True} for r in records]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in drawn + gold))
    run([PY, "rerank.py", "--samples", tmp_path / "samples.jsonl", "--init", warm, "--data", minigsm, "--epochs", 1,
         "--batch_size", 4, "--micro_batch_size", 4, "--output_dir", tmp_path / "verifier"])
    run([PY, "evaluate.py", "--model", tmp_path / "reft" / "final", "--verifier", tmp_path / "verifier" / "final",
         "--mode", "all", "-k", 2, "--limit", 4, "--max_new_tokens", 48, "--data", minigsm,
         "--output_dir", tmp_path / "eval"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["n"] == 4 and "rerank" in json.dumps(results)


def test_llama_with_attention_dropout_has_ratio_one(minigsm, warmup, tmp_path):
    """A Llama whose config asks for attention dropout: PPO's first ratio is exactly 1 and its approx-KL 0."""
    warm = tmp_path / "warm"
    shutil.copytree(warmup, warm)
    config = json.loads((warm / "config.json").read_text())
    (warm / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    run([PY, "reft.py", "--model", warm, "--data", minigsm, "--max_steps", 1, *PPO_ONE_MINIBATCH,
         "--output_dir", tmp_path / "reft"])
    m = read_metrics(tmp_path / "reft" / "metrics.jsonl")
    assert m[0]["ratio_first"] == 1.0 and m[0]["approx_kl"] == 0.0


RSS = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    import evaluate
    rank, world, device, mesh = evaluate.init_distributed()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, tok = evaluate.load("AutoModelForCausalLM", sys.argv[2], "--model", mesh, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    local = sum(p.to_local().numel() for p in model.parameters())
    with open(f"{sys.argv[3]}/rss_{rank}.txt", "w") as f:
        f.write(f"{(peak - before) * 1024} {local * 4}")
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_loading_holds_the_full_model_on_rank_0_only(warmup, tmp_path):
    """A 100 M-parameter checkpoint (400 MB in fp32) loaded by 2 processes: rank 1's peak memory grows by its half
    and a margin, never by a full copy (it grew by 1.9 full copies when every rank read the whole checkpoint)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    ckpt = tmp_path / "big"
    config = LlamaConfig(vocab_size=512, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         intermediate_size=2816, pad_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert n >= 100_000_000
    model.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(warmup).save_pretrained(ckpt)
    del model
    (tmp_path / "rss.py").write_text(RSS)
    torchrun(2, tmp_path / "rss.py", ROOT, ckpt, tmp_path, timeout=600)
    grown, shard = zip(*((int(x) for x in (tmp_path / f"rss_{r}.txt").read_text().split()) for r in range(2)))
    assert sum(shard) == 4 * n
    assert grown[1] < 0.75 * 4 * n, f"rank 1 grew by {grown[1] / 1e6:.0f} MB for a {4 * n / 1e6:.0f} MB model"


@pytest.fixture
def group():
    """A 1-process group in this process, as plain `python sft.py` makes."""
    rank, world, device, mesh = sft.init_distributed()
    yield mesh
    torch.distributed.destroy_process_group()


def tiny_lm(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, pad_token_id=0, eos_token_id=1,
                                        tie_word_embeddings=tie))


def test_accumulated_gradients_stay_sharded(minigsm, tmp_path, monkeypatch):
    """Between micro-batches every parameter already holds its reduce-scattered (sharded) gradient; FSDP2 without
    the sync would keep a full unsharded fp32 gradient per rank until the last micro-batch."""
    from torch.distributed.tensor import DTensor
    seen = []
    real = sft.token_nll_sum

    def spy(model, *a):
        seen.append([p.grad for p in model.parameters()])
        return real(model, *a)

    monkeypatch.setattr(sft, "token_nll_sum", spy)
    sft.main(sft.Args(data=str(minigsm), max_steps=1, batch_size=16, micro_batch_size=4, output_dir=str(tmp_path),
                      save_epochs="none"))
    assert len(seen) == 4
    assert all(g is None for g in seen[0])
    for grads in seen[1:]:
        assert all(isinstance(g, DTensor) and g.placements[0].is_shard() for g in grads)


def test_heads_compute_in_fp32_under_bf16_mixed_precision(group):
    """The value head resolves values 1e-4 apart near 1 (bf16 rounds them all to 1.0), and the LM head's logits
    and the verifier's scores come from fp32 weights, while the trunk computes in bf16."""
    from transformers import AutoModelForSequenceClassification
    model = reft.PolicyWithValueHead(tiny_lm())
    with torch.no_grad():
        model.v_head.weight.zero_()
        model.v_head.weight[0, 0] = 1e-4
        model.v_head.bias.fill_(1.0)
    reft.shard(model, group, torch.bfloat16)
    dtypes = {}  # pre-hooks run after FSDP2's own, which gathers the weights in the group's compute dtype
    for name in ("v_head", "lm"):
        head = model.v_head if name == "v_head" else model.lm.get_output_embeddings()
        head.register_forward_pre_hook(lambda m, i, name=name: dtypes.update({name: m.weight.dtype}))
        head.register_forward_hook(lambda m, i, o, name=name: dtypes.update({name + " out": o.dtype}))
    block = reft.fsdp_groups(model)[0][0]
    block.register_forward_pre_hook(lambda m, i: dtypes.update(block=m.mlp.up_proj.weight.dtype))
    ids = torch.randint(2, 64, (2, 12))
    with torch.no_grad():
        logits, values = model(ids, torch.ones_like(ids), 4)
    assert dtypes == {"v_head": torch.float32, "v_head out": torch.float32, "lm": torch.float32,
                      "lm out": torch.float32, "block": torch.bfloat16}
    assert values.dtype == torch.float32 and logits.dtype == torch.float32
    assert (values - 1).abs().max() < 1e-3 and len(values.unique()) > values.numel() // 2

    torch.manual_seed(0)
    config = tiny_lm().config
    config.num_labels = 1
    verifier = AutoModelForSequenceClassification.from_config(config)
    rerank.shard(verifier, group, torch.bfloat16)
    seen = []
    verifier.score.register_forward_pre_hook(lambda m, i: seen.append(m.weight.dtype))
    verifier.score.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        scores = verifier(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert seen == [torch.float32, torch.float32] and scores.dtype == torch.float32


def test_checkpoints_are_written_in_the_runs_dtype(group, tmp_path):
    """save_hf writes the dtype it is given (bf16 on GPU), and the folder loads back as that model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    lm = tiny_lm()
    expected = {k: v.to(torch.bfloat16) for k, v in lm.state_dict().items()}
    sft.shard(lm, group, torch.float32)
    tok = sft.train_tiny_tokenizer(["1 + 2 = 3"], 300)
    sft.save_hf(lm, tok, sft.Args(), tmp_path, 0, torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_generation_leaves_no_fsdp_bookkeeping_behind(group):
    """Inference-only loops (evaluate.py, rerank.py's sampling) must not grow FSDP2's record of the forward order,
    which only a backward clears: gathered_for_generation resets it (FSDPModule.reset_iter_state) after many sample()
    and generate() calls, each of which records every block at every token. The samples are those of the same model
    unsharded, the root keeps its parameters gathered from forward to backward (FSDP2's default), and a training
    step goes on as before."""
    model = reft.PolicyWithValueHead(tiny_lm())
    plain = tiny_lm().eval()  # the same weights (seed 0), never sharded
    reft.shard(model, group, torch.float32)
    ids, mask = reft.left_pad([[5, 6, 7], [8, 9]], 0, torch.device("cpu"))
    with torch.no_grad():
        model(ids, mask, 3)
    state = model._get_fsdp_state()

    def recorded():  # FSDP2's private record: the shared forward order and each group's indices into it
        groups = [g for s in state._state_ctx.all_states for g in s._fsdp_param_groups]
        return len(state._comm_ctx.post_forward_order) + sum(len(g._post_forward_indices) for g in groups)

    with torch.no_grad():
        expected = reft.sample(plain, ids, mask, 8, 99, 0, 1.0, [3, 4])
        expected_greedy = plain.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                         pad_token_id=0, eos_token_id=99)
        for _ in range(10):
            with reft.gathered_for_generation(model):
                assert torch.equal(reft.sample(model.lm, ids, mask, 8, 99, 0, 1.0, [3, 4]), expected)
                greedy = model.lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                           pad_token_id=0, eos_token_id=99)
                assert torch.equal(greedy, expected_greedy)
                assert recorded() >= 2 * 2 * 8  # two blocks at each of 8 tokens, twice
            assert recorded() == 0
    assert state._fsdp_param_group.post_forward_mesh_info is None  # FSDP2's default for the root
    ids = torch.randint(2, 64, (2, 12))
    logits, values = model(ids, torch.ones_like(ids), 4)
    (logits.logsumexp(-1).mean() + values.mean()).backward()
    assert all(p.grad is not None for p in model.parameters()) and recorded() == 0


@pytest.mark.parametrize("world", [1, 2])
def test_gradient_checkpointing_gives_the_same_losses(minigsm, tmp_path, world):
    args = ["--data", minigsm, "--max_steps", 3, "--batch_size", 16, "--micro_batch_size", 8, "--save_epochs",
            "none"]
    launch = (lambda *a: run([PY, *a])) if world == 1 else (lambda *a: torchrun(2, *a))
    launch("sft.py", *args, "--output_dir", tmp_path / "plain")
    launch("sft.py", *args, "--gradient_checkpointing", "--output_dir", tmp_path / "ckpt")
    plain, ckpt = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("plain", "ckpt"))
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in ckpt], rel=1e-5)


def test_reft_gradient_checkpointing_and_separate_value_model(minigsm, warmup, tmp_path):
    """PPO with gradient checkpointing repeats the plain run's numbers; --separate_value_model (the paper's
    ablation, a critic trunk of its own) trains and saves its critic beside the policy."""
    common = ["--model", warmup, "--data", minigsm, "--max_steps", 2, *PPO_ONE_MINIBATCH]
    run([PY, "reft.py", *common, "--output_dir", tmp_path / "plain"])
    run([PY, "reft.py", *common, "--gradient_checkpointing", "--output_dir", tmp_path / "ckpt"])
    plain, ckpt = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("plain", "ckpt"))
    for a, b in zip(plain, ckpt):
        for k in ("score", "kl", "pg_loss", "vf_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    run([PY, "reft.py", *common, "--separate_value_model", "--output_dir", tmp_path / "critic"])
    from safetensors import safe_open
    with safe_open(tmp_path / "critic" / "final" / "value_head.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "v_head.weight" in keys and any(k.startswith("critic.layers.") for k in keys)


def test_save_epochs_keeps_only_the_epochs_asked_for(minigsm, tmp_path):
    run([PY, "sft.py", "--data", minigsm, "--epochs", 3, "--batch_size", 64, "--micro_batch_size", 64,
         "--save_epochs", "2", "--output_dir", tmp_path])
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_2"]
    p = run([PY, "sft.py", "--data", minigsm, "--save_epochs", "two", "--output_dir", tmp_path / "bad"], check=False)
    assert p.returncode != 0 and "error: --save_epochs must be all, none or epoch numbers" in p.stderr
