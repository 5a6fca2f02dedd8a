"""Memory before loading: each stage estimates its peak memory per device from the model's config (memory_estimate,
docs/scaling.md's arithmetic) and, on CUDA, stops with one error line before anything loads when it does not fit.
The comparison takes the device's size, so it is tested here on a CPU with made-up devices."""
import dataclasses

import pytest
from transformers import LlamaConfig

import evaluate
import reft
import rerank
import sft
from conftest import main_error

GB = 1e9
CODELLAMA = LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                        intermediate_size=11008, vocab_size=32016, tie_word_embeddings=False)
P = 6_738_546_688  # CodeLlama-7B's parameters (scripts/quickstart.py's KNOWN_MODELS)
L, H, V, HEAD = 32, 4096, 32016, 32016 * 4096
KV = 2 * L * H * 2  # bf16 K and V per token


def paper(cls, **flags):
    """The paper's flags for a stage (docs/scaling.md's commands)."""
    return dataclasses.replace(cls(), **flags)


REFT = paper(reft.Args, batch_size=32, num_samples=1, micro_batch_size=4, max_length=700, eval_every=230,
             eval_batch_size=64, gradient_checkpointing=True)
SFT = paper(sft.Args, micro_batch_size=6, max_length=1024, gradient_checkpointing=True, eval_batch_size=64,
            max_new_tokens=700)
EVAL = paper(evaluate.Args, batch_size=64, max_new_tokens=700)


def test_the_parameter_count_comes_from_the_config():
    assert reft.config_params(CODELLAMA) == P


def test_7b_reft_is_refused_on_one_80gb_gpu_and_accepted_on_eight():
    """docs/scaling.md's table written out: on 8 GPUs the PPO update holds 20 P / N (policy, gradients, AdamW, the
    reference) + two bf16 blocks, one fp32 block gradient, the fp32 LM head, 3 fp32 logits copies and the activations
    with checkpointing; the greedy evaluation 16 P / N (no gradients) + the gathered policy + 64 sequences' KV cache.
    On 1 GPU the 135 GB of state alone is too much; 4 processes are the fewest doublings that fit."""
    tokens = 4 * 700
    training = 20 * P / 8 + 2 * 2 * P / L + 4 * P / L + 4 * HEAD + 3 * 4 * tokens * V + L * tokens * H * 2 \
        + 34 * tokens * H
    generation = 16 * P / 8 + 2 * (P - HEAD) + 4 * HEAD + 64 * 700 * KV
    est = reft.memory_estimate(P, CODELLAMA, 8, True, 16, 4, tokens, True, 64 * 700)
    assert est == {"training": pytest.approx(training), "generation": pytest.approx(generation)}
    assert (round(training / GB, 1), round(generation / GB, 1)) == (21.3, 50.7)
    assert reft.memory_error(REFT, P, CODELLAMA, 8, True, 80 * GB) is None
    error = reft.memory_error(REFT, P, CODELLAMA, 1, True, 80 * GB)
    one = 20 * P + 2 * 2 * P / L + 4 * P / L + 4 * HEAD + 3 * 4 * tokens * V + L * tokens * H * 2 + 34 * tokens * H
    assert one > 16 * P + 2 * (P - HEAD) + 4 * HEAD + 32 * 700 * KV  # one GPU: the rollout holds all 32 sequences
    assert error == (f"error: the estimated peak memory is {max(one, 16 * P + 2 * (P - HEAD) + 4 * HEAD + 64 * 700 * KV) / GB:.3g} GB per device "
                     f"on 1 process(es) (docs/scaling.md), more than this device's 80 GB; would fit: 4 processes")


