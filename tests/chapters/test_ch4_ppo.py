"""ch4_ppo: a smoke run logs every stable diagnostic for both runs and writes its summary, plots and a loadable
model.pt; the KL at the first rollout is 0 (policy = reference) and both runs start identically; a KL past
--max-kl stops the run early, names the cause and keeps the last good checkpoint (the SFT weights here); a NaN
stops with an error naming that checkpoint; a reward model with another tokenizer is a usage error before
any training; LoRA with the adaptive KL controller runs; --help and bad flags.

The SFT model is made once per session (the ``sft_model`` fixture of tests/chapters/conftest.py: ch3_sft's
main in-process, small sizes, from the session's smoke pretrained checkpoint); the reward models are built here from it (a random head: these tests are about the
loop's plumbing, not about what it learns) and passed with --sft / --reward, so nothing else is rebuilt.
"""
import json
import math

import pytest
import torch

from minilife import runs
from minilife.align.policy import PolicyWithValue
from minilife.align.reward import RewardModel, save_reward_model
from minilife.artifacts import load_pretrained
from minilife.chapters import ch4_ppo as P
from minilife.checkpoint import NonFiniteLossError, load_checkpoint, verify_checkpoint
from minilife.common import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _reward_file(path, gpt_path, extra):
    torch.manual_seed(0)
    gpt, tok = load_pretrained(gpt_path)
    return str(save_reward_model(path, RewardModel.from_gpt(gpt), tok, extra=extra))


@pytest.fixture(scope="module")
def reward_models(sft_model, smoke_pretrained, tmp_path_factory):
    """{"stats": with reward_mean/std, "plain": without (measured by the chapter), "other": the pretrained
    model's tokenizer (no chat tokens)}."""
    d = tmp_path_factory.mktemp("ppo_rm")
    return {"stats": _reward_file(d / "rm_stats.pt", sft_model, {"reward_mean": 0.1, "reward_std": 0.5}),
            "plain": _reward_file(d / "rm_plain.pt", sft_model, {}),
            "other": _reward_file(d / "rm_other.pt", smoke_pretrained, {"reward_mean": 0.0, "reward_std": 1.0})}


@pytest.fixture(scope="module")
def common(sft_model, reward_models):
    return ["--smoke", "--sft", sft_model, "--reward", reward_models["stats"], "--n-test", "4", "--n-val", "3",
            "--no-plots"]


