"""ch2_pretrain: the smoke run learns, its written-out step equals torch's AdamW + clipping on one big
batch, resume is bit-exact, bad checkpoints and NaN losses stop clearly, checkpoints are portable.

Reference for "resume is exact": the uninterrupted run with the same flags. CPU float32 kernels are
deterministic for a fixed thread count, so the comparison is bitwise (tolerance 0). Crashes and
blow-ups are injected through ``main``'s test hook, not through flags.
"""
import hashlib
import json
import math
import signal

import pytest
import torch

import torch.nn.functional as F

from minilife.artifacts import ensure_pretrained, load_pretrained, load_token_data
from minilife.chapters import ch2_pretrain as P
from minilife.checkpoint import CheckpointError, NonFiniteLossError, load_checkpoint, read_checkpoint
from minilife.common import UsageError, read_jsonl
from minilife.runs import RunInterrupted
from minilife.model.transformer import GPT, ModelConfig
from minilife.train import IGNORE_INDEX, BatchSource

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--smoke", "--sample-tokens", "4", "--eval-batches", "2", "--no-plots"]


@pytest.fixture(scope="module")
def smoke_run(smoke_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_smoke")
    summary = P.main(FAST + ["--plots", "--data-dir", smoke_data_dir, "--out", str(out)])
    return out, summary


def weights(path):
    return read_checkpoint(path)["model"]


class Crash(Exception):
    """What the test hook raises to kill a run."""


def crash_at(stop: int):
    """A hook that kills the run when step ``stop`` is about to start (steps 0..stop-1 are done)."""
    def hook(step, model):
        if step == stop:
            raise Crash(f"killed before step {stop}")
    return hook


def run_until(argv, stop):
    with pytest.raises(Crash):
        P.main(argv, hook=crash_at(stop))


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        P.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--objective", "--precision", "--grad-accum", "--resume", "--data-dir", "--threads"):
        assert flag in text
    assert "(default: 500; --smoke: 30)" in text  # the real default and the smoke value, from one field
    assert "nan" not in text.lower() and "stop-after" not in text  # fault injection is no flag


def test_written_out_step_equals_torch_adamw_on_one_big_batch(smoke_data_dir, tmp_path):
    """Three steps of 2 accumulated micro-batches against an independent reference: the two micro-batches
    concatenated through F.cross_entropy (mean over scored tokens), torch's clip_grad_norm_ and
    torch.optim.AdamW, with the chapter's own LR schedule values. float32: AdamW normalises each update
    to ~lr, so differing summation orders leave ~1e-6 in the weights after 3 steps; 2e-5 bounds it."""
    P.main(FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--max-steps", "3", "--grad-accum", "2",
                   "--eval-every", "3", "--ckpt-every", "3", "--grad-clip", "0.5"])
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    cfg = P.PretrainConfig(smoke=True, n_layer=2, n_head=2, n_embd=64, context_length=64, batch_size=8)
    tokenizer, train, _ = load_token_data(smoke_data_dir)
    torch.manual_seed(cfg.seed)  # start_run seeds, then the model is the first thing drawn
    ref = P.build_model(cfg, tokenizer.vocab_size)
    opt = torch.optim.AdamW(ref.param_groups(0.1), lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    src = BatchSource(train, 8, 64, seed=cfg.seed)
    for step, row in enumerate(rows):
        micro = [src.micro_batch(2 * step + i) for i in range(2)]
        inputs, targets = torch.cat([m.inputs for m in micro]), torch.cat([m.targets for m in micro])  # (16, T)
        logits, _ = ref(inputs)  # (16, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)  # (16*T, V)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
        for g in opt.param_groups:
            g["lr"] = row["lr"]
        opt.step()
        opt.zero_grad()
        assert row["loss"] == pytest.approx(loss.item(), rel=1e-5) and row["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 0.5  # clipping really acted
    ours = weights(tmp_path / "last.pt")
    assert max(float((ours[k] - v).abs().max()) for k, v in ref.state_dict().items()) < 2e-5


def test_smoke_run_learns_and_writes_artifacts(smoke_run):
    out, summary = smoke_run
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == summary["max_steps"] == summary["steps"]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    # an untrained model sits near ln V; 30 steps at LR 3e-3 must take off clearly more than batch noise (~0.1)
    assert first - last > 0.3, (first, last)
    assert abs(first - summary["uniform_entropy"]) < 0.5  # init with std 0.02 gives ~uniform predictions
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < summary["uniform_entropy"]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in rows)
    for name in ("loss.png", "lr.png", "grad_norm.png", "summary.json", "last.pt"):
        assert (out / name).is_file(), name
    assert summary["finished"] and len(summary["samples"]) == 2


def test_ensure_pretrained_reuses_a_finished_run_and_its_checkpoint_is_portable(smoke_run, smoke_data_dir, tmp_path):
    out, _ = smoke_run
    before = (out / "last.pt").stat().st_mtime_ns
    path = ensure_pretrained(smoke=True, run_dir=out, data_dir=smoke_data_dir)
    assert path == out / "last.pt" and path.stat().st_mtime_ns == before  # nothing retrained
    moved = tmp_path / "model.pt"
    moved.write_bytes(path.read_bytes())  # another directory; the checkpoint must need nothing else
    model, tok = load_pretrained(moved)
    assert model.cfg.vocab_size == tok.vocab_size
    sd = weights(path)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert tok.decode(tok.encode("From: the wiki")) == "From: the wiki"


def test_resume_is_bitwise_identical(smoke_data_dir, tmp_path):
    common = FAST + ["--data-dir", smoke_data_dir, "--max-steps", "8", "--ckpt-every", "4", "--eval-every", "4",
                     "--dropout", "0.1"]  # dropout: the restored RNG state matters too
    P.main(common + ["--out", str(tmp_path / "straight")])
    run_until(common + ["--out", str(tmp_path / "killed")], 4)
    assert read_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 4
    P.main(common + ["--out", str(tmp_path / "killed"), "--resume"])
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "killed" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tolerance 0
    la = [r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert la == lb and len(la) == 8


def test_resume_without_a_run_or_with_only_corrupt_checkpoints_is_clear(smoke_data_dir, tmp_path):
    with pytest.raises(UsageError, match="holds no run"):
        P.main(FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--resume"])
    P.main(FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--max-steps", "2", "--ckpt-every", "2",
                   "--eval-every", "2"])
    newest = tmp_path / "ckpt_step000002.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # truncated, as by a crash outside our atomic save
    with pytest.raises(CheckpointError, match="no intact checkpoint.*ckpt_step000002.pt"):
        P.main(FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--max-steps", "2", "--resume"])


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(smoke_data_dir, tmp_path, capsys):
    common = FAST + ["--data-dir", smoke_data_dir, "--max-steps", "6", "--ckpt-every", "2", "--eval-every", "6",
                     "--keep-checkpoints", "3"]
    P.main(common + ["--out", str(tmp_path / "straight")])
    run_until(common + ["--out", str(tmp_path / "r")], 4)
    newest = tmp_path / "r" / "ckpt_step000004.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short (last.pt is the same file, so it is too)
    capsys.readouterr()
    P.main(common + ["--out", str(tmp_path / "r"), "--resume"])
    out = capsys.readouterr().out
    assert "ckpt_step000004.pt" in out and "resumed from" in out and "ckpt_step000002.pt" in out
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "r" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3-4 redone exactly


def test_flipped_bytes_in_a_checkpoint_are_caught_by_its_checksums(smoke_data_dir, tmp_path):
    common = FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--max-steps", "2", "--ckpt-every", "2",
                     "--eval-every", "2"]
    P.main(common)
    path = tmp_path / "ckpt_step000002.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit inside the stored tensors
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32"):
        P.main(common + ["--resume"])


def test_a_fresh_run_refuses_a_used_directory_and_overwrite_clears_it(smoke_data_dir, tmp_path):
    """The old bug: a fresh short run into a directory of a longer one kept the old run's higher-step
    checkpoints and metrics, and --resume then continued the *old* run."""
    common = FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--ckpt-every", "2", "--eval-every", "2"]
    P.main(common + ["--max-steps", "6"])
    with pytest.raises(UsageError, match="already holds a run.*--overwrite"):
        P.main(common + ["--max-steps", "2", "--seed", "7"])
    run_until(common + ["--max-steps", "4", "--seed", "7", "--overwrite"], 2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt")) == ["ckpt_step000002.pt"]  # old run gone
    s = P.main(common + ["--max-steps", "4", "--seed", "7", "--resume"])
    rows = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert rows == [1, 2, 3, 4] and s["steps"] == 4 and s["config"]["seed"] == 7


def test_resume_refuses_changed_settings_unless_allowed(smoke_data_dir, tmp_path):
    common = FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--ckpt-every", "2", "--eval-every", "2"]
    run_until(common + ["--max-steps", "4"], 2)
    with pytest.raises(UsageError) as e:
        P.main(common + ["--max-steps", "4", "--resume", "--seed", "3", "--lr", "1e-3", "--batch-size", "4"])
    for field in ("--seed", "--lr", "--batch-size"):
        assert field in str(e.value)
    with pytest.raises(UsageError, match="--max-steps: checkpoint 4, now 6"):
        P.main(common + ["--max-steps", "6", "--resume", "--warmup-steps", "1"])
    s = P.main(common + ["--max-steps", "6", "--resume", "--warmup-steps", "1", "--allow-change", "max-steps",
                         "--eval-every", "3"])  # where output goes and how often it evaluates never count
    assert s["steps"] == 6 and s["finished"]


def test_ctrl_c_saves_a_checkpoint_and_the_summary_and_resume_is_exact(smoke_data_dir, tmp_path):
    common = FAST + ["--data-dir", smoke_data_dir, "--max-steps", "6", "--ckpt-every", "100", "--eval-every", "3",
                     "--dropout", "0.1"]

    def ctrl_c(step, model):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step: the step finishes first

    with pytest.raises(RunInterrupted, match="after step 3 of 6") as e:
        P.main(common + ["--out", str(tmp_path / "r")], hook=ctrl_c)
    assert str(e.value).endswith(" ".join(common + ["--out", str(tmp_path / "r"), "--resume"]))  # the same flags
    assert read_checkpoint(tmp_path / "r" / "last.pt")["step"] == 3  # saved although ckpt_every is 100
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["finished"] is False
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    P.main(common + ["--out", str(tmp_path / "r"), "--resume"])
    P.main(common + ["--out", str(tmp_path / "straight")])
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "r" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["torn", "deleted"])
def test_a_damaged_metrics_log_does_not_block_resume(smoke_data_dir, tmp_path, capsys, damage):
    common = FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--max-steps", "4", "--ckpt-every", "2",
                     "--eval-every", "2"]
    run_until(common, 3)  # the log holds steps 1-3, the checkpoint step 2
    log = tmp_path / "metrics.jsonl"
    if damage == "torn":
        log.write_text(log.read_text() + '{"step": 4, "lo')
    else:
        log.unlink()
    capsys.readouterr()
    P.main(common + ["--resume"])
    assert ("unreadable line" if damage == "torn" else "was missing") in capsys.readouterr().out
    steps = [r["step"] for r in read_jsonl(log) if "loss" in r]
    assert steps == ([1, 2, 3, 4] if damage == "torn" else [3, 4])


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(smoke_data_dir, tmp_path):
    common = FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--max-steps", "10", "--ckpt-every", "2",
                     "--eval-every", "10"]
    run_until(common, 4)
    good, last = tmp_path / "ckpt_step000004.pt", tmp_path / "last.pt"
    digest = hashlib.sha256(good.read_bytes()).hexdigest()

    def blow_up(step, model):
        if step == 5:
            with torch.no_grad():
                model.norm_f.weight.fill_(float("nan"))  # every logit, hence the loss, turns NaN

    with pytest.raises(NonFiniteLossError) as e:
        P.main(common + ["--resume"], hook=blow_up)
    msg = str(e.value)
    assert "step 5" in msg and str(good) in msg
    assert hashlib.sha256(good.read_bytes()).hexdigest() == digest  # untouched
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest  # last.pt still points at it
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt"))[-1] == good.name
    model = GPT(ModelConfig(**read_checkpoint(last)["config"]["model"]))
    assert load_checkpoint(last, model=model)["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("objective", ["prefix", "mlm"])
def test_other_objectives_train(smoke_data_dir, tmp_path, objective):
    s = P.main(FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--objective", objective,
                       "--max-steps", "6", "--eval-every", "6", "--ckpt-every", "6"])
    assert s["objective"] == objective and math.isfinite(s["val_loss"])
    assert s["last_loss"] < s["first_loss"]  # 6 steps at warmup LR already move an untrained model
    assert (s["samples"] == []) == (objective == "mlm")


