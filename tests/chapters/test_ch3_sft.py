"""ch3_sft: a smoke run scores base and SFT, exports a loadable chat model and the shadowing set; every
method trains and exports what it can; resume is bitwise; bad inputs end in one line naming the culprit;
the user's own chat JSONL and the general-text mix run.

Every run starts from the session's smoke pretrained checkpoint (``--pretrained``) and smoke data
(``--data-dir``), so nothing is rebuilt. The smoke model's context is 64 tokens, so most shadowing
conversations are cut away (the chapter reports it); the tests need only that some are kept.
"""
import json
import math
import signal

import pytest
import torch

from minilife import runs
from minilife.align.chat import ROLES, add_chat_tokens, chat_token_ids
from minilife.align.sft import read_chat_jsonl, write_chat_jsonl
from minilife.artifacts import load_pretrained
from minilife.chapters import ch3_sft as S
from minilife.checkpoint import load_checkpoint, read_checkpoint
from minilife.common import UsageError, read_jsonl
from minilife.data.shadowing import ALL_TASKS
from minilife.model.finetune import apply_method
from minilife.runs import RunInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--smoke", "--n-train", "40", "--n-val", "15", "--n-test", "8"]
QUIET = ["--no-generate", "--no-base-eval", "--no-plots"]  # losses only: the training tests need no answers


@pytest.fixture(scope="module")
def common(smoke_data_dir, smoke_pretrained):
    return FAST + ["--data-dir", smoke_data_dir, "--pretrained", smoke_pretrained]


@pytest.fixture(scope="module")
def smoke_run(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_smoke")
    return out, S.main(common + ["--out", str(out)])


@pytest.fixture(scope="module")
def short(common):
    """A 6-step full fine-tuning run's flags (batch 4, 2 epochs over the kept conversations)."""
    return common + QUIET + ["--batch-size", "4", "--epochs", "2", "--ckpt-every", "2", "--eval-every", "3"]


@pytest.fixture(scope="module")
def straight(short, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_straight")
    return out, S.main(short + ["--out", str(out)])


def weights(path):
    return read_checkpoint(path)["model"]


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of the chapter's command."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runs.cli(S.main, S.CHAPTER, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


class Crash(Exception):
    """What the test hook raises to kill a run."""


def crash_at(stop):
    def hook(step, model):
        if step == stop:
            raise Crash(f"killed before step {stop}")
    return hook


def chat_file(path, n=12, extra_lines=()):
    """n short chat conversations (they fit the smoke context) as JSONL, then ``extra_lines`` verbatim."""
    convs = [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
             for i in range(n)]
    write_chat_jsonl(path, convs)
    if extra_lines:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(extra_lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# the smoke run


def test_smoke_run_scores_base_and_sft_and_reports_retention(smoke_run):
    out, s = smoke_run
    assert s["finished"] and s["steps"] == s["max_steps"] >= 1 and s["method"] == "full fine-tuning"
    for name in ("base", "sft"):  # the checker's scores on the 8 held-out test tasks, before and after
        scores = s[name]
        assert scores["n"] == 8 and set(scores["by_task"]) <= set(ALL_TASKS)
        assert sum(t["n"] for t in scores["by_task"].values()) == 8
        assert all(0.0 <= scores[k] <= 1.0 for k in ("format_ok", "exact", "score"))
    assert s["retention_pct"] == pytest.approx(100.0 * s["general_loss_before"] / s["general_loss_after"])
    assert s["trainable_params"] == s["total_params"] > 0  # full fine-tuning: everything
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["val_loss"])
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, s["steps"] + 1))
    assert s["last_loss"] == rows[-1]["loss"] and "general_loss" in rows[-1]
    assert json.loads((out / "summary.json").read_text())["retention_pct"] == s["retention_pct"]
    for name in ("loss.png", "mask.html", "last.pt", "model.pt"):
        assert (out / name).is_file(), name
    assert "trained" in (out / "mask.html").read_text()


