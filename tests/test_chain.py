"""The stages typed in the README's order with their defaults (prepare → sft → reft → rerank → evaluate) make the
quickstart's pipeline on the tiny model: the same data, each stage reading what the one before wrote, the quickstart's
settings. Run in a fresh folder holding only the scripts, as a clone has them, with a few steps per stage."""
import json
import shutil
import sys

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT / "scripts"))
import quickstart  # noqa: E402

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import sft  # noqa: E402


def test_the_stage_defaults_chain_into_the_quickstart(tmp_path):
    for name in ("sft.py", "reft.py", "rerank.py", "evaluate.py", "reward.py", "data/minigsm/prepare.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    qs = quickstart.quickstart_args([])  # the cpu preset's values, as `bash run.sh quickstart` runs them

    def stage(*argv):
        return run([PY, *argv], cwd=tmp_path, timeout=600)

    # prepare: its defaults are the quickstart's data, byte for byte
    stage("data/minigsm/prepare.py")
    run([PY, "data/minigsm/prepare.py", "--out_dir", tmp_path / "qs_data", "--n_train", qs.n_train,
         "--max_number", qs.max_number, "--seed", qs.seed])
    for f in sorted((tmp_path / "qs_data").glob("*.jsonl")):
        assert (tmp_path / "data/minigsm" / f.name).read_bytes() == f.read_bytes(), f.name

    # sft: one epoch instead of 40, that epoch as the warm-up instead of the 24th (both checked against the quickstart)
    stage("sft.py", "--epochs", 1, "--warmup_epoch", 1, "--eval_limit", 64)
    defaults = sft.Args()
    sft.fill_automatic(defaults)
    assert (defaults.epochs, defaults.warmup_epoch) == (qs.sft_epochs, qs.warmup_epoch)
    trained = json.loads((tmp_path / "runs/sft/final/train_args.json").read_text())
    assert (trained["cot"], trained["lr"], trained["max_new_tokens"], trained["eval_every_epoch"]) == \
        (qs.cot, qs.sft_lr, qs.max_new_tokens, True)
    for folder in ("warmup", "best", "final"):
        assert (tmp_path / "runs/sft" / folder / "config.json").is_file(), folder

    # reft: one step from runs/sft/warmup with the quickstart's PPO recipe
    p = stage("reft.py", "--max_steps", 1)
    assert "recipe: small" in p.stdout
    trained = json.loads((tmp_path / "runs/reft/final/train_args.json").read_text())
    expected = dict(model="runs/sft/warmup", cot=qs.cot, lr=qs.reft_lr, batch_size=qs.reft_batch_size,
                    num_samples=qs.num_samples, kl_coef=qs.kl_coef, vf_coef=qs.vf_coef, lam=qs.lam,
                    max_length=qs.reft_max_length, max_prompt_length=96, eval_every=qs.reft_eval_every,
                    save_best=True)
    assert {k: trained[k] for k in expected} == expected
    metrics = [json.loads(line) for line in open(tmp_path / "runs/reft/metrics.jsonl")]
    assert len(metrics) == 1 and metrics[0]["step"] == 1

    # rerank: samples from the warm-up, the verifier's trunk from the best SFT epoch beside it (as the quickstart's
    # verifier_sft); a few questions, and the gold CoTs, since a one-epoch warm-up gets no sample right
    p = stage("rerank.py", "--limit", 8, "--epochs", 1, "--gold_samples")
    trained = json.loads((tmp_path / "runs/rerank/final/train_args.json").read_text())
    assert (trained["model"], trained["init"], trained["num_samples"], trained["max_new_tokens"], trained["cot"]) == \
        ("runs/sft/warmup", "runs/sft/best", qs.verifier_samples, qs.max_new_tokens, qs.cot)

    # evaluate: the quickstart's k and budget, into a folder named after the model
    stage("evaluate.py", "--model", "runs/reft/final", "--limit", 16)
    results = json.loads((tmp_path / "runs/eval/reft_final/results.json").read_text())
    assert (results["n"], results["max_new_tokens"], results["cot"], results["split"]) == \
        (16, qs.max_new_tokens, qs.cot, "test")
    assert evaluate.Args().k == qs.k
