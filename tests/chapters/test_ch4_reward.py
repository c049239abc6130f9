"""ch4_reward: a smoke run logs loss/accuracy, writes its summary and a reward.pt that loads as a RewardModel
reading the same reward on padded and unpadded rows; LoRA and a frozen trunk run; resume of a cut run
matches the straight run; a malformed --train-file names file:line; contradictory flags are usage errors.

The SFT model is made once per session (the ``sft_model`` fixture of tests/chapters/conftest.py: ch3_sft's
main in-process, small sizes, from the session's smoke pretrained checkpoint) and passed with --sft.
"""
import json
import math
import signal

import pytest
import torch

from minilife import runs
from minilife.align.chat import chat_token_ids, render_prompt
from minilife.align.reward import RewardModel, load_reward_model
from minilife.artifacts import load_pretrained
from minilife.chapters import ch4_reward as R
from minilife.checkpoint import read_checkpoint
from minilife.common import read_jsonl
from minilife.data.preferences import write_preferences
from minilife.runs import RunInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("val_loss", "val_accuracy", "val_margin", "test_loss", "test_accuracy", "test_margin", "gold_pairs",
        "gold_agreement", "gold_spearman", "gold_pearson")


@pytest.fixture(scope="module")
def common(sft_model):
    return ["--smoke", "--sft", sft_model, "--no-plots"]


@pytest.fixture(scope="module")
def smoke_run(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_smoke")
    return out, R.main(common + ["--out", str(out), "--plots"])


def run_cli(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runs.cli(R.main, R.CHAPTER, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_smoke_run_logs_loss_and_accuracy_and_writes_a_summary(smoke_run):
    out, s = smoke_run
    assert s["finished"] and s["steps"] == s["max_steps"] == 8 and s["method"] == "full fine-tuning"
    for key in ("before", "after", "by_kind", "reward_mean", "reward_std", "reward_stats_on", "n_samples",
                "gold_sft_mean", "first_loss", "last_loss", "step_time_s", "n_train", "n_val", "n_test",
                "reward_model", "trainable_params", "total_params"):
        assert key in s, key
    for key in KEYS:
        assert key in s["before"] and key in s["after"], key
    assert s["n_samples"] == 2 * 6 and s["reward_stats_on"] == "SFT samples" and s["reward_std"] > 0
    assert all(0 <= v["accuracy_after"] <= 1 and v["n"] >= 1 for v in s["by_kind"].values())
    assert sum(v["n"] for v in s["by_kind"].values()) == s["n_val"] + s["n_test"]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r["margin"]) and r["grad_norm"] >= 0 for r in rows)
    assert [r["step"] for r in rows if "val_accuracy" in r] == [4, 8]
    assert json.loads((out / "summary.json").read_text())["reward_mean"] == s["reward_mean"]
    for name in ("reward_curves.png", "reward_vs_gold.png", "reward.pt", "preferences_train.jsonl"):
        assert (out / name).is_file(), name


def test_reward_pt_loads_and_reads_the_same_reward_padded_or_not(smoke_run, sft_model):
    out, s = smoke_run
    rm, tok = load_reward_model(s["reward_model"])
    sft, sft_tok = load_pretrained(sft_model)
    assert isinstance(rm, RewardModel) and rm.body.cfg == sft.cfg and tok.state() == sft_tok.state()
    extra = read_checkpoint(out / "reward.pt")["extra"]
    assert extra["kind"] == "reward_model" and extra["reward_mean"] == s["reward_mean"]
    end = chat_token_ids(tok).end  # rows as a rollout lays them out: prompt, answer, <|end|>
    rows = [render_prompt(tok, [{"role": "user", "content": q}]) + tok.encode(a) + [end]
            for q, a in (("When is the offsite?", "Friday."), ("Summarise the e-mail.", "The launch moves to May."),
                         ("Hi", "Hello! How can I help?"))]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]))[0] for r in rows])
        T = max(map(len, rows))
        idx = torch.full((len(rows), T), tok.eot_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)  # (B, T)
        for i, r in enumerate(rows):
            idx[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
        right = rm(idx, mask)
        left = rm(torch.stack([row.roll(T - len(r)) for row, r in zip(idx, rows)]),
                  torch.stack([m.roll(T - len(r)) for m, r in zip(mask, rows)]))
        two = rm(idx[:2, :max(map(len, rows[:2]))], mask[:2, :max(map(len, rows[:2]))])  # another batch size
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, alone[:2], rtol=1e-5, atol=1e-5)