def test_model_pt_is_the_trained_chat_model_with_its_tokenizer(smoke_run, smoke_pretrained):
    out, s = smoke_run
    base, base_tok = load_pretrained(smoke_pretrained)
    model, tok = load_pretrained(out / "model.pt")
    assert s["model"] == str(out / "model.pt")
    V = base.cfg.vocab_size
    ids = chat_token_ids(tok)
    assert sorted(ids[1:]) == list(range(V, V + 4))  # system, user, assistant, end: new ids after the base's
    assert ids.bos == base_tok.special_tokens["<|endoftext|>"]
    assert model.cfg.vocab_size == tok.vocab_size == V + 4
    trained = weights(out / "last.pt")  # full fine-tuning exports the model itself
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.tok_emb.weight[:V], base.tok_emb.weight)  # it trained


def test_shadowing_set_is_written_as_readable_chat_jsonl(smoke_run):
    out, _ = smoke_run
    sizes = {}
    for split in ("train", "val", "test"):
        convs, skipped = read_chat_jsonl(out / f"shadowing_{split}.jsonl")
        assert skipped == 0 and all(m["role"] in ROLES for c in convs for m in c)
        assert all(c[-1]["role"] == "assistant" for c in convs)
        sizes[split] = len(convs)
    assert sizes == {"train": 40, "val": 15, "test": 8}


# --------------------------------------------------------------------------------------------
# methods


@pytest.mark.parametrize("method", ["lora", "dora", "adapter",
                                    "prefix"])
