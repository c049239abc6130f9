"""ch4_grpo: a smoke run logs the stable metric names and writes its summary, plots and a loadable model.pt;
REINFORCE (group size 1 too) and LoRA with the adapters-off reference run; --group-size 1 for GRPO is a usage
error naming the flag; a tiny --max-kl stops the run naming the cause and saves nothing past the last good
policy; NaN weights stop it before any save, and resuming from the last good checkpoint repeats the
uninterrupted run; the reward-model path runs and draws PPO vs GRPO from a ch4_ppo-shaped run.

The SFT model is made once per session (the ``sft_model`` fixture of tests/chapters/conftest.py: ch3_sft's
main in-process, small sizes, from the session's smoke pretrained checkpoint) and passed with --sft, so nothing else is rebuilt.
"""
import json
import math

import pytest
import torch

from minilife import runs
from minilife.align.reward import RewardModel, save_reward_model
from minilife.artifacts import load_pretrained
from minilife.chapters import ch4_grpo as G
from minilife.checkpoint import NonFiniteLossError, read_checkpoint
from minilife.common import read_jsonl, write_jsonl_atomic

pytestmark = pytest.mark.usefixtures("one_thread")
STABLE = ("step", "samples", "opt_steps", "reward", "gold", "exact", "format_ok", "kl", "entropy", "clip_frac",
          "approx_kl", "response_len", "ended", "zero_std_groups", "loss", "grad_norm")


@pytest.fixture(scope="module")
def common(sft_model):
    # the smoke SFT model earns no checker score; a format term gives the groups a signal to learn from
    return ["--smoke", "--sft", sft_model, "--no-plots", "--n-train", "60", "--n-test", "7",
            "--tasks", "all", "--reward-terms", "score=1,format=0.5"]


@pytest.fixture(scope="module")
def smoke_run(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_smoke")
    return out, G.main(common + ["--out", str(out), "--plots"])


def run_cli(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runs.cli(G.main, G.CHAPTER, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_smoke_run_logs_stable_names_and_writes_a_summary(smoke_run):
    out, s = smoke_run
    assert s["finished"] and s["stopped"] is None and s["iterations"] == s["max_iterations"] == 3
    assert s["samples"] == 3 * 2 * 4 and s["opt_steps"] == 3 * 2  # 3 x (2 prompts x G 4), minibatches of 4
    rows = [r for r in read_jsonl(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["samples"] for r in rows] == [8, 16, 24]
    for r in rows:
        assert set(STABLE) <= set(r), set(STABLE) - set(r)
        assert 0 <= r["exact"] <= 1 and 0 <= r["zero_std_groups"] <= 2 and r["kl"] >= 0 and r["entropy"] > 0
        assert all(math.isfinite(r[k]) for k in ("reward", "gold", "loss", "grad_norm", "clip_frac"))
    assert rows[0]["kl"] == 0.0  # the first rollout comes from the SFT model itself: pi = pi_ref
    for key in ("gold_sft", "gold_rl", "win_rate", "tie_rate", "loss_rate", "before", "after", "tasks", "model"):
        assert key in s, key
    assert s["win_rate"] + s["tie_rate"] + s["loss_rate"] == pytest.approx(1.0) and s["n_test"] == 7
    assert s["before"]["kl"] == 0.0 and s["after"]["kl"] >= 0  # the final policy's KL, on its pool samples
    for when in ("before", "after"):
        sampled = s[when]["sampled"]
        assert 0 <= sampled["exact"] <= sampled["pass_at_k"] <= 1 and math.isfinite(sampled["reward"])
    assert set(s["after"]["scores"]["by_task"]) <= set(s["before"]["scores"]["by_task"])
    assert json.loads((out / "summary.json").read_text())["gold_rl"] == s["gold_rl"]
    for name in ("grpo_curves.png", "grpo_diagnostics.png", "model.pt", "last.pt"):
        assert (out / name).is_file(), name
    assert not (out / "ppo_vs_grpo.png").exists()  # verifiable rewards: no PPO comparison


def test_model_pt_loads_as_a_plain_gpt_that_moved(smoke_run, sft_model):
    out, s = smoke_run
    model, tok = load_pretrained(out / "model.pt")
    sft, sft_tok = load_pretrained(sft_model)
    assert tok.special_tokens == sft_tok.special_tokens and model.cfg == sft.cfg
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values()))


def test_group_size_one_is_a_usage_error_for_grpo(usage_error):
    err = usage_error(G.main, ["--smoke", "--group-size", "1"])
    assert "--group-size" in err and "GRPO" in err


@pytest.mark.parametrize("argv, flag", [(["--reference", "adapters-off"], "--lora-rank"),
                                        (["--tasks", "dates"], "--tasks"), (["--reward-terms", "speed=1"],
                                                                            "--reward-terms"),
                                        (["--clip-eps", "1.5"], "--clip-eps"), (["--max-kl", "0"], "--max-kl"),
                                        (["--aggregation", "sum"], "--aggregation")])
def test_bad_flags_are_usage_errors_naming_the_flag(usage_error, argv, flag):
    assert flag in usage_error(G.main, ["--smoke", *argv])


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        G.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--algo", "--group-size", "--no-std-norm", "--aggregation", "--kl-beta", "--clip-eps", "--reward",
                 "--tasks", "--max-kl", "--inner-epochs"):
        assert flag in text, flag


def test_reinforce_runs_even_with_one_sample_per_prompt(common, tmp_path):
    s = G.main(common + ["--out", str(tmp_path / "o"), "--algo", "reinforce", "--group-size", "1",
                         "--prompts-per-iter", "4", "--iterations", "2", "--n-test", "0"])
    assert s["finished"] and s["algo"] == "reinforce" and s["samples"] == 8
    rows = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert all(r["zero_std_groups"] is None for r in rows)  # no groups without G >= 2


def test_lora_with_the_adapters_off_reference_runs(common, tmp_path):
    s = G.main(common + ["--out", str(tmp_path / "o"), "--lora-rank", "2", "--reference", "adapters-off",
                         "--iterations", "2", "--no-std-norm", "--aggregation", "seq-mean-token-sum-norm",
                         "--inner-epochs", "2"])
    assert s["finished"] and s["trainable_params"] < s["total_params"] and s["opt_steps"] == 2 * 2 * 2
    assert s["before"]["kl"] == 0.0  # LoRA's B = 0: the policy starts as the reference
    model, _ = load_pretrained(s["model"])  # merged into plain weights
    assert type(model.lm_head).__name__ == "Linear"


def test_a_tiny_max_kl_stops_naming_the_cause_and_keeps_the_last_good_checkpoint(common, tmp_path, capsys):
    out = tmp_path / "o"
    argv = common + ["--out", str(out), "--max-kl", "1e-12", "--lr", "1e-3", "--iterations", "4"]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "--max-kl" in err and "KL to the reference" in err
    rows = read_jsonl(out / "metrics.jsonl")
    breach = rows[-1]  # the first policy past the bound: logged, never trained on
    assert breach["stopped"] and breach["kl"] > 1e-12 and all(r["kl"] <= 1e-12 for r in rows[:-1])
    it = breach["step"] - 1
    assert it >= 1 and f"iteration {it}:" in err and rows[0]["kl"] == 0.0  # pi_0 = pi_ref always passes
    s = json.loads((out / "summary.json").read_text())
    assert not s["finished"] and "--max-kl" in s["stopped"] and s["iterations"] == it
    saved = sorted(int(p.stem[len("ckpt_step"):]) for p in out.glob("ckpt_step*.pt"))
    assert all(k < it for k in saved)  # each checkpoint holds a policy whose KL was measured within the bound
    assert (f"ckpt_step{saved[-1]:06d}.pt" in err) if saved else ("SFT model is the last good policy" in err)
    assert not (out / "model.pt").exists()


def test_nan_weights_stop_before_saving_naming_the_last_good_checkpoint(common, tmp_path):
    out = tmp_path / "o"

    def poison(iteration, model):
        if iteration == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="ckpt_step000001") as e:
        G.main(common + ["--out", str(out), "--iterations", "3", "--n-test", "0"], hook=poison)
    assert "non-finite weights" in str(e.value)
    state = read_checkpoint(out / "ckpt_step000001.pt")  # the last good policy, intact and finite
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "ckpt_step000002.pt").exists()