def test_lora_and_a_frozen_trunk_run_and_save_plain_weights(common, tmp_path):
    s = R.main(common + ["--out", str(tmp_path / "lora"), "--lora-rank", "2", "--steps", "3", "--n-test", "0"])
    assert s["finished"] and s["trainable_params"] < s["total_params"] and s["reward_stats_on"] == "val pair answers"
    rm, _ = load_reward_model(s["reward_model"])
    assert type(rm.body.blocks[0].attn.qkv).__name__ == "Linear"  # merged
    s = R.main(common + ["--out", str(tmp_path / "probe"), "--freeze-trunk", "--steps", "2", "--n-test", "0"])
    assert s["trainable_params"] == rm.body.cfg.n_embd + 1  # the head alone


def test_resume_of_a_cut_run_matches_the_straight_run(common, tmp_path):
    args = common + ["--n-test", "0", "--ckpt-every", "100"]

    def ctrl_c(step, model):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step: the step finishes, then it saves

    with pytest.raises(RunInterrupted, match="after step 3 of 8"):
        R.main(args + ["--out", str(tmp_path / "cut")], hook=ctrl_c)
    assert not (tmp_path / "cut" / "reward.pt").exists() and read_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3
    cut = R.main(args + ["--out", str(tmp_path / "cut"), "--resume"])
    straight = R.main(args + ["--out", str(tmp_path / "straight")])
    a, b = read_checkpoint(tmp_path / "cut" / "reward.pt")["model"], read_checkpoint(tmp_path / "straight" /
                                                                                    "reward.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cut["after"] == straight["after"] and cut["before"] == straight["before"]
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("cut", "straight")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_an_earlier_reward_pt_is_not_replaced_without_overwrite(common, tmp_path, capsys):
    (tmp_path / "reward.pt").write_bytes(b"an earlier run's")
    code, _, err = run_cli(common + ["--out", str(tmp_path)], capsys)
    assert code == 2 and "already holds a run" in err and "reward.pt" in err and "--overwrite" in err
    assert (tmp_path / "reward.pt").read_bytes() == b"an earlier run's"


def test_help_and_contradictory_flags(usage_error, capsys):
    with pytest.raises(SystemExit) as e:
        R.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--margin", "--center-coef", "--lora-rank", "--freeze-trunk", "--train-file", "--samples"):
        assert flag in text, flag
    assert "--lora-rank" in usage_error(R.main, ["--smoke", "--freeze-trunk", "--lora-rank", "2"])
    assert "--center-coef" in usage_error(R.main, ["--smoke", "--center-coef", "-1"])


def test_a_malformed_train_file_is_named_by_file_and_line(common, tmp_path, capsys):
    bad = tmp_path / "prefs.jsonl"
    write_preferences(bad, [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}] * 3)
    with open(bad, "a", encoding="utf-8") as fh:
        fh.write('{"prompt": "Say hi.", "chosen": "Same.", "rejected": "Same."}\n')
    code, _, err = run_cli(common + ["--out", str(tmp_path / "o"), "--train-file", str(bad)], capsys)
    assert code != 0 and f"{bad}:4" in err and "identical" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(common + ["--out", str(tmp_path / "o2"), "--train-file", str(empty)], capsys)
    assert code != 0 and str(empty) in err


def test_the_users_own_preference_file_trains(common, tmp_path):
    good = tmp_path / "prefs.jsonl"
    write_preferences(good, [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
                              "rejected": "I am not able to help with arithmetic."} for i in range(10)])
    s = R.main(common + ["--out", str(tmp_path / "o"), "--train-file", str(good), "--n-val", "3", "--steps", "6",
                         "--n-test", "0"])
    assert s["finished"] and s["n_train"] == 7 and s["n_val"] == 3 and list(s["by_kind"]) == ["unlabelled"]
    assert s["after"]["val_accuracy"] == 1.0 and s["after"]["val_margin"] > s["before"]["val_margin"] + 0.3  # learnt


def test_pairs_end_where_a_rollout_ends(sft_model):
    """The reward is read at the answer's closing <|end|>, the token a sampled rollout ends with."""
    from minilife.align.pairs import encode_pair
    from minilife.align.reward import end_at_response
    from minilife.data.preferences import Preference
    _, tok = load_pretrained(sft_model)
    pair = Preference([{"role": "user", "content": "When is the offsite?"}], "Friday.", "I cannot say.")
    e = end_at_response(encode_pair(tok, pair, 64))
    prompt, end = render_prompt(tok, pair.prompt), chat_token_ids(tok).end
    assert e.chosen_ids.tolist() == prompt + tok.encode("Friday.") + [end]
    assert e.rejected_ids.tolist() == prompt + tok.encode("I cannot say.") + [end]
    assert e.chosen_mask[-1] and len(e.chosen_mask) == len(e.chosen_ids)