def test_7b_reft_with_lora_fits_one_80gb_gpu():
    """--lora_rank 16 on one GPU, written out: T = 16 × 32 layers × (in + out of q, k, v, o, gate, up, down) adapter
    parameters; the frozen warm-up in bf16 (2 P), no reference, fp32 adapters with AdamW (12 T) and gradients (4 T).
    The greedy evaluation (the gathered policy and 64 sequences' KV cache) is the peak, 51.2 GB, then the rollout (32
    sequences), 39.4 GB, then the PPO update, 18.5 GB; rank 64 adds 1.4 GB; on a 48 GB GPU, 2 processes or an evaluation
    batch of 55."""
    T = 16 * 32 * (4 * 2 * H + 3 * (H + 11008))
    assert reft.lora_params(CODELLAMA, 16) == T == 39_976_960
    tokens = 4 * 700
    training = 2 * P + 16 * T + 2 * 2 * P / L + 4 * P / L + 4 * HEAD + 3 * 4 * tokens * V + L * tokens * H * 2 \
        + 34 * tokens * H
    generation = 2 * P + 12 * T + 2 * (P - HEAD) + 4 * HEAD + 64 * 700 * KV
    lora = dataclasses.replace(REFT, lora_rank=16)

    def peak_is(args, need):  # to within a kilobyte: the bytes per parameter are fractions of T / P
        return reft.memory_error(args, P, CODELLAMA, 1, True, need + 1e3) is None and \
            reft.memory_error(args, P, CODELLAMA, 1, True, need - 1e3) is not None
    assert peak_is(lora, generation)
    assert reft.memory_error(lora, P, CODELLAMA, 1, True, 80 * GB) is None
    assert reft.memory_error(lora, P, CODELLAMA, 1, True, 50 * GB).startswith(
        f"error: the estimated peak memory is {generation / GB:.3g} GB per device on 1 process(es)")
    assert reft.memory_estimate(P, CODELLAMA, 1, True, 2 + 12 * T / P, 4 * T / P, tokens, True, 0)["training"] \
        == pytest.approx(training)
    rollout = generation - 32 * 700 * KV  # without the evaluation: the rollout's 32 sequences
    assert peak_is(dataclasses.replace(lora, eval_every=0), rollout)
    assert [round(b / GB, 1) for b in (training, rollout, generation)] == [18.5, 39.4, 51.2]
    assert peak_is(dataclasses.replace(lora, lora_rank=64), generation + 12 * 3 * T)  # T grows with the rank
    batch = max(b for b in range(1, 64) if generation - (64 - b) * 700 * KV <= 48 * GB)
    two = (2 * P + 12 * T) / 2 + 2 * (P - HEAD) + 4 * HEAD + 64 * 700 * KV  # 2 processes: the state halved
    assert batch == 55 and two <= 48 * GB
    assert reft.memory_error(lora, P, CODELLAMA, 1, True, 48 * GB).endswith(
        f"would fit: 2 processes or --eval_batch_size {batch}")


def test_each_remedy_is_named_when_it_alone_fits():
    """ReFT without the periodic evaluation and without gradient checkpointing on 8 × 30 GB: the PPO update's
    activations (12.5 GB) are what does not fit; each of the three changes alone brings it under 30 GB."""
    args = dataclasses.replace(REFT, eval_every=0, gradient_checkpointing=False)
    error = reft.memory_error(args, P, CODELLAMA, 8, True, 30 * GB)
    assert error.endswith("would fit: 16 processes or --gradient_checkpointing or --micro_batch_size 3")
    assert reft.memory_error(dataclasses.replace(args, micro_batch_size=3), P, CODELLAMA, 8, True, 30 * GB) is None
    # the evaluation's KV cache is too large for 30 GB however it is trained; a smaller evaluation batch fits
    error = reft.memory_error(REFT, P, CODELLAMA, 8, True, 30 * GB)
    fits = max(b for b in range(1, 64) if 16 * P / 8 + 2 * (P - HEAD) + 4 * HEAD + b * 700 * KV <= 30 * GB)
    assert fits == 7 and error.endswith(f"would fit: --eval_batch_size {fits}"), error
    assert "no single change fits" in reft.memory_error(REFT, P, CODELLAMA, 1, True, 20 * GB)


