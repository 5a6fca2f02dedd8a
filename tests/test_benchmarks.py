"""benchmarks/gpu_check.py: its memory arithmetic, and its `--device cpu --small` run, so the prepared GPU check
cannot rot between the rare occasions a GPU is available."""
import json
import math
import sys

import pytest

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


# ----------------------------------------------------------------------------- arithmetic

def linear_record(layers, **coef):
    """A one-GPU phase record whose every figure is a + b · layers (GB)."""
    return {k: a + b * layers for k, (a, b) in coef.items()}


def test_extrapolate_a_training_phase_to_32_layers_and_8_gpus():
    coef = dict(resident_gb=(10, 3), grads_gb=(2, 1), peak_fwd_bwd_gb=(20, 5), peak_opt_gb=(15, 4), peak_gb=(20, 5))
    e = gpu_check.extrapolate({L: linear_record(L, **coef) for L in (2, 4)}, to_layers=32, world=8)
    assert e["peak_per_layer_gb"] == 5 and e["resident_per_layer_gb"] == 3
    assert (e["resident_32L_gb"], e["grads_32L_gb"]) == (106, 34)
    assert (e["peak_fwd_bwd_32L_gb"], e["peak_opt_32L_gb"]) == (180, 143)
    # sharded: (106 + 34) / 8 = 17.5; per GPU: 180 - 106 - 34 = 40 (estimate) or 180 - 106 = 74 (bound)
    assert e["fsdp8_gb"] == pytest.approx(57.5)
    assert e["fsdp8_max_gb"] == pytest.approx(91.5)
    assert e["fsdp8_resident_gb"] == pytest.approx(106 / 8)


def test_extrapolate_a_generation_phase_and_the_optimizer_peak():
    # No gradients: everything above the resident state (gathered policy, KV cache) stays on every GPU.
    e = gpu_check.extrapolate({L: linear_record(L, resident_gb=(4, 2), peak_gb=(10, 3)) for L in (2, 4)})
    assert e["fsdp8_gb"] == e["fsdp8_max_gb"] == pytest.approx(68 / 8 + 38)
    # An optimizer step touches sharded tensors only: its peak divides by N, and wins when it is the larger.
    est, upper = gpu_check.fsdp_estimate(resident=80, grads=20, peak_fwd_bwd=101, peak_opt=400, world=8)
    assert (est, upper) == (50, 50)
    assert gpu_check.extrapolate({2: linear_record(2, resident_gb=(1, 1), peak_gb=(1, 1))}) is None
    assert gpu_check.extrapolate({2: {"resident_gb": None, "peak_gb": 1}, 4: {"resident_gb": 1, "peak_gb": 2}}) is None


def test_summarize_and_report_with_gpu_figures():
    """The GPU-only path of the report (memory, MFU against 989 TFLOP/s, the extrapolation table) on made-up
    figures: the CPU run below has no memory statistics to feed it."""
    phases = [{"phase": "reft_ppo_update", "family": fam, "layers": L, "gc": True, "status": "ok", "seconds": 1.0,
               "tokens_per_s": 2800.0, "mfu_vs_matmul": 0.5, "mfu_vs_989": 0.4,
               **linear_record(L, resident_gb=(10, 3), grads_gb=(2, 1), peak_fwd_bwd_gb=(20, 5),
                               peak_opt_gb=(15, 4), peak_gb=(20, 5))}
              for fam in ("llama", "opt") for L in (2, 4)]
    phases.append({"phase": "reft_rollout", "family": "llama", "layers": 2, "gc": True, "status": "error",
                   "error": "OutOfMemoryError: CUDA out of memory"})
    ext, rollout = gpu_check.summarize(phases)
    readme = gpu_check.README_GB[("reft_ppo_update", True)]
    assert [(e["phase"], e["gc"], e["readme_gb"]) for e in ext] == [("reft_ppo_update", True, readme)]  # Llama only
    assert rollout == []
    text = gpu_check.report({"matmul": {"n": 8192, "dtype": "torch.bfloat16", "flops": 7.9e14}, "phases": phases,
                             "extrapolation": ext})
    assert "790.0 TFLOP/s" in text and "57.50" in text and "91.50" in text and f"{readme:.1f}" in text
    assert "OutOfMemoryError: CUDA out of memory" in text
    assert any(line.startswith("reft_ppo_update") and "40.0" in line and "50.0" in line for line in text.splitlines())


