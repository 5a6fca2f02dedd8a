"""What the first GPU run would meet, checked on CPU: attention rows that allow no key (cuDNN on H100/H200 turns
them into NaN, the CPU kernel into zeros, so nothing else on CPU notices them), dropped models that stay in memory
beside the next one, and a run whose gradient is never finite."""
import copy
import json
import sys
import textwrap
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, read_metrics, torchrun

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import reft  # noqa: E402
import rerank  # noqa: E402
import sft  # noqa: E402


@contextmanager
def sdpa_calls(monkeypatch):
    """Every call of torch's scaled_dot_product_attention (the one attention kernel of the sdpa implementations of
    Llama and OPT) meanwhile, as (query length, whether it had a mask, rows of its mask that allow no key)."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        empty = 0
        if attn_mask is not None:
            allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min
            empty = int((~allowed.any(-1)).sum())
        calls.append((query.size(-2), attn_mask is not None, empty))
        return real(query, key, value, attn_mask=attn_mask, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        yield calls


def run_main(module, argv):
    try:
        module.main(module.parse_args(module.Args, [str(a) for a in argv]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_no_stage_hands_attention_a_fully_masked_row(minigsm, warmup, verifier, tmp_path, monkeypatch):
    """Each stage in this process on left-padded batches: SFT training and its greedy evaluation; ReFT's sampling
    (prefill and KV-cache decode), rollout forwards, PPO update and greedy evaluation; the verifier's sampling,
    training (right-padded) and held-out scoring; evaluate.py's generation (greedy and sampled) and verifier
    scoring. Every query row of every attention call must allow at least one key."""
    stages = {
        "sft": (sft, ["--model", warmup, "--data", minigsm, "--max_steps", 4, "--batch_size", 64,
                      "--micro_batch_size", 32, "--save_epochs", "none", "--output_dir", tmp_path / "sft"]),
        "reft": (reft, ["--model", warmup, "--data", minigsm, "--max_steps", 1, "--batch_size", 4,
                        "--micro_batch_size", 4, "--max_length", 96, "--eval_every", 1, "--output_dir",
                        tmp_path / "reft"]),
        "rerank": (rerank, ["--model", warmup, "--init", warmup, "--data", minigsm, "--limit", 8, "--num_samples", 2,
                            "--max_new_tokens", 32, "--gold_samples", "--holdout_fraction", 0.5, "--epochs", 1,
                            "--batch_size", 4, "--micro_batch_size", 4, "--output_dir", tmp_path / "rerank"]),
        "evaluate": (evaluate, ["--model", warmup, "--verifier", verifier, "--data", minigsm, "--mode", "all", "-k", 2,
                                "--limit", 8, "--max_new_tokens", 32, "--output_dir", tmp_path / "eval"]),
    }
    found = {}
    for name, (module, argv) in stages.items():
        with sdpa_calls(monkeypatch) as calls:
            run_main(module, argv)
        masked = [c for c in calls if c[1]]
        # teeth: padded batches did run, whole sequences (prefill, training, scoring) and, where prompts of different
        # lengths are decoded together, single tokens (rerank.py too: many questions per generate() call)
        assert any(q > 1 for q, _, _ in masked), name
        assert any(q == 1 for q, _, _ in masked), name
        found[name] = sum(empty for _, _, empty in calls)
    assert found == dict.fromkeys(stages, 0)


def tiny(family):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, pad_token_id=0))
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_real_tokens_compute_exactly_as_with_plain_sdpa(family, monkeypatch):
    """A model built the way every stage builds one (load_sharded: on the meta device from the config, then filled)
    on a left-padded batch: no fully masked row, and every real token's logits and greedy continuation are
    bit for bit those of transformers' plain sdpa, which leaves the pad rows empty (OPT also takes its positions
    from the 2-D mask: that stays as it was). The real tokens also match each row run alone, without padding."""
    from transformers import AutoModelForCausalLM
    _, _, device, mesh = sft.init_distributed()
    try:
        full = tiny(family).eval()
        model = sft.load_sharded(lambda: full, lambda config: AutoModelForCausalLM.from_config(
            config, dtype=torch.float32), mesh, device).eval()
        ids = torch.tensor([[0, 0, 0, 5, 6, 7], [0, 9, 8, 7, 6, 5], [11, 12, 13, 14, 15, 16]])
        mask = (ids != 0).long()
        real = mask.bool()

        def forward_and_generate():
            with torch.no_grad(), sft.gathered_for_generation(model), sdpa_calls(monkeypatch) as calls:
                logits = model(input_ids=ids, attention_mask=mask).logits
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4,
                                     pad_token_id=0, eos_token_id=1)
            return logits, out, sum(empty for _, _, empty in calls)

        logits, out, empty = forward_and_generate()
        model.config._attn_implementation = "sdpa"  # transformers' own, on the same weights
        plain_logits, plain_out, plain_empty = forward_and_generate()
        assert empty == 0 and plain_empty > 0
        assert torch.equal(logits[real], plain_logits[real]) and torch.equal(out, plain_out)
        with torch.no_grad():
            for row in range(len(ids)):
                alone = model(input_ids=ids[row:row + 1, real[row]]).logits[0]
                torch.testing.assert_close(logits[row, real[row]], alone, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_tied_lm_head_computes_in_fp32_on_the_bf16_trunk(family):
    """shard() in bf16 (the GPU's compute dtype) on a model whose output embedding is its input one (Galactica's
    OPT; here also a tied Llama): one FSDP2 group holds both, and FSDP2 before torch 2.13 casts the inputs of the
    group's first module alone (the ids of the input embedding), so the LM head met the trunk's bf16 hidden states
    with its fp32 weight and the first GPU run failed (mat1 and mat2 dtypes). A training step, a forward and a
    short generation: the LM head computes in fp32 on fp32 inputs and hands out fp32 logits."""
    _, _, device, mesh = sft.init_distributed()
    try:
        full = tiny(family)
        if family == "llama":
            full = type(full)(full.config.__class__(**{**full.config.to_dict(), "tie_word_embeddings": True}))
        head = full.get_output_embeddings()
        assert head.weight is full.get_input_embeddings().weight
        model = sft.shard(full.to(device), mesh, torch.bfloat16)
        seen, trunk = [], []
        head.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
        sft.fsdp_groups(model)[0][-1].register_forward_hook(
            lambda m, args, out: trunk.append((out if torch.is_tensor(out) else out[0]).dtype))
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
        assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
        with torch.no_grad(), sft.gathered_for_generation(model):
            model.generate(input_ids=ids, do_sample=False, max_new_tokens=2, pad_token_id=0, eos_token_id=1)
        assert len(seen) == 1 + 2 and set(seen) == {(torch.float32, torch.float32)}  # training, prefill, 1 decode
        assert trunk == [torch.bfloat16] * 3  # teeth: uncast, the LM head's input would be bf16
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", ["evaluate", "rerank"])
def test_the_dropped_policy_is_freed_before_the_verifier_loads(stage, minigsm, warmup, verifier, tmp_path,
                                                               monkeypatch):
    """evaluate.py drops its policy before the verifier loads, rerank.py its sampling model before the verifier it
    trains: on one GPU the verifier must not load beside 27 GB of dead weights. FSDP2 keeps a sharded model in
    reference cycles, which only a cyclic collection frees; the automatic ones are switched off here, so that only
    what the stage does itself counts (and the outcome does not depend on when Python's collector happens to run)."""
    import gc
    import weakref
    module = {"evaluate": evaluate, "rerank": rerank}[stage]
    policy, alive_at_verifier = [], []
    real_load = module.load

    def load(cls_name, *a, **kw):
        if cls_name == "AutoModelForSequenceClassification":
            alive_at_verifier.append([ref() is not None for ref in policy])
        model, tok = real_load(cls_name, *a, **kw)
        if cls_name == "AutoModelForCausalLM":
            policy.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(module, "load", load)
    argv = {"evaluate": ["--model", warmup, "--verifier", verifier, "--mode", "rerank", "-k", 2, "--limit", 2,
                         "--max_new_tokens", 16],
            "rerank": ["--model", warmup, "--init", warmup, "--limit", 4, "--num_samples", 2, "--max_new_tokens", 16,
                       "--gold_samples", "--epochs", 1, "--batch_size", 4, "--micro_batch_size", 4]}[stage]
    gc.collect()
    gc.disable()
    try:
        run_main(module, ["--data", minigsm, "--output_dir", tmp_path, *argv])
    finally:
        gc.enable()
    assert alive_at_verifier == [[False]]


def test_a_step_with_a_nan_gradient_is_skipped(monkeypatch):
    """clipped_step on a sharded model: a NaN in one gradient (its norm is NaN) leaves every weight and the optimizer
    state as they were and clears the gradients; a finite gradient steps."""
    from transformers import AutoModelForCausalLM
    _, _, device, mesh = reft.init_distributed()
    try:
        model = reft.load_sharded(lambda: tiny("llama"), lambda config: AutoModelForCausalLM.from_config(
            config, dtype=torch.float32), mesh, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.tensor([[3, 4, 5, 6]])
        before = [p.full_tensor().clone() for p in model.parameters()]
        model(input_ids=ids, labels=ids).loss.backward()
        next(model.parameters()).grad.mul_(float("nan"))
        assert reft.clipped_step(model, opt) is False
        assert all(torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before))
        assert not opt.state and all(p.grad is None for p in model.parameters())
        model(input_ids=ids, labels=ids).loss.backward()
        assert reft.clipped_step(model, opt) is True
        assert not all(torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before))
    finally:
        dist.destroy_process_group()


