"""Mutation testing: plant deliberate bugs, one at a time, in a temporary copy of the repository and run the tests
that should catch each. A mutant is killed when those tests fail; one that survives names a test that does not
bite. Every mutant here must be killed.

    .venv/bin/python tests/mutants.py                          # all of them (about 15 minutes on 2 cores)
    .venv/bin/python tests/mutants.py sampler_ignores_temperature verifier_scores_shifted   # some of them
    .venv/bin/python tests/mutants.py --list

First the selected tests run on the unmutated copy (they must pass there, or a "kill" would mean nothing); that
run also makes the tiny warm-up checkpoint once (REFT_TEST_CACHE) for every later session. Not part of CI: pytest
does not collect this file (its name does not start with test_), and it reruns test subsets once per mutant.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, text to replace (exactly once in the file), replacement, the tests that must catch it)
MUTANTS = [
    # --- the PPO math
    ("gae_without_lambda", "reft.py",
     "next_adv = (delta + gamma * lam * next_adv) * mask[:, t]", "next_adv = (delta + gamma * next_adv) * mask[:, t]",
     ["tests/test_reft.py::test_gae_matches_a_python_loop"]),
    ("policy_loss_takes_the_min", "reft.py",
     "losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(",
     "losses = torch.min(-advantages * ratio, -advantages * ratio.clamp(",
     ["tests/test_reft.py::test_policy_loss_by_hand"]),
    ("kl_with_the_wrong_sign", "reft.py",
     "else (logprobs - ref_logprobs) * mask", "else (ref_logprobs - logprobs) * mask",
     ["tests/test_reft.py::test_kl_shaping_penalises_every_token_and_scores_the_last_one"]),
    ("value_loss_unclipped", "reft.py",
     "losses = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)",
     "losses = 0.5 * (values - returns) ** 2",
     ["tests/test_reft.py::test_value_loss_by_hand"]),
    ("whiten_counts_padding", "reft.py",
     "stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()",
     "stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), torch.ones_like(mask).sum()]).double()",
     ["tests/test_reft.py::test_masked_whiten_uses_valid_tokens_only"]),
    ("dropout_left_on", "reft.py", "            setattr(config, k, 0.0)", "            setattr(config, k, v)",
     ["tests/test_scale.py::test_llama_with_attention_dropout_has_ratio_one"]),
    ("reference_is_the_policy", "reft.py", "return tok, policy, reference.requires_grad_(False).eval()",
     "return tok, policy, policy",
     ["tests/test_reft.py::test_first_step_has_ratio_one_and_zero_kl"]),
    # --- the critic-free variants
    ("grpo_without_eps", "reft.py", "return (centred / (std + eps))[:, None] * mask",
     "return (centred / std)[:, None] * mask", ["tests/test_reft_variants.py::test_grpo_matches_a_python_loop"]),
    ("kl_in_loss_with_the_wrong_sign", "reft.py", "loss = loss + beta * kl_loss", "loss = loss - beta * kl_loss",
     ["tests/test_reft_variants.py::test_kl_in_loss_pulls_the_policy_towards_the_reference"]),
    # --- issue 28: the loss aggregations, DAPO's and Dr. GRPO's recipes
    ("token_mean_per_micro_batch", "reft.py",
     '                logits, values = model(rollout.input_ids[idx], rollout.attn[idx], rollout.P)',
     '                aggregation["n_tokens"] = mask.sum() * mini / len(idx)\n'
     '                logits, values = model(rollout.input_ids[idx], rollout.attn[idx], rollout.P)',
     ["tests/test_reft_variants.py::test_aggregations_give_one_gradient_for_any_micro_batches_and_processes"]),
    ("token_mean_per_rank", "reft.py",
     'global_sums([rollout.mask[torch.cat(micro_batches)].sum()], device)[0]',
     'rollout.mask[torch.cat(micro_batches)].sum().item() * world',
     ["tests/test_reft_variants.py::test_aggregations_give_one_gradient_for_any_micro_batches_and_processes"]),
    ("value_loss_always_seq_mean", "reft.py",
     "args.clip_range_value, aggregation)",
     "args.clip_range_value)",
     ["tests/test_reft_variants.py::test_aggregations_give_one_gradient_for_any_micro_batches_and_processes"]),
    ("kl_in_loss_always_seq_mean", "reft.py",
     'kl_loss = aggregate_loss(k3_kl(logprobs, forwards.ref_logprobs[idx]), mask, **aggregation)',
     'kl_loss = masked_mean(k3_kl(logprobs, forwards.ref_logprobs[idx]), mask, 1)',
     ["tests/test_reft_variants.py::test_aggregations_give_one_gradient_for_any_micro_batches_and_processes"]),
    ("token_sum_norm_by_the_longest_response", "reft.py", "else 1 / max_length)", "else 1 / mask.sum(1).max())",
     ["tests/test_reft_variants.py::test_loss_aggregation_matches_a_python_loop"]),
    ("loss_aggregation_ignored", "reft.py", "aggregation = dict(how=args.loss_aggregation,",
     'aggregation = dict(how="seq_mean",',
     ["tests/test_reft_variants.py::test_policy_loss_gets_clip_range_high_and_the_aggregation"]),
    ("clip_higher_clips_at_clip_range", "reft.py", "ratio.clamp(1 - clip_range, 1 + clip_range_high))",
     "ratio.clamp(1 - clip_range, 1 + clip_range))",
     ["tests/test_reft_variants.py::test_clip_range_high_matches_a_python_loop"]),
    ("clip_range_high_ignored", "reft.py",
     "clip_range_high = args.clip_range if args.clip_range_high < 0 else args.clip_range_high",
     "clip_range_high = args.clip_range",
     ["tests/test_reft_variants.py::test_policy_loss_gets_clip_range_high_and_the_aggregation"]),
    ("grpo_always_divides_by_the_std", "reft.py", "    if not scale:\n        return centred[:, None] * mask\n", "",
     ["tests/test_reft_variants.py::test_grpo_without_the_std_matches_a_python_loop"]),
    ("scale_rewards_ignored", "reft.py", 'args.scale_rewards == "group")', "True)",
     ["tests/test_reft_variants.py::test_grpo_advantages_get_scale_rewards"]),
    ("zero_variance_counts_every_question", "reft.py", "(per_question == per_question[:, :1]).all(1).sum()",
     "(per_question == per_question[:, :1]).any(1).sum()",
     ["tests/test_reft_variants.py::test_zero_variance_groups_matches_a_python_loop"]),
    # --- flags that change what is learned from, each ignored by main()
    ("online_st_learns_from_wrong_answers", "reft.py", "if scores[b] == 1.0 else None", "if scores[b] > 0 else None",
     ["tests/test_reft_variants.py::test_online_st_learns_only_from_samples_that_scored_1"]),
    ("partial_reward_ignored", "reft.py", "args.cot, args.partial_reward), device=rollout.mask.device)",
     "args.cot, True), device=rollout.mask.device)",
     ["tests/test_reft_variants.py::test_no_partial_reward_scores_a_wrong_answer_0"]),
    ("kl_in_loss_keeps_the_kl_in_the_reward", "reft.py", "0.0 if args.kl_in_loss else beta)", "beta)",
     ["tests/test_reft_variants.py::test_kl_in_loss_leaves_the_kl_out_of_the_reward"]),
    ("advantage_grpo_is_rloo", "reft.py", '    if args.advantage == "grpo":\n', '    if False:\n',
     ["tests/test_reft_variants.py::test_grpo_advantages_get_scale_rewards"]),
    ("advantage_rloo_is_grpo", "reft.py", '    if args.advantage == "grpo":\n', '    if args.advantage != "gae":\n',
     ["tests/test_reft_variants.py::test_advantage_rloo_takes_rloos_advantages"]),
    ("gae_ignores_gamma_and_lam", "reft.py", "compute_gae(rewards, old_values, rollout.mask, args.gamma, args.lam)",
     "compute_gae(rewards, old_values, rollout.mask, 1.0, 0.95)",
     ["tests/test_reft_variants.py::test_gae_gets_gamma_and_lam"]),
    ("ppo_forward_ignores_temperature", "reft.py",
     "logp = torch.log_softmax(logits.float() / args.temperature, -1)  # logprobs_of's steps",
     "logp = torch.log_softmax(logits.float(), -1)  # logprobs_of's steps",
     ["tests/test_reft_variants.py::test_ratio_and_kl_of_the_first_step_use_the_sampling_temperature"]),
    # --- the sampler
    ("sampler_ignores_temperature", "reft.py",
     "inverse_cdf(logits / temperature, row_uniforms(seeds, t))", "inverse_cdf(logits, row_uniforms(seeds, t))",
     ["tests/test_reft.py::test_sampling_follows_the_softmax"]),
    ("sampler_shares_one_noise_stream", "reft.py",
     "seeds = torch.tensor([i64(int(s)) for s in seeds], device=device)",
     "seeds = torch.tensor([i64(int(seeds[0])) for s in seeds], device=device)",
     ["tests/test_reft.py::test_sampling_of_a_row_does_not_depend_on_its_batch"]),
    ("compiled_step_keeps_fsdp_hooks", "reft.py",
     'return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")', "return False",
     ["tests/test_reft.py::test_the_compiled_step_is_one_graph_under_fsdp"]),
    ("splitmix_shifts_in_the_sign_bit", "reft.py",
     "return (z >> k) & ((1 << (64 - k)) - 1)", "return z >> k",
     ["tests/test_reft.py::test_row_uniforms_are_splitmix64_per_row"]),
    ("rerank_questions_of_a_call_share_one_stream", "rerank.py",
     "for s, g in zip(scores.split(self.sizes), self.generators)",
     "for s, g in zip(scores.split(self.sizes), self.generators[:1] * len(self.sizes))",
     ["tests/test_rerank.py::test_a_call_of_many_questions_samples_each_as_a_call_of_its_own"]),
    ("reft_runs_every_forward", "reft.py", "    return policy, args.kl_in_loss or args.adaptive_kl or beta > 0",
     "    return True, True", ["tests/test_reft_variants.py::test_skipped_forwards_leave_the_weights_bitwise_the_same"]),
    ("reft_greedy_budget_from_the_shortest_prompt", "reft.py",
     "budget = args.max_length - max(len(", "budget = args.max_length - min(len(",
     ["tests/test_evaluate.py::test_greedy_accuracy_of_sft_and_reft_matches_evaluate"]),
    ("greedy_counts_the_last_batch_twice", "sft.py",
     "            correct += sum(s == 1.0 for s in scores)",
     "            correct += sum(s == 1.0 for s in scores) * (1 + (b + batch_size >= len(mine)))",
     ["tests/test_evaluate.py::test_greedy_accuracy_of_sft_and_reft_matches_evaluate"]),
    # --- voting and reranking
    ("vote_ties_go_to_the_last", "evaluate.py",
     "return max(groups, key=lambda g: g[1])[0] if groups else None",
     "return max(reversed(groups), key=lambda g: g[1])[0] if groups else None",
     ["tests/test_evaluate.py::test_majority_vote_ties_go_to_the_first_answer_seen"]),
    ("vote_needs_exact_equality", "evaluate.py",
     'if a == answers[g[0]] if scoring == "paper" else reward.answers_equal(a, answers[g[0]]):',
     "if a == answers[g[0]]:",
     ["tests/test_evaluate.py::test_numbers_within_tolerance_vote_together"]),
    ("verifier_scores_shifted", "evaluate.py",
     "scores = [score_of[prompt + t] for t in ks]", "scores = [score_of[prompt + t] for t in ks[1:] + ks[:1]]",
     ["tests/test_evaluate.py::test_rerank_picks_the_sample_a_known_verifier_scores_highest"]),
    ("rerank_picks_samples_without_answer", "evaluate.py",
     "if a is not None and (best is None or s > scores[best]):", "if best is None or s > scores[best]:",
     ["tests/test_evaluate.py::test_rerank_skips_samples_without_an_answer",
      "tests/test_evaluate.py::test_rerank_picks_the_sample_a_known_verifier_scores_highest"]),
    ("holdout_rerank_picks_the_lowest", "rerank.py",
     'max(with_answer, key=lambda c: c[0])[1]["correct"]', 'min(with_answer, key=lambda c: c[0])[1]["correct"]',
     ["tests/test_rerank.py::test_verifier_learns_a_learnable_labelling"]),
    # --- resume
    ("sft_scheduler_not_restored", "sft.py", '    sched.load_state_dict(state["sched"])\n', "",
     ["tests/test_sft.py::test_sigkill_and_resume_across_epochs_repeats_the_same_run"]),
    ("reft_beta_not_restored", "reft.py",
     'return state["step"], state["beta"], state["skipped"], state["best"]',
     'return state["step"], args.kl_coef, state["skipped"], state["best"]',
     ["tests/test_reft.py::test_sigkill_and_resume_across_epochs_restores_beta_and_best"]),
    ("reft_best_not_restored", "reft.py",
     'return state["step"], state["beta"], state["skipped"], state["best"]',
     'return state["step"], state["beta"], state["skipped"], -1.0',
     ["tests/test_reft.py::test_sigkill_and_resume_across_epochs_restores_beta_and_best"]),
    ("rerank_optimizer_not_restored", "rerank.py", '    set_optimizer_state_dict(model, opt, sd["optim"])\n', "",
     ["tests/test_rerank.py::test_sigkill_and_resume_of_the_verifier_training_repeats_the_same_run"]),
    # --- the GPU path
    ("attention_rows_left_empty", "reft.py",
     "return None if allowed is None else allowed | ~allowed.any(-1, keepdim=True)", "return allowed",
     ["tests/test_gpu_path.py::test_no_stage_hands_attention_a_fully_masked_row"]),
    ("nan_gradient_steps", "reft.py", "    if finite:\n        opt.step()\n", "    opt.step()\n",
     ["tests/test_gpu_path.py::test_a_step_with_a_nan_gradient_is_skipped"]),
    ("skips_in_a_row_never_reset", "reft.py",
     "skipped_in_a_row = 0 if s else skipped_in_a_row + 1", "skipped_in_a_row += not s",
     ["tests/test_gpu_path.py::test_skipped_steps_in_a_row_stop_the_run"]),
    ("evaluate_keeps_the_dropped_policy", "evaluate.py", "    del model\n    gc.collect()\n", "    del model\n",
     ["tests/test_gpu_path.py::test_the_dropped_policy_is_freed_before_the_verifier_loads[evaluate]"]),
    # --- faults
    ("resume_manifest_not_checked", "sft.py", "dist.all_gather_object(damage, damaged_file(path, rank, world))",
     "dist.all_gather_object(damage, None)",
     ["tests/test_faults.py::test_flipped_bytes_fall_back_to_the_previous_state_or_stop_with_one_line"]),
    ("metrics_trimmed_in_place", "sft.py", '    tmp = path + ".tmp"\n', "    tmp = path\n",
     ["tests/test_faults.py::test_a_kill_while_resume_trims_the_metrics_keeps_them"]),
    ("sampling_counts_a_cut_question_as_done", "rerank.py",
     'partial = {i for i, row in zip(ids, rows) if row.get("distinct", count[i]) != count[i]}', "partial = set()",
     ["tests/test_faults.py::test_a_killed_sampling_is_resumed_with_the_rows_of_the_uninterrupted_one"]),
    # --- issue 35: what a rewrite of the stages must keep
    ("save_removes_no_state", "sft.py", 'if os.path.basename(path).startswith("checkpoint-")',
     'if os.path.basename(path).startswith("checkpoint-0")',
     ["tests/test_faults.py::test_a_run_saving_every_step_leaves_its_two_newest_states",
      "tests/test_faults.py::test_a_resume_takes_the_newest_intact_of_several_states_and_names_it"]),
    ("resume_state_not_hashed", "sft.py", "        if file_digest(os.path.join(folder, name)) != sha256:",
     "        if False:",
     ["tests/test_faults.py::test_a_resume_takes_the_newest_intact_of_several_states_and_names_it"]),
    ("resume_takes_the_oldest_state", "sft.py",
     'return (os.path.join(output_dir, f"checkpoint-{max(steps)}"), max(steps))',
     'return (os.path.join(output_dir, f"checkpoint-{min(steps)}"), min(steps))',
     ["tests/test_faults.py::test_a_resume_takes_the_newest_intact_of_several_states_and_names_it"]),
    ("resume_check_skips_a_share", "sft.py", 'files = sorted(json.load(f)["files"].items())[rank::world]',
     'files = sorted(json.load(f)["files"].items())[::world]',
     ["tests/test_faults.py::test_two_processes_hash_their_own_files_and_share_the_check"]),
    ("manifest_keeps_rank_0_digests_only", "sft.py", '"files": {k: v for d in digests for k, v in d.items()}',
     '"files": digests[0]', ["tests/test_faults.py::test_two_processes_hash_their_own_files_and_share_the_check"]),
    ("rerank_resume_may_change_top_k", "rerank.py", '"limit", "gold_samples")', '"limit", "gold_samples", "top_k")',
     ["tests/test_rerank.py::test_a_resumed_sampling_is_refused_for_a_change_of_any_sampling_flag"]),
    ("rollout_seeds_ignore_the_step", "reft.py", "np.random.SeedSequence([seed, step, q])",
     "np.random.SeedSequence([seed, q])",
     ["tests/test_reft.py::test_a_question_gets_other_random_streams_at_each_step"]),
    ("rerank_recipe_small_at_50m", "rerank.py", "n is not None and n < SMALL_MODEL",
     "n is not None and n <= SMALL_MODEL",
     ["tests/test_reft.py::test_the_paper_recipe_fills_every_automatic_flag_from_50m_parameters"]),
    ("rerank_recipe_sized_by_the_sampler", "rerank.py", 'checkpoint_params(getattr(args, "init", "") or args.model)',
     "checkpoint_params(args.model)",
     ["tests/test_reft.py::test_the_paper_recipe_fills_every_automatic_flag_from_50m_parameters"]),
    ("evaluate_budget_small_at_50m", "evaluate.py", "n is not None and n < 50_000_000",
     "n is not None and n <= 50_000_000",
     ["tests/test_reft.py::test_the_paper_recipe_fills_every_automatic_flag_from_50m_parameters"]),
    ("model_size_from_the_last_shard", "reft.py", "for f in headers for key in f.keys())",
     "for f in headers[-1:] for key in f.keys())",
     ["tests/test_reft.py::test_the_paper_recipe_fills_every_automatic_flag_from_50m_parameters"]),
    # --- the sandbox
    ("sandbox_without_audit_hook", "reward.py", "        sys.addaudithook(_audit_hook(package_dirs, changes))\n", "",
     ["tests/test_sandbox.py::test_hostile_program[read_etc_passwd]",
      "tests/test_sandbox.py::test_hostile_program[sys_getframe]"]),
    ("sandbox_may_fork", "reward.py", "        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))\n", "",
     ["tests/test_sandbox.py::test_hostile_program[fork_exec_without_audit_event]"]),
    ("escape_prefix_broken", "tests/test_sandbox.py",
     'g = getattr(getattr(c, "__init__", None), "__globals__", None)',
     'g = getattr(getattr(c, "__init__", None), "__globalz__", None)',
     ["tests/test_sandbox.py::test_escape_prefix_reaches_the_real_modules_outside_the_sandbox"]),
    # --- the pretrained model, the quickstart's report
    ("gguf_weights_scrambled", "sft.py", "            model.hf_quantizer = None\n",
     "            model.hf_quantizer = None\n"
     "            torch.nn.init.normal_(model.get_input_embeddings().weight, std=0.02)\n",
     ["tests/test_sft.py::test_smollm2_gguf_trains_and_saves_a_loadable_checkpoint"]),
    ("quickstart_baseline_is_the_last_epoch", "scripts/quickstart.py",
     "best_sft, _ = best_eval(sft_metrics)", "best_sft = sft_metrics[-1]",
     ["tests/test_quickstart.py::test_quickstart_fast_runs_end_to_end_and_skips_finished_stages"]),
    # --- nothing silent: run folders, resume, splits (tests/test_bad_input.py)
    ("run_folder_reused_without_a_word", "sft.py",
     "    if progress is not None and not (args.resume or args.overwrite):", "    if False:",
     ["tests/test_bad_input.py::test_bad_invocation_is_one_error_line[sft.py --output_dir RUNS/sft]"]),
    ("resume_accepts_other_flags", "reft.py",
     "for k, v in flags.items() if k not in may_change and saved[k] != v]", "for k, v in flags.items() if False]",
     ["tests/test_bad_input.py::test_bad_invocation_is_one_error_line[reft.py --output_dir RUNS/reft --resume "
      "--batch_size 16 --kl_coef 0.5]"]),
    ("data_file_is_every_split", "reward.py", '        if split not in (None, "train"):', "        if False:",
     ["tests/test_bad_input.py::test_a_data_file_is_one_split"]),
    ("lr_zero_means_automatic", "reft.py", "RECIPES[name].items() if getattr(args, f) == -1}",
     "RECIPES[name].items() if getattr(args, f) in (-1, 0)}",
     ["tests/test_bad_input.py::test_lr_zero_trains_at_zero"]),
    ("sft_best_not_restored_on_resume", "sft.py",
     '        best = max((r["eval_accuracy"] for r in map(json.loads, f) if "eval_accuracy" in r), default=-1.0)\n',
     "        best = -1.0\n",
     ["tests/test_sft.py::test_warmup_and_best_are_their_epochs_and_a_resume_keeps_the_best"]),
    ("recipe_ignores_model_size", "reft.py", '    name = "small" if n is not None and n < SMALL_MODEL else "paper"',
     '    name = "paper"', ["tests/test_chain.py::test_the_stage_defaults_chain_into_the_quickstart"]),
    ("rerank_init_ignores_the_best_beside_the_warmup", "rerank.py", "        args.init = beside  #",
     "        pass  #", ["tests/test_chain.py::test_the_stage_defaults_chain_into_the_quickstart"]),
    # --- memory before loading
    ("memory_estimate_forgets_the_gradients", "reft.py",
     "        training = (resident + grad_bytes * n_params / world + ", "        training = (resident + ",
     ["tests/test_memory.py::test_7b_reft_is_refused_on_one_80gb_gpu_and_accepted_on_eight"]),
    ("reft_skips_the_memory_check", "reft.py", "    if (device_bytes := device_memory(device)) is not None:",
     "    if False:",
     ["tests/test_memory.py::test_each_stage_stops_before_loading_when_the_device_is_too_small"]),
    ("memory_advice_never_suggests_a_smaller_batch", "evaluate.py", "if fits(**{flag: b})),", "if False),",
     ["tests/test_memory.py::test_evaluate_fits_one_80gb_gpu_and_names_the_batch_that_fits_a_smaller_one"]),
    ("repeated_item_ids_accepted", "reward.py", "    if repeated:", "    if False:",
     ["tests/test_bad_input.py::test_bad_invocation_is_one_error_line[evaluate.py --data RUNS/repeated_ids.jsonl]"]),
    ("verifier_taken_as_a_policy", "evaluate.py", "    if policy and classifier:", "    if False:",
     ["tests/test_bad_input.py::test_bad_invocation_is_one_error_line[evaluate.py --model RUNS/verifier]"]),
    ("explained_variance_divides_by_rounding", "reft.py", "if var_ret > 1e-6 * ret_sq_sum / n else None",
     "if var_ret > 0 else None",
     ["tests/test_reft.py::test_explained_variance_of_constant_returns_summed_in_float32_is_none"]),
    # --- LoRA (issue 37)
    ("lora_reference_keeps_the_adapters_on", "reft.py", "        m.enabled = False\n", "        m.enabled = True\n",
     ["tests/test_lora.py::test_reference_is_the_warmup_with_the_adapters_off_after_a_step"]),
    ("merge_lora_without_the_scaling", "reft.py", 'merged[key + ".weight"].float() + scaling * update',
     'merged[key + ".weight"].float() + update',
     ["tests/test_lora.py::test_ppo_steps_move_the_adapters_and_the_head_never_the_base"]),
    ("resume_state_keeps_the_frozen_base", "reft.py", "if k not in frozen}", "}",
     ["tests/test_lora.py::test_resume_state_holds_only_what_trains_and_resuming_gives_the_same_weights"]),
    ("lora_lr_not_scaled", "reft.py", '        filled["lr"] *= LORA_LR_SCALE\n', "        pass\n",
     ["tests/test_lora.py::test_lora_learning_rate_is_ten_times_the_recipes"]),
    # --- the data
    ("minigsm_question_states_another_number", "data/minigsm/prepare.py",
     "sentences.append(template.format(P=subj, o=obj, F=friend, n=n))",
     "sentences.append(template.format(P=subj, o=obj, F=friend, n=n + 1))",
     ["tests/test_data.py::test_minigsm_answers_cots_and_programs_follow_from_the_question"]),
]


def copy_repo(dest):
    """The working tree's tracked and untracked-but-not-ignored files, and ../shared beside it (the real data)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if (ROOT.parent / "shared").is_dir():
        (dest.parent / "shared").symlink_to(ROOT.parent / "shared")