# ----------------------------------------------------------------------------- the CPU run

def check(tmp_path, *flags):
    out = tmp_path / "gpu_check.json"
    p = run([PY, "benchmarks/gpu_check.py", "--device", "cpu", "--small", "--out", out, *flags], check=False,
            timeout=600)
    assert out.is_file(), f"no JSON written (exit {p.returncode})\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    with open(out) as f:
        return p, json.load(f), out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return check(tmp_path_factory.mktemp("gpu_check"))


def phases_of(result, family):
    return {(r["phase"], r["layers"], r["gc"], r["batch"] if r["phase"] == "rollout_compare" else None): r
            for r in result["phases"] if r.get("family") == family}


def test_small_run_measures_every_llama_phase(small_run):
    _, result, out = small_run
    assert result["status"] == "done"
    llama = phases_of(result, "llama")
    expected = {(ph, L, gc, None) for L in (2, 4) for gc in (False, True)
                for ph in ("build_sft", "sft_step", "build_reft", "reft_warmup_iteration", "reft_rollout",
                           "reft_old_ref_forward", "reft_ppo_update")}
    expected |= {(ph, L, False, None) for L in (2, 4) for ph in ("build_eval", "eval_generation")}
    expected |= {("rollout_compare", L, False, b) for L in (2, 4) for b in (2, 4)}
    expected |= {("padded_batch", L, False, None) for L in (2, 4)}
    expected |= {(ph, 2, False, None) for ph in ("checkpoint_round_trip", "resume_round_trip",
                                                 "reft_rollout_compiled")}
    expected |= {(ph, 2, True, None) for ph in ("build_reft_lora", "reft_lora_iteration", "lora_step")}
    assert set(llama) == expected
    bad = {k: r.get("error", r.get("reason")) for k, r in llama.items() if r["status"] != "ok"}
    assert not bad
    assert result["leaks"] == []  # no model outlives its group to inflate the next group's memory
    for L in (2, 4):
        sft = llama[("sft_step", L, False, None)]
        assert abs(sft["loss"] - math.log(512)) < 0.2  # a random-init model over a 512-token vocabulary
        assert sft["tokens_per_s"] > 0 and 0 < sft["mfu_vs_matmul"] < 1
        for gc in (False, True):
            ppo = llama[("reft_ppo_update", L, gc, None)]
            # old log-probs come from the same weights with dropout 0: the first PPO ratio is exactly 1
            assert ppo["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and ppo["approx_kl"] < 1e-10
            assert llama[("reft_rollout", L, gc, None)]["new_tokens"] == 48  # no EOS id: the full response
        for b in (2, 4):
            rc = llama[("rollout_compare", L, False, b)]
            assert all(rc[v]["tokens_per_s"] > 0 and rc[v]["steps"] == 16
                       for v in ("sampler_fsdp", "generate_fsdp", "sampler_plain", "generate_plain",
                                 "sampler_dynamic_plain"))
            assert rc["same_samples_fsdp_vs_plain"]  # same weights and seeds: FSDP must not change the samples
            assert rc["same_samples_kv_cache"] and rc["preallocated_vs_dynamic_plain"] > 0
    compiled = llama[("reft_rollout_compiled", 2, False, None)]  # reft.py --compile's decode step
    assert compiled["new_tokens"] == 48 and compiled["tokens_per_s"] > 0 and compiled["eager_tokens_per_s"] > 0
    assert compiled["compile_s"] > compiled["seconds"]  # the first compiled rollout compiles; the timed one does not
    assert compiled["same_tokens"] == 1.0  # fp32 on the CPU: the compiled kernels draw the eager sampler's tokens
    text = out.with_suffix(".txt").read_text()
    assert "rollout (generated tok/s)" in text and "reft.py --compile (llama, 2 layers)" in text


def test_small_run_checks_padded_batches_and_both_round_trips(small_run):
    """The real path's checks, each with its verdict: prompts of different lengths left-padded, through the policy,
    the reference, generate and reft.sample, equal to the rows run alone (fp32: to 1e-4, the same greedy tokens); the
    HF checkpoint written by save_checkpoint and read by load_sharded; the resume state through DCP, read back over
    changed weights and optimizer state."""
    p, result, out = small_run
    assert p.returncode == 0
    assert result["verdicts"] == {"same_samples_fsdp_vs_plain": {"verdict": "pass", "runs": 4},
                                  "same_samples_kv_cache": {"verdict": "pass", "runs": 4},
                                  "padded_batch": {"verdict": "pass", "runs": 4},
                                  "checkpoint_round_trip": {"verdict": "pass", "runs": 2},
                                  "resume_round_trip": {"verdict": "pass", "runs": 2},
                                  "lora_step": {"verdict": "pass", "runs": 1}}
    for family in ("llama", "opt"):
        ph = phases_of(result, family)
        for L in (2, 4):
            pad = ph[("padded_batch", L, False, None)]
            assert pad["finite"] and pad["tolerance"] == 1e-4 and len(set(pad["prompt_lengths"])) == 3
            assert max(pad[f"max_diff_{k}"] for k in ("logprobs", "values", "ref_logprobs", "generate_logits")) < 1e-4
            assert pad["sampler_same_greedy_rows"] == 3
        ckpt, resume = ph[("checkpoint_round_trip", 2, False, None)], ph[("resume_round_trip", 2, False, None)]
        assert ckpt["save_s"] > 0 and ckpt["load_s"] > 0 and ckpt["checkpoint_gb"] > 0 and ckpt["tensors"] > 10
        assert resume["save_s"] > 0 and resume["load_s"] > 0 and resume["changed_before_load"] == resume["tensors"]
    text = out.with_suffix(".txt").read_text()
    assert all(f"{name:<28}pass" in text for name in gpu_check.CHECKS)


def test_small_run_measures_every_opt_phase(small_run):
    _, result, _ = small_run
    opt = phases_of(result, "opt")
    assert opt and all(r["status"] == "ok" for r in opt.values()), \
        {k: r.get("error", r.get("reason")) for k, r in opt.items() if r["status"] != "ok"}


def test_a_failing_phase_is_recorded_and_the_others_still_run(tmp_path):
    p, result, _ = check(tmp_path, "--families", "llama", "--layers", "2", "--fail_phase", "reft_rollout")
    assert p.returncode == 1
    ph = {(r["phase"], r["gc"]): r for r in result["phases"] if r["phase"] not in ("matmul", "rollout_compare")}
    assert ph[("reft_rollout", False)]["status"] == "error"
    assert "--fail_phase reft_rollout" in ph[("reft_rollout", False)]["error"]
    assert ph[("reft_old_ref_forward", False)]["status"] == "skipped"
    assert ph[("reft_ppo_update", False)]["status"] == "skipped"
    assert ph[("reft_rollout_compiled", False)]["status"] == "skipped"  # needs the eager rollout
    assert ph[("eval_generation", False)]["status"] == "ok"  # after the failure
    assert ph[("sft_step", True)]["status"] == "ok"
    assert result["status"] == "done"
    assert {name: v["verdict"] for name, v in result["verdicts"].items()} == dict.fromkeys(gpu_check.CHECKS, "pass")


def test_a_failing_check_is_a_fail_verdict_and_a_failed_run(tmp_path):
    p, result, _ = check(tmp_path, "--families", "opt", "--layers", "2", "--fail_phase", "checkpoint_round_trip")
    assert p.returncode == 1
    assert result["verdicts"]["checkpoint_round_trip"] == {
        "verdict": "fail", "reason": "family=opt layers=2: RuntimeError: --fail_phase checkpoint_round_trip"}
    assert result["verdicts"]["resume_round_trip"]["verdict"] == "pass"
    assert result["verdicts"]["same_samples_fsdp_vs_plain"]["verdict"] == "skipped"  # Llama only


def test_spent_budget_skips_everything_and_still_writes_the_json(tmp_path):
    p, result, _ = check(tmp_path, "--families", "llama", "--layers", "2", "--budget_s", "0")
    assert p.returncode == 0
    assert result["phases"] and all(r["status"] == "skipped" for r in result["phases"])
    assert all("budget" in r["reason"] for r in result["phases"] if r["phase"] in ("matmul", "build_sft"))
    assert {name: v["verdict"] for name, v in result["verdicts"].items()} == dict.fromkeys(gpu_check.CHECKS, "skipped")
    assert all(v["reason"] == "needs build_reft, which did not run" for k, v in result["verdicts"].items()
               if k != "lora_step")
    assert result["verdicts"]["lora_step"]["reason"] == "needs reft_lora_iteration, which did not run"


def test_small_run_steps_reft_s_lora_policy(small_run):
    """reft.py --lora_rank 16 on the CPU path (fp32): the reference (adapters off) is the model built without LoRA
    exactly, before and after the PPO step; the policy's log-probs are the reference's before it (lora_B is zero: the
    first ratio 1, KL 0) and not after; one of 11 parameters of a layer's Linear trains (the adapters, the value head)."""
    _, result, out = small_run
    ph = phases_of(result, "llama")
    build, it, step = (ph[(name, 2, True, None)] for name in ("build_reft_lora", "reft_lora_iteration", "lora_step"))
    assert build["frozen_dtypes"] == ["torch.float32"] and 0 < build["trained"] < build["params"] / 3
    assert it["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and it["kl_mean"] == 0.0 and it["grad_norm"] > 0
    assert it["seconds"] == pytest.approx(it["rollout_s"] + it["old_ref_forward_s"] + it["ppo_s"])
    assert step["lora_B"] == 14 and step["frozen"] == 21  # 7 projections × 2 layers; the base's every tensor
    assert step["max_diff_ref_vs_plain_before"] == step["max_diff_ref_vs_plain_after"] == 0.0
    assert step["max_diff_policy_vs_ref_before"] == 0.0 and step["max_diff_policy_vs_ref_after"] > 1e-3
    assert "LoRA rank 16 (llama, 2 layers, gc on): resident" in out.with_suffix(".txt").read_text()


def test_the_lora_check_fails_a_reference_with_adapters_and_a_base_that_trains(tmp_path):
    """lora_step fails when the reference is the policy with its adapters on (adapters_off a no-op), and when add_lora
    leaves the base trainable, so that the step moves it."""
    import contextlib
    from unittest import mock

    import reft
    c = gpu_check.Check(gpu_check.parse_args(["--device", "cpu", "--small", "--out", str(tmp_path / "x.json")]))
    c.setup()
    c.cfg_vocab = gpu_check.model_config("llama", 2, small=True).vocab_size
    add_lora = reft.add_lora

    def unfrozen(model, *args):
        return add_lora(model, *args).requires_grad_(True)
    for patch in (mock.patch.object(reft, "adapters_off", lambda model: contextlib.nullcontext()),
                  mock.patch.object(reft, "add_lora", unfrozen)):
        with patch:
            c.lora_group("llama", 2)
    first, second = [r for r in c.result["phases"] if r["phase"] == "lora_step"]
    assert not first["pass"] and first["max_diff_policy_vs_ref_after"] == 0.0
    assert first["max_diff_ref_vs_plain_after"] > 1e-4 and "frozen parameters changed []" in first["reason"]
    assert not second["pass"] and "frozen parameters changed ['lm.model.embed_tokens.weight'" in second["reason"]
    assert gpu_check.verdicts(c.result["phases"])["lora_step"]["verdict"] == "fail"


# ----------------------------------------------------------------------------- the plain copy and the verdicts

def test_the_plain_copy_computes_as_the_sharded_model():
    """rollout_compare's plain copy (fsdp_like_copy) and the model sharded as the stages shard it, both computing in
    bf16 (FSDP2 casts the same way on a CPU): the same fp32 logits, bit for bit. The former copy, every parameter
    cast to bf16 (params_to), had a bf16 LM head and other logits: at 7B width 0.23% of its Gumbel-max draws differed
    from the sharded policy's, a false failure of same_samples_fsdp_vs_plain."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    import reft
    _, _, _, mesh = reft.init_distributed()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(gpu_check.model_config("llama", 2, small=True)).eval()
    sharded = reft.shard(copy.deepcopy(lm), mesh, torch.bfloat16)
    plain = gpu_check.fsdp_like_copy(lm, torch.bfloat16, reft)
    all_bf16 = gpu_check.params_to(copy.deepcopy(lm), torch.bfloat16)
    ids = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        want = sharded(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        before = all_bf16(input_ids=ids).logits
    assert want.dtype == got.dtype == torch.float32 and torch.equal(got, want)
    assert plain.lm_head.weight.dtype == torch.float32 and plain.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert not torch.equal(before.float(), want)


def test_verdicts_name_each_failure_and_each_skip():
    ok = {"status": "ok", "pass": True}
    phases = [{"phase": "rollout_compare", "family": "llama", "layers": 2, "batch": 4, "status": "ok",
               "same_samples_fsdp_vs_plain": True, "same_samples_kv_cache": False,
               "same_samples_kv_cache_reason": "teacher-forced log-probs differ by up to 2.5"},
              {"phase": "rollout_compare", "family": "llama", "layers": 2, "batch": 32, "status": "ok",
               "same_samples_fsdp_vs_plain": False, "same_samples_kv_cache": True,
               "same_samples_fsdp_vs_plain_reason": "teacher-forced log-probs differ by up to 0.7"},
              {"phase": "padded_batch", "family": "llama", "layers": 2, **ok},
              {"phase": "padded_batch", "family": "opt", "layers": 2, "status": "ok", "pass": False,
               "reason": "finite False"},
              {"phase": "checkpoint_round_trip", "family": "llama", "layers": 2, **ok},
              {"phase": "checkpoint_round_trip", "family": "opt", "layers": 2, "status": "error",
               "error": "OSError: disk full"},
              {"phase": "resume_round_trip", "family": "llama", "layers": 2, "status": "skipped",
               "reason": "budget of 330 s spent"}]
    v = gpu_check.verdicts(phases)
    assert v["same_samples_fsdp_vs_plain"]["verdict"] == "fail"
    assert v["same_samples_fsdp_vs_plain"]["reason"] == ("family=llama layers=2 batch=32: teacher-forced log-probs "
                                                         "differ by up to 0.7")
    assert v["same_samples_kv_cache"] == {"verdict": "fail",
                                          "reason": "family=llama layers=2 batch=4: teacher-forced log-probs differ by "
                                                    "up to 2.5"}
    assert v["padded_batch"] == {"verdict": "fail", "reason": "family=opt layers=2: finite False"}
    assert v["checkpoint_round_trip"] == {"verdict": "fail", "reason": "family=opt layers=2: OSError: disk full"}
    assert v["resume_round_trip"] == {"verdict": "skipped", "reason": "budget of 330 s spent"}
    v = gpu_check.verdicts([r for r in phases if r["phase"] == "padded_batch"][:1])
    assert v["padded_batch"] == {"verdict": "pass", "runs": 1} and v["resume_round_trip"]["verdict"] == "skipped"


def test_the_sample_checks_catch_a_wrong_cache_slot_and_a_perturbed_block(tmp_path):
    """rollout_compare's same_samples checks compare teacher-forced log-probs, not tokens (a bf16 draw near a CDF
    boundary flips on any kernel's rounding): they still fail on a KV cache that writes a token over the previous
    one, and on a plain copy one of whose blocks differs from the sharded policy's."""
    from unittest import mock

    import torch

    import reft
    c = gpu_check.Check(gpu_check.parse_args(["--device", "cpu", "--small", "--out", str(tmp_path / "x.json")]))
    c.setup()
    c.cfg_vocab = gpu_check.model_config("llama", 2, small=True).vocab_size
    lm = c.build_lm("llama", 2)
    state = {"plain": gpu_check.fsdp_like_copy(lm, c.compute_dtype, reft).eval()}
    with torch.device(c.device):
        state["policy"] = reft.shard(reft.PolicyWithValueHead(lm), c.mesh, c.compute_dtype)
    ids, attn = c.tokens(1, 8)
    with torch.no_grad():  # FSDP2 picks its root at the first forward (as reft_group's build)
        state["policy"](torch.cat([ids, ids[:, :1]], 1), torch.cat([attn, attn[:, :1]], 1), 8)
    rec = c.rollout_compare(state, 2)
    assert rec["same_samples_fsdp_vs_plain"] and rec["same_samples_kv_cache"]
    assert rec["max_diff_logprobs_kv_cache"] <= 1e-4 and rec["same_tokens_fsdp_vs_plain"] == 1.0

    class WrongSlot(reft.RolloutCacheLayer):  # each decoded token's keys and values over the previous token's too
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            if key_states.size(-2) == 1:
                keys[:, :, -2], values[:, :, -2] = keys[:, :, -1], values[:, :, -1]
            return keys, values
    with mock.patch.object(reft, "RolloutCacheLayer", WrongSlot):
        rec = c.rollout_compare(state, 2)
    assert not rec["same_samples_kv_cache"] and "teacher-forced log-probs differ" in rec["same_samples_kv_cache_reason"]

    with torch.no_grad():
        state["plain"].model.layers[1].mlp.down_proj.weight.mul_(1.1)
    rec = c.rollout_compare(state, 2)
    assert not rec["same_samples_fsdp_vs_plain"] and rec["same_samples_kv_cache"]
    v = gpu_check.verdicts([{"phase": "rollout_compare", "family": "llama", "layers": 2, "status": "ok", **rec}])
    assert v["same_samples_fsdp_vs_plain"]["verdict"] == "fail"
    assert "teacher-forced log-probs differ by up to" in v["same_samples_fsdp_vs_plain"]["reason"]


def test_a_saved_checkpoint_keeps_the_rope_base(tmp_path):
    """checkpoint_round_trip allows buffers a few ulps (CUDA's pow against the CPU's, where load_sharded computes
    them): a checkpoint that lost CodeLlama's rope_theta of 1e6 would give other rotary frequencies. On one device
    they are equal exactly, and the saved config keeps the base."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import reft
    import sft
    rank, _, device, mesh = reft.init_distributed()
    cfg = gpu_check.model_config("llama", 2, small=True)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    policy = reft.shard(reft.PolicyWithValueHead(LlamaForCausalLM(cfg)), mesh, torch.float32)
    folder = str(tmp_path)
    path = os.path.join(folder, "final")
    reft.save_checkpoint(policy, sft.train_tiny_tokenizer(["a b c"], 300), reft.Args(output_dir=folder), path, rank,
                         torch.float32)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["rope_parameters"]["rope_theta"] == 1e6
    loaded = reft.load_sharded(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                               lambda config: AutoModelForCausalLM.from_config(config, dtype=torch.float32), mesh,
                               device)
    want = dict(policy.lm.named_buffers())
    assert all(torch.equal(b, want[n]) for n, b in loaded.named_buffers())


# ----------------------------------------------------------------------------- lora_memory.py

def test_lora_memory_builds_a_checkpoint_reft_accepts_and_reports_reft_s_own_estimate(warmup, tmp_path):
    """benchmarks/lora_memory.py at toy size: the random Llama has the parameters its sizes give (untied head), the
    tokenizer's vocabulary and a pad token distinct from EOS (reft.py's load_tokenizer accepts it); reft_estimate's
    phases are what reft.py's memory_error checks (its peak fits a device of that size, not one a byte smaller), and
    LoRA shrinks the fp32 estimate on the CPU."""
    import lora_memory
    from transformers import AutoConfig, AutoTokenizer

    import reft
    h, layers, inter = 64, 2, 96
    n = lora_memory.build_checkpoint(tmp_path / "model", warmup, h, layers, inter, 4)
    vocab = len(AutoTokenizer.from_pretrained(warmup))
    assert n == 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert (config.vocab_size, reft.config_params(config)) == (vocab, n)
    args = reft.Args(**lora_memory.run_flags(tmp_path / "model", tmp_path / "out", 64, 0))
    tok = reft.load_tokenizer(args)
    assert tok.pad_token_id == config.pad_token_id != config.eos_token_id
    peaks = {}
    for rank in (0, 16):
        args = reft.Args(**lora_memory.run_flags(tmp_path / "model", tmp_path / "out", 64, rank))
        phases = lora_memory.reft_estimate(args, n, config)
        peaks[rank] = max(phases.values())
        assert reft.memory_error(args, n, config, 1, False, peaks[rank]) is None
        assert reft.memory_error(args, n, config, 1, False, peaks[rank] - 1) is not None
    assert peaks[16] < peaks[0]


def test_lora_memory_separates_the_loading_peak_from_the_step_s():
    """peak_rss: a child that holds 300 MB, frees it, prints the mark and then holds 60 MB: the peak before the mark
    has the 300 MB, the one after it the 60 MB but not the 300 MB, nor this process's 400 MB (a child's ru_maxrss
    starts from its parent's peak: read that way, the last part measured this test's process)."""
    import lora_memory
    ballast = bytearray(400_000_000)  # this process's peak, which the child's must not inherit
    child = ("import time; a = bytearray(300_000_000); del a; print('ppo: loaded', flush=True); time.sleep(0.5); "
             "b = bytearray(60_000_000); time.sleep(1)")
    loading, step = lora_memory.peak_rss([PY, "-c", child], 1, ("ppo:",))
    del ballast
    assert loading > 300e6 and 60e6 < step < 300e6, (loading, step)


# ----------------------------------------------------------------------------- kv_cache_bytes.py

def test_kv_cache_bytes_arithmetic_is_docs_performance_s():
    """At 7B width, batch 64, 1,000 cached tokens, bf16: docs/performance.md's 0.4 GB of weights, 1.05 GB of K and V,
    2.1 GB for the cat, 3.55 GB against 1.45 GB per layer per decoded token."""
    import kv_cache_bytes
    a = kv_cache_bytes.arithmetic(4096, 32, 11008, 64, 1000, 2)
    assert [round(a[k] / 1e9, 2) for k in ("weights_bytes", "cache_bytes", "cat_bytes", "dynamic_bytes",
                                           "preallocated_bytes")] == [0.4, 1.05, 2.1, 3.55, 1.45]


def test_kv_cache_bytes_measures_both_caches_at_toy_size(tmp_path):
    """benchmarks/kv_cache_bytes.py at toy size: every figure is there; the arithmetic's weights are the layer's
    parameters, its cache the (B, H, n, D) K and V, DynamicLayer's extra bytes twice that; the profiler sees
    DynamicLayer's cat allocate a cache one token longer than the preallocated step's cats do."""
    out = tmp_path / "kv.json"
    h, heads, inter, B, n = 128, 4, 344, 3, 40
    run([PY, "benchmarks/kv_cache_bytes.py", "--hidden", h, "--heads", heads, "--intermediate", inter, "--batch", B,
         "--cached", n, "--copy_mb", 8, "--repeats", 2, "--threads", 1, "--json", out], timeout=300)
    with open(out) as f:
        r = json.load(f)
    assert r["weights_bytes"] == r["layer_param_bytes"]
    assert r["cache_bytes"] == 2 * B * heads * n * (h // heads) * 2  # K and V, bf16
    assert r["cat_bytes"] == 2 * r["cache_bytes"] == r["dynamic_bytes"] - r["preallocated_bytes"]
    assert r["preallocated_bytes"] == r["weights_bytes"] + r["cache_bytes"]
    assert r["profiled_cat_alloc_extra_bytes"] == r["cache_bytes"] * (n + 1) // n
    assert len(r["dynamic_all"]) == len(r["preallocated_all"]) == len(r["cat_all"]) == 2
    assert all(r[k] > 0 for k in ("dynamic_s", "preallocated_s", "cat_s", "copy_gbps", "fresh_copy_gbps",
                                  "peak_rss_gb"))
    assert r["extra_bytes_measured"] == pytest.approx(r["extra_s"] * r["copy_gbps"] * 1e9)