def test_each_method_trains_a_part_and_exports_what_a_plain_gpt_can_hold(common, smoke_pretrained, tmp_path, method):
    s = S.main(common + QUIET + ["--out", str(tmp_path), "--method", method, "--lora-rank", "2"])
    assert s["finished"] and 0 < s["trainable_params"] < s["total_params"]
    assert s["method"].endswith(" + 256 new-token embedding values")  # 4 chat tokens x C=64
    assert (tmp_path / "model.pt").is_file() == (method in ("lora", "dora"))
    assert s["model"] == (str(tmp_path / "model.pt") if method in ("lora", "dora") else None)
    if method not in ("lora", "dora"):
        return
    # model.pt computes what the adapted model of last.pt computes
    plain, tok = load_pretrained(tmp_path / "model.pt")
    adapted, base_tok = load_pretrained(smoke_pretrained)
    V = adapted.cfg.vocab_size
    base_emb = adapted.tok_emb.weight.detach().clone()
    adapted, _ = add_chat_tokens(adapted, base_tok)
    apply_method(adapted, method, rank=2, alpha=4.0, targets=s["config"]["lora_targets"].split(), first_new_id=V)
    load_checkpoint(tmp_path / "last.pt", model=adapted)
    x = torch.randint(0, V + 4, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted.eval()(x)[0], plain(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(plain.tok_emb.weight[:V], base_emb)  # frozen: the old rows bit for bit
    assert not torch.equal(plain.tok_emb.weight[V:], base_emb.mean(0).expand(4, -1))  # the new rows trained


# --------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_after_a_crash_reaches_the_same_weights(short, straight, tmp_path, method):
    flags = short + ["--method", method]
    if method == "full":
        ref_dir, ref = straight
    else:
        ref_dir = tmp_path / "straight"
        ref = S.main(flags + ["--out", str(ref_dir)])
    assert ref["max_steps"] >= 4
    with pytest.raises(Crash):
        S.main(flags + ["--out", str(tmp_path / "r")], hook=crash_at(3))  # steps 0-2 done, checkpoint at 2
    assert read_checkpoint(tmp_path / "r" / "last.pt")["step"] == 2
    s = S.main(flags + ["--out", str(tmp_path / "r"), "--resume"])
    assert s["finished"] and s["steps"] == ref["steps"]
    a, b = weights(ref_dir / "last.pt"), weights(tmp_path / "r" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tolerance 0
    la = [r["loss"] for r in read_jsonl(ref_dir / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r]
    assert la == lb
    assert all(torch.equal(v, weights(ref_dir / "model.pt")[k]) for k, v in weights(tmp_path / "r" / "model.pt").items())


def test_grad_accum_of_two_half_batches_equals_the_whole_batch(short, straight, tmp_path):
    """The step's conversations are the same 4 either way; every micro-batch's loss sum is divided by the
    trained tokens of the whole step, so the gradient is the same token mean (up to float32 summation
    order: AdamW normalises each update to ~lr, so the weights agree to ~1e-6 after 6 steps)."""
    ref_dir, _ = straight
    S.main(short + ["--out", str(tmp_path), "--batch-size", "2", "--grad-accum", "2"])
    a = [r for r in read_jsonl(ref_dir / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["trained_tokens"] for r in a] == [r["trained_tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5) and rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    wa, wb = weights(ref_dir / "last.pt"), weights(tmp_path / "last.pt")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 2e-5


def test_ctrl_c_saves_the_step_and_writes_no_model_until_finished(short, straight, tmp_path):
    def ctrl_c(step, model):
        if step == 1:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step: the step finishes first

    with pytest.raises(RunInterrupted, match="after step 2 of .*--resume"):
        S.main(short + ["--out", str(tmp_path)], hook=ctrl_c)
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] is False and summary["model"] is None and not (tmp_path / "model.pt").exists()
    S.main(short + ["--out", str(tmp_path), "--resume"])
    a, b = weights(straight[0] / "model.pt"), weights(tmp_path / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_method(short, tmp_path):
    with pytest.raises(Crash):
        S.main(short + ["--out", str(tmp_path), "--method", "lora"], hook=crash_at(3))
    with pytest.raises(ValueError, match="method|lora"):
        S.main(short + ["--out", str(tmp_path), "--method", "dora", "--resume"])


# --------------------------------------------------------------------------------------------
# bad input through the command


def test_a_malformed_train_file_line_is_named_by_file_and_line(common, tmp_path, capsys):
    bad = chat_file(tmp_path / "chat.jsonl", extra_lines=['{"messages": [{"role": "user", "content": "hi"}'])
    code, _, err = run_cli(common + ["--out", str(tmp_path / "o"), "--train-file", str(bad)], capsys)
    assert code == 1 and err.count("\n") == 1 and f"{bad}:13: not valid JSON" in err


def test_skip_bad_skips_and_counts_the_bad_lines(common, tmp_path, capsys):
    bad = chat_file(tmp_path / "chat.jsonl", extra_lines=["not json", '{"messages": []}'])
    capsys.readouterr()
    s = S.main(common + QUIET + ["--out", str(tmp_path / "o"), "--train-file", str(bad), "--skip-bad"])
    assert f"{bad}: 12 conversations, 2 bad lines skipped" in capsys.readouterr().out
    assert s["finished"]


@pytest.mark.parametrize("line, says", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', ":13: no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
     ":13: message 1: unknown role 'bot'"),
])
def test_a_bad_conversation_is_named_by_file_and_line(common, tmp_path, capsys, line, says):
    bad = chat_file(tmp_path / "chat.jsonl", extra_lines=[line])
    code, _, err = run_cli(common + ["--out", str(tmp_path / "o"), "--train-file", str(bad)], capsys)
    assert code == 1 and err.count("\n") == 1 and f"{bad}{says}" in err


def test_a_val_file_is_checked_too(common, tmp_path, capsys):
    good, bad = chat_file(tmp_path / "train.jsonl"), chat_file(tmp_path / "val.jsonl", n=2, extra_lines=["[]"])
    code, _, err = run_cli(common + ["--out", str(tmp_path / "o"), "--train-file", str(good), "--val-file", str(bad)],
                           capsys)
    assert code == 1 and f"{bad}:3:" in err


def test_lora_targets_matching_no_layer_name_the_pattern(common, tmp_path, capsys):
    code, _, err = run_cli(common + QUIET + ["--out", str(tmp_path), "--method", "lora", "--lora-targets",
                                             "attn.qkv mlp.*"], capsys)
    assert code in (1, 2) and err.count("\n") == 1 and "'mlp.*' matches no nn.Linear" in err


@pytest.mark.parametrize("flags, named", [
    (["--method", "qlora"], "--method 'qlora'"),
    (["--task-weights", "summary=2,poetry=1"], "unknown task 'poetry'"),
    (["--task-weights", "summary=lots"], "'summary=lots' is not task=number"),
    (["--task-weights", "summary=-1"], "summary must be >= 0"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--warmup-frac", "1"], "--warmup-frac"),
])
def test_nonsense_flags_are_usage_errors_naming_the_flag(flags, named, usage_error):
    assert named in usage_error(S.main, ["--smoke"] + flags)


def test_task_weights_of_zero_everywhere_is_a_usage_error(common, tmp_path, capsys):
    zero = ",".join(f"{t}=0" for t in ALL_TASKS)
    code, _, err = run_cli(common + QUIET + ["--out", str(tmp_path), "--task-weights", zero], capsys)
    assert code == 2 and "every training conversation has weight 0" in err


def test_parse_task_weights_and_sample_weights():
    assert S.parse_task_weights(" summary=2, refuse=0.5 ,") == {"summary": 2.0, "refuse": 0.5}
    assert S.parse_task_weights("") == {}
    probs = S.sample_weights(["summary", "refuse", None, "reply"], {"summary": 2.0, "refuse": 0.0})
    assert probs.tolist() == [0.5, 0.0, 0.25, 0.25]  # None (the user's own file) and unnamed tasks weigh 1
    with pytest.raises(UsageError):
        S.sample_weights(["refuse"], {"refuse": 0.0})


def test_goals_read_the_scores():
    scores = {"format_ok": 0.97, "refusal_rate": 1.0, "over_refusal_rate": 0.1,
              "by_task": {"action_items": {"exact": 0.6}, "date_json": {"exact": 1.0}, "summary": {"exact": 0.0}}}
    g = S.goals(scores)
    assert g["format_validity"] == (0.95, 0.97) and g["extraction_exact"] == (0.80, 0.8)
    assert g["refusal_rate"] == (0.95, 1.0) and g["over_refusal"] == (0.05, 0.1)
    assert S.goals({"format_ok": 0.0, "by_task": {}})["extraction_exact"] == (0.80, None)


# --------------------------------------------------------------------------------------------
# the user's own data, the general mix


def test_own_chat_jsonl_trains_without_test_tasks(common, tmp_path):
    train, val = chat_file(tmp_path / "train.jsonl"), chat_file(tmp_path / "val.jsonl", n=3)
    s = S.main(common + ["--out", str(tmp_path / "o"), "--train-file", str(train), "--val-file", str(val),
                         "--batch-size", "4"])
    assert s["finished"] and s["max_steps"] == 3  # 12 conversations / 4, one epoch
    assert s["base"] == {} and s["sft"] == {}  # no test tasks: nothing to score
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"]) and math.isfinite(s["val_loss"])
    assert not list((tmp_path / "o").glob("shadowing_*.jsonl"))
    assert (tmp_path / "o" / "model.pt").is_file()
    no_val = S.main(common + QUIET + ["--out", str(tmp_path / "p"), "--train-file", str(train)])
    assert no_val["val_loss"] is None and math.isfinite(no_val["last_loss"])


def test_general_mix_runs_and_changes_the_training(short, straight, tmp_path):
    s = S.main(short + ["--out", str(tmp_path), "--general-mix", "0.5"])
    ref_dir, ref = straight
    assert s["finished"] and s["first_loss"] == ref["first_loss"]  # the logged loss is the SFT loss alone
    a, b = weights(ref_dir / "last.pt"), weights(tmp_path / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the general text's gradient moved the weights
    assert s["config"]["general_mix"] == 0.5


@pytest.mark.parametrize("empty", ["--n-test", "--n-val"])
def test_an_empty_test_or_val_split_is_allowed(short, tmp_path, empty):
    s = S.main(short + ["--out", str(tmp_path), empty, "0"])
    assert s["finished"] and s["sft"] == {}
