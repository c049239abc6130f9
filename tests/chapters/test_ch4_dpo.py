"""ch4_dpo: a smoke run logs accuracy/margins, writes its summary (win rate, KL to SFT) and a loadable model.pt;
LoRA with the adapters-off reference runs; --pairs principles trains on AI feedback and is judged on the same
val pairs and test prompts; --beta 0 is a usage error (exit 2); a malformed --train-file or --principles file
is named by file:line.

The SFT model is made once per session (the ``sft_model`` fixture of tests/chapters/conftest.py: ch3_sft's
main in-process, small sizes, from the session's smoke pretrained checkpoint) and passed with --sft, so nothing else is rebuilt.
"""
import json
import math

import pytest

from minilife import runs
from minilife.artifacts import load_pretrained
from minilife.chapters import ch4_dpo as D
from minilife.common import read_jsonl
from minilife.align.constitution import load_principles
from minilife.data.preferences import read_preferences, write_preferences

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def common(sft_model):
    return ["--smoke", "--sft", sft_model, "--n-test", "4", "--no-plots"]


@pytest.fixture(scope="module")
def smoke_run(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_smoke")
    return out, D.main(common + ["--out", str(out), "--plots"])


def run_cli(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runs.cli(D.main, D.CHAPTER, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_smoke_run_logs_accuracy_and_margins_and_writes_a_summary(smoke_run):
    out, s = smoke_run
    assert s["finished"] and s["steps"] == s["max_steps"] == 8 and s["reference"] == "copy"
    for key in ("win_rate", "tie_rate", "loss_rate", "gold_sft", "gold_dpo", "val_before", "val_after",
                "first_loss", "last_loss", "step_time_s", "n_train", "n_val", "kl_to_sft", "kl_to_sft_se"):
        assert key in s, key
    assert s["n_test"] == 4 and s["win_rate"] + s["tie_rate"] + s["loss_rate"] == pytest.approx(1.0)
    assert s["wins"] + s["ties"] + s["losses"] == 4 and s["win_rate"] == s["wins"] / 4
    assert s["pairs"] == "world" and s["principle_pairs"] is None
    assert math.isfinite(s["kl_to_sft"]) and s["kl_to_sft_se"] >= 0  # 4 prompts x 2 samples
    assert s["val_before"]["val_margin"] == pytest.approx(0.0, abs=1e-6)  # policy = reference before
    assert s["val_before"]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # DPO's loss at the reference
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r["margin"]) for r in rows)
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(math.isfinite(r["val_margin"]) and math.isfinite(r["drift_chosen"]) for r in evals)
    assert json.loads((out / "summary.json").read_text())["win_rate"] == s["win_rate"]
    for name in ("dpo_loss.png", "dpo_val.png", "model.pt", "preferences_train.jsonl"):
        assert (out / name).is_file(), name


def test_model_pt_loads_as_a_plain_gpt_with_the_chat_tokenizer(smoke_run, sft_model):
    out, s = smoke_run
    model, tok = load_pretrained(out / "model.pt")
    sft, sft_tok = load_pretrained(sft_model)
    assert s["model"] == str(out / "model.pt") and tok.special_tokens == sft_tok.special_tokens
    assert model.cfg == sft.cfg and model.num_params() == sft.num_params()


def test_lora_with_the_adapters_off_reference_runs(common, tmp_path):
    s = D.main(common + ["--out", str(tmp_path / "o"), "--lora-rank", "2", "--reference", "adapters-off",
                         "--steps", "3", "--n-test", "0"])
    assert s["finished"] and s["reference"] == "adapters-off" and s["trainable_params"] < s["total_params"]
    assert s["val_before"]["val_margin"] == pytest.approx(0.0, abs=1e-6)  # LoRA's B = 0: the policy is the base
    model, _ = load_pretrained(s["model"])  # merged into plain weights
    assert type(model.lm_head).__name__ == "Linear"


def test_principles_pairs_train_and_are_judged_on_the_worlds_val_and_test(common, smoke_run, tmp_path):
    out = tmp_path / "p"
    s = D.main(common + ["--out", str(out), "--pairs", "principles", "--steps", "3"])
    world = smoke_run[1]
    assert s["finished"] and s["pairs"] == "principles" and s["steps"] == 3
    built = s["principle_pairs"]
    assert built["samples"] == 48 * 2 and 0 < s["n_train"] <= built["pairs"]  # smoke: 48 prompts x 2 samples
    assert built["responses"] == built["clean"] + built["violating"]
    assert built["pairs"] + built["not_revised"] + built["duplicates"] == built["violating"]
    assert set(built["by_principle"]) == {p.name for p in load_principles()}
    assert 0 <= built["gold_agreement"]["agree_rate"] <= 1
    pairs, _ = read_preferences(out / "preferences_principles.jsonl")
    assert len(pairs) == built["pairs"] and all(p.kind.startswith("principles:") for p in pairs)
    assert s["val_before"] == world["val_before"] and s["n_val"] == world["n_val"]  # the same held-out pairs
    assert s["gold_sft"] == world["gold_sft"] and s["n_test"] == world["n_test"]  # the same test prompts
    assert math.isfinite(s["kl_to_sft"])


def test_a_malformed_principles_file_is_a_usage_error_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "principles.md"
    bad.write_text("## be_kind\nBe kind.\nrule: be_kind\n", encoding="utf-8")
    code, _, err = run_cli(["--smoke", "--pairs", "principles", "--principles", str(bad)], capsys)
    assert code == 2 and f"{bad}:3" in err and "no_boilerplate" in err


def test_beta_zero_is_a_usage_error_naming_the_flag(capsys):
    code, _, err = run_cli(["--smoke", "--beta", "0"], capsys)
    assert code == 2 and "--beta" in err


def test_reference_adapters_off_needs_lora(capsys):
    code, _, err = run_cli(["--smoke", "--reference", "adapters-off"], capsys)
    assert code == 2 and "--lora-rank" in err


def test_a_malformed_train_file_is_named_by_file_and_line(common, tmp_path, capsys):
    bad = tmp_path / "prefs.jsonl"
    write_preferences(bad, [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}] * 3)
    with open(bad, "a", encoding="utf-8") as fh:
        fh.write('{"prompt": "Say hi.", "chosen": "Hi!"}\n')
    code, _, err = run_cli(common + ["--out", str(tmp_path / "o"), "--train-file", str(bad)], capsys)
    assert code != 0 and f"{bad}:4" in err and "rejected" in err


def test_the_users_own_preference_file_trains(common, tmp_path):
    good = tmp_path / "prefs.jsonl"
    write_preferences(good, [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
                              "rejected": "I am not able to help with arithmetic."} for i in range(10)])
    s = D.main(common + ["--out", str(tmp_path / "o"), "--train-file", str(good), "--n-val", "3", "--steps", "2",
                         "--n-test", "0"])
    assert s["finished"] and s["n_train"] == 7 and s["n_val"] == 3