def test_7b_sft_is_refused_on_one_80gb_gpu_and_accepted_on_eight():
    """16 bytes per parameter (fp32 weights, gradients, AdamW's two moments): 108 GB on one GPU before any
    activation. On 2 GPUs the per-epoch greedy evaluation does not fit either: 12 P / 2 without gradients, the
    gathered policy and the KV cache of 64 sequences of 200 + 700 tokens."""
    assert sft.memory_error(SFT, P, CODELLAMA, 8, True, 80 * GB, 200) is None
    error = sft.memory_error(SFT, P, CODELLAMA, 1, True, 80 * GB, 200)
    assert error.startswith("error: the estimated peak memory is ") and "more than this device's 80 GB" in error
    assert float(error.split("memory is ")[1].split(" GB")[0]) > 16 * P / GB
    assert 12 * P / 2 + 2 * (P - HEAD) + 4 * HEAD + 64 * 900 * KV > 80 * GB
    assert error.endswith("would fit: 4 processes")


def test_evaluate_fits_one_80gb_gpu_and_names_the_batch_that_fits_a_smaller_one():
    """evaluate.py on one GPU: the fp32 policy (27 GB), its bf16 copy gathered for generation (13.7 GB) and the KV
    cache of 64 sequences of 300 + 700 tokens (33.6 GB) ≈ 74 GB. On a 48 GB GPU 13 sequences fit; more processes
    shrink only the fp32 shard (each holds the gathered copy and its KV cache), so it takes 64 of them."""
    peak = 4 * P + 2 * (P - HEAD) + 4 * HEAD + 64 * 1000 * KV
    assert round(peak / GB, 1) == 74.2
    assert evaluate.memory_error(EVAL, P, CODELLAMA, 1, True, 80 * GB, 300) is None
    error = evaluate.memory_error(EVAL, P, CODELLAMA, 1, True, 48 * GB, 300)
    assert error == (f"error: the estimated peak memory is {peak / GB:.3g} GB per device on 1 process(es) "
                     f"(docs/scaling.md), more than this device's 48 GB; would fit: 64 processes or --batch_size 13")
    gathered = 2 * (P - HEAD) + 4 * HEAD + 64 * 1000 * KV
    assert 4 * P / 64 + gathered <= 48 * GB < 4 * P / 32 + gathered
    assert 4 * P + 2 * (P - HEAD) + 4 * HEAD + 13 * 1000 * KV <= 48 * GB < 4 * P + 2 * (P - HEAD) + 4 * HEAD \
        + 14 * 1000 * KV


def test_rerank_takes_the_larger_of_sampling_and_training():
    args = paper(rerank.Args, num_samples=100, gen_batch_size=64, max_new_tokens=700, batch_size=48,
                 micro_batch_size=6, max_length=700)
    sampling = 4 * P + 2 * (P - HEAD) + 4 * HEAD + 64 * 1000 * KV
    assert rerank.memory_error(args, P, CODELLAMA, 8, True, 80 * GB, 300) is None
    error = rerank.memory_error(args, P, CODELLAMA, 1, True, 80 * GB, None)  # --samples given: training only
    assert float(error.split("memory is ")[1].split(" GB")[0]) > 16 * P / GB > sampling / GB
    assert "--gradient_checkpointing" not in error  # rerank.py has no such flag


@pytest.mark.parametrize("stage", ["sft", "reft", "rerank", "evaluate"])
def test_each_stage_stops_before_loading_when_the_device_is_too_small(stage, warmup, minigsm, tmp_path,
                                                                       monkeypatch):
    """Through main(), with the device's memory injected (a CPU reports none, so the check does not run there):
    one error line with the estimate and the device's size, and nothing written."""
    module = {"sft": sft, "reft": reft, "rerank": rerank, "evaluate": evaluate}[stage]
    monkeypatch.setattr(module, "device_memory", lambda device: 1e6)
    out = tmp_path / "out"
    argv = {"sft": ["--model", warmup, "--max_steps", 1],
            "reft": ["--model", warmup, "--max_steps", 1],
            "rerank": ["--model", warmup, "--num_samples", 2, "--limit", 4],
            "evaluate": ["--model", warmup, "--mode", "greedy"]}[stage]
    error = main_error(module, [*argv, "--data", minigsm, "--output_dir", out])
    assert error.startswith("error: the estimated peak memory is ") and "more than this device's 0.001 GB" in error
    assert "\n" not in error and not out.exists()