def test_resuming_from_the_last_good_checkpoint_repeats_the_uninterrupted_run(common, tmp_path):
    flags = common + ["--n-test", "0", "--iterations", "3"]
    G.main(flags + ["--out", str(tmp_path / "a")])

    def poison(iteration, model):  # a divergence in iteration 1: the run stops; ckpt_step000001 holds pi_1
        if iteration == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError):
        G.main(flags + ["--out", str(tmp_path / "b")], hook=poison)
    G.main(flags + ["--out", str(tmp_path / "b"), "--resume"])  # redoes iteration 1 from pi_1, then 2
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("reward", "kl", "loss", "response_len"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)


def test_reward_model_rewards_and_the_ppo_figure(common, sft_model, tmp_path):
    gpt, tok = load_pretrained(sft_model)
    torch.manual_seed(0)
    rm_path = save_reward_model(tmp_path / "reward.pt", RewardModel.from_gpt(gpt), tok,
                                extra={"reward_mean": 0.5, "reward_std": 2.0})
    ppo = tmp_path / "ppo"  # a ch4_ppo-shaped run: its config, and the seatbelt run's reward and gold per iteration
    (ppo / "seatbelt").mkdir(parents=True)
    write_jsonl_atomic(ppo / "seatbelt" / "metrics.jsonl", [{"iteration": i, "reward": 0.1 * i, "gold": 0.2}
                                                            for i in (1, 2, 3)])
    (ppo / "summary.json").write_text(json.dumps({"config": {
        "prompts_per_iter": 4, "samples_per_prompt": 2, "ppo_epochs": 1, "minibatch_size": 4, "lr": 1e-4,
        "max_new_tokens": 24, "temperature": 1.0}}))  # 3 x 8 answers, 2 steps each: the smoke run's budget
    out = tmp_path / "o"
    s = G.main(common + ["--out", str(out), "--reward", "model", "--reward-model", str(rm_path), "--ppo-run", str(ppo),
                         "--plots"])
    assert s["finished"] and s["reward"] == "model" and len(s["tasks"]) == 7  # all tasks by default
    assert s["ppo_comparison"]["same_budget"] and (out / "ppo_vs_grpo.png").is_file()
    assert s["ppo_comparison"]["ppo_samples"] == s["samples"] == 24
    rows = read_jsonl(out / "metrics.jsonl")
    assert all(math.isfinite(r["reward"]) for r in rows)


def test_a_reward_model_with_another_tokenizer_is_a_usage_error(common, smoke_pretrained, tmp_path, capsys):
    base, base_tok = load_pretrained(smoke_pretrained)  # the pretrained model: no chat tokens yet
    rm_path = save_reward_model(tmp_path / "reward.pt", RewardModel.from_gpt(base), base_tok)
    code, _, err = run_cli(common + ["--out", str(tmp_path / "o"), "--reward", "model", "--reward-model", str(rm_path)],
                           capsys)
    assert code == 2 and "reward.pt" in err and "different tokenizers" in err