def test_skipped_steps_in_a_row_stop_the_run():
    """count_skipped: only skips in a row count towards --max_skipped_steps (a step that steps starts over), the
    total goes on; 0 never stops; a PPO step's several optimizer steps count one by one."""
    counts = (0, 0)
    for stepped in (False, False, True, False, False):
        counts = reft.count_skipped(*counts, [stepped], 6, SimpleNamespace(max_skipped_steps=3))
    assert counts == (4, 2)
    with pytest.raises(SystemExit, match=r"^error: step 7: 3 optimizer steps in a row skipped \(--max_skipped_steps "
                                         r"3\), 5 in all: .*not finite.*fully masked attention rows on GPU"):
        reft.count_skipped(*counts, [False], 6, SimpleNamespace(max_skipped_steps=3))
    assert reft.count_skipped(0, 0, [False, True, False], 0, SimpleNamespace(max_skipped_steps=2)) == (2, 1)
    with pytest.raises(SystemExit, match=r"^error: step 1: 2 optimizer steps in a row skipped"):
        reft.count_skipped(0, 0, [True, False, False, True], 0, SimpleNamespace(max_skipped_steps=2))
    for _ in range(100):
        counts = reft.count_skipped(*counts, [False], 6, SimpleNamespace(max_skipped_steps=0))


