"""reft.py --lora_rank: the reference is the warm-up (the adapters off), the base never moves, the checkpoints are
plain merged ones with peft's adapters beside, the resume state holds only what trains, resuming and two processes
give the run of one, and the recipe's --lr."""
import dataclasses
import hashlib
import json
import shutil
import sys

import pytest
import torch

from conftest import PY, ROOT, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import reft  # noqa: E402

RANK, ALPHA = 4, 32.0
LORA = ["--batch_size", 8, "--num_samples", 2, "--micro_batch_size", 8, "--max_length", 96, "--eval_every", 0,
        "--save_steps", 1000, "--seed", 5, "--lora_rank", RANK, "--lora_alpha", ALPHA]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(path):
    from safetensors.torch import load_file
    return load_file(path)


@pytest.fixture(scope="module")
def lora_runs(minigsm, warmup, tmp_path_factory):
    """Two LoRA runs of the same flags, 2 and 4 PPO steps: steps2/ and steps4/."""
    root = tmp_path_factory.mktemp("lora")
    for steps in (2, 4):
        run([PY, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", steps, *LORA,
             "--output_dir", root / f"steps{steps}"], timeout=600)
    return root


def test_reference_is_the_warmup_with_the_adapters_off_after_a_step(warmup):
    """rollout_forwards with `ref` None (the LoRA policy, its adapters off) gives exactly the reference log-probs of
    full fine-tuning's loaded reference and of a plain from_pretrained forward of the warm-up, after an optimizer
    step moved every lora_B off zero (before it, adapters on and off agree trivially); the policy's own log-probs then
    differ. The step moves every lora_B and the value head, and nothing else (lora_A neither, B starting at 0)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    args = reft.Args(model=str(warmup), lora_rank=RANK, lora_alpha=ALPHA, seed=5)
    rank, world, device, mesh = reft.init_distributed()
    try:
        _, model, ref = reft.load_models(args, mesh, device)
        _, full, full_ref = reft.load_models(dataclasses.replace(args, lora_rank=0), mesh, device)
        assert ref is None and full_ref is not None
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (4, 14), generator=g)
        attn = torch.ones_like(ids)
        attn[1, :3] = 0  # a left-padded row
        responses = ids[:, 6:]
        rollout = reft.Rollout(rows=list(range(4)), input_ids=ids, attn=attn, P=6, responses=responses,
                               mask=torch.ones_like(responses).float(), ended=torch.zeros(4, dtype=torch.bool))
        before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        logits, values = model(ids, attn, 6)
        (reft.logprobs_of(logits, responses).mean() + values.square().mean()).backward()
        opt.step()
        after = {k: v.full_tensor() for k, v in model.state_dict().items()}
        lora_b = [k for k in after if ".lora_B." in k]
        assert len(lora_b) == 4 * 7  # 4 layers × q, k, v, o, gate, up, down
        for k in after:
            if ".lora_B." in k or k.startswith("v_head."):
                assert not torch.equal(after[k], before[k]) and (after[k] != 0).all(), f"{k} did not train"
            else:  # lora_A too: its gradient is Bᵀ(...), 0 while B is at its initial 0
                assert torch.equal(after[k], before[k]), f"{k} moved"

        got = reft.rollout_forwards(model, None, rollout, 3, 0.7)
        want = reft.rollout_forwards(full, full_ref, rollout, 3, 0.7).ref_logprobs
        assert torch.equal(got.ref_logprobs, want)
        assert (got.old_logprobs - got.ref_logprobs).abs().max() > 1e-3  # the adapters are on outside adapters_off
        plain = reft.PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(warmup, dtype=torch.float32),
                                         value_head=False).eval()
        with torch.no_grad():
            plain_logits, _ = plain(ids, attn, 6)
        torch.testing.assert_close(got.ref_logprobs, reft.logprobs_of(plain_logits, responses, 0.7), rtol=0,
                                   atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_ppo_steps_move_the_adapters_and_the_head_never_the_base(lora_runs, warmup):
    """final/ is the warm-up with each adapter merged: W + (α/r) B A byte for byte where LoRA sits, the warm-up's
    bytes everywhere else (embeddings, norms), so no base parameter moved; every lora_B is off zero after 2 steps
    and moves again by step 4, as does the value head."""
    base = weights(warmup / "model.safetensors")
    scaling = ALPHA / RANK
    for steps in (2, 4):
        final = lora_runs / f"steps{steps}" / "final"
        merged, adapter = weights(final / "model.safetensors"), weights(final / "adapter" / "adapter_model.safetensors")
        assert set(merged) == set(base)
        targets = 0
        for k, w in base.items():
            a = adapter.get(f"base_model.model.{k[:-len('weight')]}lora_A.weight")
            if a is None:
                assert torch.equal(merged[k], w), k
                continue
            b = adapter[f"base_model.model.{k[:-len('weight')]}lora_B.weight"]
            assert (b != 0).all(), k
            assert torch.equal(merged[k], w + scaling * (b @ a)), k
            targets += 1
        assert targets == 4 * 7 and len(adapter) == 2 * targets
    two, four = (weights(lora_runs / f"steps{s}/final/adapter/adapter_model.safetensors") for s in (2, 4))
    assert all(not torch.equal(two[k], four[k]) for k in two if ".lora_B." in k)
    heads = [weights(lora_runs / f"steps{s}/final/value_head.safetensors") for s in (2, 4)]
    assert set(heads[0]) == {"v_head.weight", "v_head.bias"}
    assert not torch.equal(heads[0]["v_head.weight"], heads[1]["v_head.weight"])


def test_final_is_a_plain_checkpoint_and_peft_loads_its_adapter(lora_runs, warmup, minigsm, tmp_path):
    """final/ loads with AutoModelForCausalLM and evaluate.py runs on it; its logits are those of peft's LoRA model
    built from the warm-up and final/adapter (skipped without peft)."""
    from transformers import AutoModelForCausalLM
    final = lora_runs / "steps4" / "final"
    assert (final / "value_head.safetensors").is_file() and not (final / "adapter_config.json").exists()
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["peft_type"] == "LORA"
    run([PY, "evaluate.py", "--data", minigsm, "--model", final, "--output_dir", tmp_path / "eval", "--mode", "greedy",
         "--limit", 8, "--max_new_tokens", 48, "--batch_size", 8])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 <= results["accuracy"]["greedy"] <= 1
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 8
    peft = pytest.importorskip("peft", reason="peft is a test dependency: it checks the adapter's format")
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(warmup, dtype=torch.float32),
                                                  final / "adapter").eval()
    ids = torch.randint(3, merged.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, plain = with_adapter(ids).logits, merged(ids).logits, with_adapter.get_base_model()
        with with_adapter.disable_adapter():
            base = plain(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # merged: each weight rounded once (~1e-5 in the logits)
    assert (got - base).abs().max() > 1e-3  # the adapter matters: peft did load it


def test_resume_state_holds_only_what_trains_and_resuming_gives_the_same_weights(lora_runs, minigsm, warmup,
                                                                                 tmp_path):
    """The DCP metadata of a LoRA resume state names, under model., only the adapters and the value head, and the
    optimizer's state of those alone; a run resumed after step 2 of 4 ends on the same bytes as the run never
    stopped."""
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(lora_runs / "steps2" / "checkpoint-2")).read_metadata().state_dict_metadata
    model = {k[len("model."):] for k in keys if k.startswith("model.")}
    assert model and all(".lora_A." in k or ".lora_B." in k or k.startswith("v_head.") for k in model), model
    assert len(model) == 2 * 4 * 7 + 2
    optim = {k for k in keys if k.startswith("optim.state.")}
    assert {k.rsplit(".", 1)[0][len("optim.state."):] for k in optim} == model, optim
    assert set(keys) - optim - {f"model.{k}" for k in model} <= {k for k in keys if k.startswith("optim.param_groups.")}

    resumed = tmp_path / "resumed"
    shutil.copytree(lora_runs / "steps2", resumed)
    run([PY, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 4, *LORA, "--output_dir", resumed,
         "--resume"], timeout=600)
    full = lora_runs / "steps4"
    assert [m["step"] for m in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    for name in ("model.safetensors", "value_head.safetensors", "adapter/adapter_model.safetensors"):
        assert sha256(resumed / "final" / name) == sha256(full / "final" / name), name


def test_two_processes_match_one_with_lora(lora_runs, minigsm, warmup, tmp_path):
    torchrun(2, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 2, *LORA, "--output_dir", tmp_path,
             timeout=600)
    one, two = read_metrics(lora_runs / "steps2" / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["response_length"] == b["response_length"]  # the same rollouts
        for k in ("score", "kl", "pg_loss", "vf_loss"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
    assert two[1]["kl"] > 0  # the adapters moved the policy off the reference
    want, got = (weights(d / "final" / "adapter" / "adapter_model.safetensors") for d in (lora_runs / "steps2",
                                                                                         tmp_path))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)


def test_lora_learning_rate_is_ten_times_the_recipes(warmup, capsys):
    """An --lr left at -1 becomes the recipe's × LORA_LR_SCALE with --lora_rank (small: 1e-3), and the recipe line
    says so; a given --lr stays; --help says it."""
    assert reft.LORA_LR_SCALE == 10
    full, lora, given = (reft.Args(model=str(warmup), **kw) for kw in ({}, {"lora_rank": 8},
                                                                          {"lora_rank": 8, "lr": 3e-4}))
    said = [reft.fill_recipe(a) for a in (full, lora, given)]
    assert full.lr == 1e-4 and lora.lr == pytest.approx(1e-3) and given.lr == 3e-4
    assert "--lr 0.0001," in said[0] and "--lr 0.001 " in said[1] and "× 10 for LoRA" in said[1], said
    assert "--lr" not in said[2]
    with pytest.raises(SystemExit):
        reft.parse_args(reft.Args, ["--help"])
    assert "× LORA_LR_SCALE (10) with --lora_rank" in " ".join(capsys.readouterr().out.split())