def pytest(repo, tests, env, timeout):
    """(exit code, seconds, last lines) of one pytest session in `repo`."""
    start = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=timeout)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        code, out = -1, "timed out"
    return code, time.time() - start, "\n".join(out.strip().splitlines()[-3:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest session")
    args = p.parse_args()
    if args.list:
        for name, path, *_ in MUTANTS:
            print(f"{name:40s} {path}")
        return
    unknown = set(args.names) - {m[0] for m in MUTANTS}
    if unknown:
        raise SystemExit(f"error: unknown mutants: {', '.join(sorted(unknown))} (see --list)")
    mutants = [m for m in MUTANTS if not args.names or m[0] in args.names]
    with tempfile.TemporaryDirectory(prefix="mutants_") as tmp:
        repo = Path(tmp) / "repo"
        copy_repo(repo)
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   REFT_TEST_CACHE=str(Path(tmp) / "cache"))
        tests = list(dict.fromkeys(t for m in mutants for t in m[4]))
        code, seconds, tail = pytest(repo, tests, env, args.timeout * 3)
        print(f"unmutated: {len(tests)} tests {'pass' if code == 0 else 'FAIL'} ({seconds:.0f} s)", flush=True)
        if code != 0:
            raise SystemExit(f"error: the tests fail without any mutant, so no kill would mean anything:\n{tail}")
        results = []
        for name, path, old, new, mutant_tests in mutants:
            target = repo / path
            original = target.read_text()
            if original.count(old) != 1:
                raise SystemExit(f"error: mutant {name}: the text to replace occurs {original.count(old)} times "
                                 f"in {path}, not once")
            target.write_text(original.replace(old, new))
            try:
                code, seconds, tail = pytest(repo, mutant_tests, env, args.timeout)
            finally:
                target.write_text(original)
            verdict = "killed" if code == 1 else "SURVIVED" if code == 0 else f"ERROR (pytest exit {code})"
            results.append(verdict)
            print(f"{verdict:9s} {name:40s} {path:24s} {seconds:5.0f} s", flush=True)
            if verdict != "killed":
                print("    " + tail.replace("\n", "\n    "), flush=True)
    killed = results.count("killed")
    print(f"\n{killed}/{len(results)} mutants killed")
    if killed != len(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