def test_a_run_whose_gradient_is_never_finite_stops(minigsm, warmup, tmp_path, monkeypatch):
    """reft.py with a NaN put into every PPO gradient: each optimizer step is skipped and counted in skipped_steps,
    the policy stays the warm-up's, and with --max_skipped_steps 2 the second step stops the run with one error
    line (the metrics of the first are written); with 0 the run goes to its end."""
    from safetensors.torch import load_file
    real = reft.policy_loss

    def nan_gradient(*a):  # a NaN loss: every gradient of the PPO update is NaN
        loss, *rest = real(*a)
        return (loss * float("nan"), *rest)

    monkeypatch.setattr(reft, "policy_loss", nan_gradient)
    common = ["--model", warmup, "--data", minigsm, "--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 4,
              "--ppo_epochs", 1, "--max_length", 96, "--eval_every", 0]
    run_main(reft, [*common, "--max_skipped_steps", 0, "--output_dir", tmp_path / "never"])
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "never" / "metrics.jsonl")] == [1, 2]
    final, warm = load_file(tmp_path / "never" / "final" / "model.safetensors"), load_file(warmup / "model.safetensors")
    assert final.keys() == warm.keys() and all(torch.equal(final[k], warm[k]) for k in warm)
    with pytest.raises(SystemExit) as e:
        run_main(reft, [*common, "--max_skipped_steps", 2, "--output_dir", tmp_path / "stops"])
    assert str(e.value).startswith("error: step 2: 2 optimizer steps in a row skipped (--max_skipped_steps 2), 2 in "
                                   "all: the gradient norm is not finite"), str(e.value)
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "stops" / "metrics.jsonl")] == [1]
    assert json.loads((tmp_path / "stops" / "args.json").read_text())["max_skipped_steps"] == 2


NAN_GRADIENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import reft
    real = reft.policy_loss

    def nan_gradient(*a):  # a NaN loss: every gradient of the PPO update is NaN
        loss, *rest = real(*a)
        return (loss * float("nan"), *rest)

    reft.policy_loss = nan_gradient
    reft.main(reft.parse_args(reft.Args, sys.argv[2:]))