def test_bf16_autocast_step_runs(smoke_run, smoke_data_dir, tmp_path):
    s = P.main(FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--precision", "bf16",
                       "--max-steps", "3", "--eval-every", "3", "--ckpt-every", "3"])
    assert math.isfinite(s["val_loss"])
    # step 0's loss is the same init on the same micro-batch 0 as the fp32 smoke run (the LR plays no part
    # yet), so the two differ only by bf16 autocast: it must change the loss (the flag takes effect), by
    # bf16 rounding alone -- relative 2^-9 on init logits of size ~0.1 is <= ~2e-4 nats per token, and the
    # mean over 512 tokens shrinks it further (measured ~6e-6); 1e-3 bounds it with margin
    fp32_first = smoke_run[1]["first_loss"]
    assert s["first_loss"] != fp32_first
    assert abs(s["first_loss"] - fp32_first) < 1e-3


@pytest.mark.parametrize("flags, named", [
    (["--max-steps", "-5"], "--max-steps"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--max-steps", "10", "--warmup-steps", "20"], "--warmup-steps"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--beta2", "1.0"], "--beta2"),
    (["--threads", "-1"], "--threads"),
    (["--allow-change", "max_step"], "--allow-change max_step: no such setting"),
    (["--preset", "huge"], "--preset"),
])
def test_nonsense_flags_are_usage_errors_naming_the_flag(flags, named, usage_error):
    assert named in usage_error(P.main, ["--smoke"] + flags)


def test_resume_into_a_different_model_names_the_field(smoke_data_dir, tmp_path):
    common = FAST + ["--data-dir", smoke_data_dir, "--out", str(tmp_path), "--max-steps", "4", "--eval-every", "2"]
    run_until(common + ["--ckpt-every", "2"], 2)
    with pytest.raises(CheckpointError, match="n_embd"):  # the checkpoint is C=64 (smoke); this run asks for 32
        P.main(common + ["--resume", "--n-embd", "32"])