@pytest.fixture(scope="module")
def smoke_run(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_smoke")
    return out, P.main(common + ["--out", str(out), "--plots"])


def run_cli(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runs.cli(P.main, P.CHAPTER, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_smoke_run_logs_every_diagnostic_for_both_runs(smoke_run):
    out, s = smoke_run
    assert P.METRICS == ("reward", "gold", "kl", "entropy", "approx_kl", "clip_frac", "value_loss", "explained_var",
                         "response_len", "kl_coef")  # stable names: notebooks and the README read them
    rows = {name: read_jsonl(out / name / "metrics.jsonl") for name in ("seatbelt", "loose")}
    for name, rs in rows.items():
        assert [r["iteration"] for r in rs] == [1, 2], name
        for r in rs:
            for k in P.METRICS:
                assert k in r and (math.isfinite(r[k]) or k == "explained_var"), (name, k)
            assert 0 <= r["clip_frac"] <= 1 and r["entropy"] > 0 and r["response_len"] >= 1
            assert "val_reward" in r and "val_gold" in r  # --eval-every 1 under --smoke
    # the first rollout comes from the SFT model itself: KL 0, and the same rollout in both runs (same seed)
    assert rows["seatbelt"][0]["kl"] == pytest.approx(0.0, abs=1e-5)
    for k in ("reward", "gold", "kl", "entropy", "response_len"):
        assert rows["seatbelt"][0][k] == rows["loose"][0][k], k
    assert [r["kl_coef"] for r in rows["seatbelt"]] == [0.2, 0.2] and rows["loose"][0]["kl_coef"] == 0.0
    assert (out / "seatbelt" / "samples.jsonl").is_file()


def test_smoke_run_writes_summary_plots_and_a_plain_model(smoke_run, sft_model):
    out, s = smoke_run
    assert s["finished"] and s["stopped"] is None and json.loads((out / "summary.json").read_text())["finished"]
    for key in ("gold_sft", "gold_ppo", "reward_sft", "reward_ppo", "win_rate", "final_kl", "reward_stats"):
        assert s[key] is not None, key
    assert s["reward_stats"] == {"mean": 0.1, "std": 0.5}  # read from the reward model's file
    seat = s["runs"]["seatbelt"]["test"]
    assert seat["n"] == 4 and seat["wins"] + seat["ties"] + seat["losses"] == 4
    h = s["hacking"]
    assert set(h) >= {"reward_first", "reward_last", "gold_first", "gold_last", "hacked", "by_task", "example"}
    assert sum(t["n"] for t in h["by_task"]) == 4
    assert s["runs"]["loose"]["curve"]["iteration"] == [0, 1, 2]  # the SFT model's val answers, then each eval
    for name in ("reward_hacking.png", "ppo_kl.png", "model.pt", "seatbelt/last.pt", "loose/last.pt"):
        assert (out / name).is_file(), name
    model, tok = load_pretrained(out / "model.pt")
    sft, sft_tok = load_pretrained(sft_model)
    assert model.cfg == sft.cfg and tok.state() == sft_tok.state()


def test_a_second_run_into_the_same_directory_needs_overwrite(smoke_run, common, capsys):
    out, _ = smoke_run
    code, _, err = run_cli(common + ["--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and "already holds a run" in err


def test_kl_past_the_bound_stops_early_and_keeps_the_last_good_checkpoint(common, sft_model, tmp_path):
    out = tmp_path / "o"
    s = P.main(common + ["--out", str(out), "--no-loose", "--iterations", "4", "--kl-estimator", "k3",
                         "--max-kl", "1e-6"])
    seat = s["runs"]["seatbelt"]
    assert s["stopped"].startswith("kl above bound") and "--max-kl" in s["stopped"] and not s["finished"]
    assert seat["iterations"] == 1  # the policy after one update broke the bound at the second rollout
    last_good = seat["last_good_checkpoint"]
    verify_checkpoint(last_good)  # intact
    policy = PolicyWithValue(load_pretrained(sft_model)[0])
    assert load_checkpoint(last_good, model=policy)["step"] == 0  # saved before the first update ...
    sft = load_pretrained(sft_model)[0]
    for (k, a), b in zip(policy.gpt.state_dict().items(), sft.state_dict().values()):
        assert torch.equal(a, b), k  # ... so it holds the SFT weights
    exported = load_pretrained(out / "model.pt")[0]  # the export is that last good policy
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), sft.state_dict().values()))


def test_a_nan_stops_with_an_error_naming_the_last_good_checkpoint(common, tmp_path, monkeypatch):
    def nan_rewards(reward_model, rollout, **kw):
        return torch.full((rollout.tokens.shape[0],), float("nan"))
    monkeypatch.setattr(P, "rollout_rewards", nan_rewards)
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLossError, match="ckpt_step000000.pt") as e:
        P.main(common + ["--out", str(out), "--no-loose", "--n-test", "0", "--n-val", "0"])
    assert "loss is nan" in str(e.value)
    verify_checkpoint(out / "seatbelt" / "ckpt_step000000.pt")


def test_a_reward_model_with_another_tokenizer_stops_before_training(common, reward_models, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_cli(common + ["--out", str(out), "--reward", reward_models["other"]], capsys)
    assert code == 2 and "different tokenizers" in err and "rm_other.pt" in err
    assert not (out / "seatbelt").exists()  # nothing trained


def test_lora_with_the_adaptive_kl_controller_runs(sft_model, reward_models, tmp_path):
    s = P.main(["--smoke", "--sft", sft_model, "--reward", reward_models["plain"], "--out", str(tmp_path / "o"),
                "--no-loose", "--lora-rank", "2", "--kl-target", "0.5", "--iterations", "3", "--n-test", "0",
                "--n-val", "0", "--no-plots"])
    assert s["finished"] and s["runs"]["seatbelt"]["method"].startswith("LORA r=2")
    assert s["reward_stats"]["std"] > 0  # measured on SFT samples: the file carries none
    coefs = [r["kl_coef"] for r in read_jsonl(tmp_path / "o" / "seatbelt" / "metrics.jsonl")]
    assert coefs[0] == 0.2 and coefs[1] < coefs[0]  # KL 0 < target at the first rollout: beta shrinks
    assert s["gold_ppo"] is None and s["hacking"] is None
    model, _ = load_pretrained(s["model"])  # LoRA merged into plain weights
    assert type(model.lm_head).__name__ == "Linear"


def test_help_lists_the_flags(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "--kl-coef" in out and "--loose-kl-coef" in out and "--max-kl" in out


@pytest.mark.parametrize("argv, flag", [(["--kl-estimator", "k4"], "--kl-estimator"),
                                        (["--kl-target", "1", "--kl-coef", "0"], "--kl-target"),
                                        (["--max-kl", "0"], "--max-kl"), (["--clip", "1.5"], "--clip")])
def test_bad_flags_are_usage_errors(argv, flag, capsys):
    code, _, err = run_cli(["--smoke"] + argv, capsys)
    assert code == 2 and flag in err