""")


def test_every_rank_stops_when_the_gradient_is_never_finite(minigsm, warmup, tmp_path):
    """Under torchrun with 2 processes and a NaN in every PPO gradient, both ranks stop at the same step with the
    error line and a non-zero exit: none is left waiting in a collective for the other."""
    script = tmp_path / "nan_gradient.py"
    script.write_text(NAN_GRADIENT)
    p = torchrun(2, script, ROOT, "--model", warmup, "--data", minigsm, "--max_steps", 3, "--batch_size", 4,
                 "--micro_batch_size", 2, "--ppo_epochs", 1, "--max_length", 96, "--eval_every", 0,
                 "--max_skipped_steps", 2, "--output_dir", tmp_path / "out", check=False, timeout=600)
    assert p.returncode != 0
    # each rank prints it (two processes' stderr may share a line); torchrun then ends the one still exiting
    assert (p.stdout + p.stderr).count("error: step 2: 2 optimizer steps in a row skipped") == 2, p.stderr[-3000:]


@pytest.mark.parametrize("launch", [{}, {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "localhost"}])
@pytest.mark.parametrize("module", [sft, reft, rerank, evaluate])
def test_on_cuda_the_process_group_is_bound_to_the_rank_s_gpu(module, launch, monkeypatch):
    """init_distributed on a machine with GPUs (faked: this one has none), as plain python and as torchrun's rank 1
    on LOCAL_RANK 3: NCCL, and the group bound to cuda:3, so that NCCL and barrier() need not guess the device."""
    seen = {}

    def init_process_group(backend, **kw):
        seen.update(kw, backend=backend)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.update(set_device=device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    for name, value in {"LOCAL_RANK": "3", **launch}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="stop here"):
        module.init_distributed()
    assert seen["backend"] == "nccl" and seen.get("device_id") == seen["set_device"] == torch.device("cuda:3")


@pytest.mark.parametrize("stage", ["sft", "rerank"])
def test_sft_and_the_verifier_stop_at_a_gradient_that_is_not_finite(stage, minigsm, warmup, tmp_path, monkeypatch):
    """sft.py and rerank.py have no step to skip to (AdamW would put NaN into every weight, and the run would go on
    to its end): a NaN loss stops the run at that step with one error line, before it writes a checkpoint."""
    if stage == "sft":
        module, real = sft, sft.token_nll_sum
        monkeypatch.setattr(sft, "token_nll_sum", lambda *a: real(*a) * float("nan"))
        argv = ["--model", warmup, "--max_steps", 2, "--batch_size", 8, "--save_epochs", "none"]
    else:
        module, real = rerank, torch.nn.functional.binary_cross_entropy_with_logits
        monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits",
                            lambda *a, **kw: real(*a, **kw) * float("nan"))
        argv = ["--model", warmup, "--init", warmup, "--limit", 4, "--num_samples", 2, "--max_new_tokens", 16,
                "--gold_samples", "--epochs", 1, "--batch_size", 4, "--micro_batch_size", 4]
    with pytest.raises(SystemExit) as e:
        run_main(module, [*argv, "--data", minigsm, "--output_dir", tmp_path])
    assert str(e.value).startswith("error: step 1: the gradient norm is not finite"), str(e.value)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lora_trains_on_a_bf16_base_as_the_gpu_runs_it(family):
    """--lora_rank on the GPU's path, on CPU: the frozen base stored in bf16 and the fp32 adapters in the same FSDP2
    groups (FSDP2 asks one dtype of a group's trainable parameters only), built as every stage builds a model
    (load_sharded: rank 0's loaded model and the meta one, both through add_lora). A training step moves the adapters
    and leaves every base weight bit for bit and in bf16; generation runs on the gathered model; with the adapters off
    the policy computes exactly as the same bf16 model without LoRA."""
    from transformers import AutoModelForCausalLM
    _, _, device, mesh = sft.init_distributed()
    try:
        def bf16_params(model):  # as add_lora stores a base, without the adapters (buffers stay fp32)
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
            return model

        def make(config):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        full = tiny(family)
        plain = sft.load_sharded(lambda: bf16_params(copy.deepcopy(full)), lambda c: bf16_params(make(c)), mesh,
                                 device)
        base = {k: v.to(torch.bfloat16) for k, v in full.state_dict().items()}
        model = sft.load_sharded(lambda: reft.add_lora(full, 4, 8.0, torch.bfloat16),
                                 lambda config: reft.add_lora(make(config), 4, 8.0, torch.bfloat16), mesh, device)
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
        opt = torch.optim.AdamW(trained, lr=1e-2)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device)
        for _ in range(2):  # the second step moves lora_A too (its gradient is 0 while lora_B is)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
        sd = {k: v.full_tensor() for k, v in model.state_dict().items()}
        assert all(torch.equal(sd[k], v) for k, v in base.items())
        assert all(sd[k].abs().sum() > 0 for k in sd if ".lora_B." in k)
        model.eval(), plain.eval()  # OPT's dropout
        with torch.no_grad():
            with reft.adapters_off(model):
                off = model(input_ids=ids).logits
            on, reference = model(input_ids=ids).logits, plain(input_ids=ids).logits
            assert torch.equal(off, reference) and not torch.equal(on, reference)
            with sft.gathered_for_generation(model):
                model.generate(input_ids=ids, do_sample=False, max_new_tokens=2, pad_token_id=0, eos_token_id=1)
    finally:
        dist.destroy_process_group()
