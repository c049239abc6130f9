"""Artifacts a chapter, a notebook or a user's script needs from an earlier chapter: ensure, then load.

What it implements
- ``ensure_data`` / ``ensure_pretrained`` / ``ensure_sft`` / ``ensure_reward``: the directory of chapter
  2's tokenizer + shards, a finished pretraining checkpoint, chapter 3's fine-tuned chat model
  (``model.pt``: plain GPT weights, LoRA merged, and the tokenizer with its chat tokens), or chapter 4's
  reward model (``reward.pt``, read by ``align.reward.load_reward_model``); when missing (or unfinished) they
  run the chapter that makes it,
  as its own command (``python -m minilife.chapters.ch2_data ...``) and say so. The library never
  imports a chapter: it knows the command, not the chapter's code.
- ``load_token_data``: tokenizer + train/val token arrays of a data dir, with the vocabulary of
  shards and tokenizer checked against each other.
- ``load_pretrained``: (model, tokenizer) from a checkpoint alone. A checkpoint is portable: it
  carries the model config and the tokenizer itself (``tokenizer_state``), never a path to a data
  directory, so a copy on another machine loads and generates.

What it leaves out: downloading checkpoints, model hubs, version migration of old checkpoints.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from minilife.checkpoint import CheckpointError, read_checkpoint
from minilife.common import chapter_dir
from minilife.data.bpe import Tokenizer
from minilife.data.pack import load_tokens, read_meta
from minilife.model.transformer import GPT, ModelConfig


def run_chapter(chapter: str, args: list[str]) -> None:
    """Run ``python -m minilife.chapters.<chapter> <args>`` in a child process; raise if it fails."""
    cmd = [sys.executable, "-m", f"minilife.chapters.{chapter}", *args]
    print(f"[minilife] running: {' '.join(cmd[1:])}", flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed with exit code {code}; run it yourself to see why")


def read_summary(path: str | Path, run: str) -> dict:
    """The ``summary.json`` a chapter run wrote; missing or unreadable is an error naming the file and the run."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{path}: the run {run!r} left no readable summary ({e})") from None


def ensure_data(smoke: bool = False, data_dir: str | Path | None = None) -> Path:
    """Directory holding ``tokenizer.json`` and ``shards/``; runs ch2_data first if either is missing."""
    path = Path(data_dir) if data_dir is not None else chapter_dir("ch2_data", smoke)
    if not ((path / "tokenizer.json").is_file() and (path / "shards" / "meta.json").is_file()):
        print(f"[minilife] {path} has no tokenizer.json + shards/: building them with ch2_data")
        run_chapter("ch2_data", (["--smoke"] if smoke else []) + ["--out", str(path)])
    return path


def load_token_data(data_dir: str | Path) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """(tokenizer, train tokens, val tokens) of a ch2_data output dir; shards and tokenizer must agree."""
    data_dir = Path(data_dir)
    tokenizer, shards = Tokenizer.load(data_dir / "tokenizer.json"), data_dir / "shards"
    meta = read_meta(shards)
    if int(meta["vocab_size"]) != tokenizer.vocab_size:
        raise ValueError(f"{shards / 'meta.json'}: shards were packed with vocab_size={meta['vocab_size']} "
                         f"but {data_dir / 'tokenizer.json'} has vocab_size={tokenizer.vocab_size}; "
                         f"rebuild the data with ch2_data")
    train, val = load_tokens(shards, "train"), load_tokens(shards, "val")
    top = int(max(train.max(), val.max()))
    if top >= tokenizer.vocab_size:
        raise ValueError(f"{shards}: token id {top} >= tokenizer vocab_size {tokenizer.vocab_size}")
    return tokenizer, train, val


def ensure_pretrained(smoke: bool = False, run_dir: str | Path | None = None,
                      data_dir: str | Path | None = None) -> Path:
    """Path of a finished pretraining checkpoint (``<run_dir>/last.pt``); trains one with ch2_pretrain,
    or finishes an unfinished one with ``--resume``, when it is missing. ``data_dir`` goes on as
    ``--data-dir``."""
    out = chapter_dir("ch2_pretrain", smoke, run_dir)
    last = out / "last.pt"
    finished = last.is_file() and read_checkpoint(last)["extra"].get("finished", False)
    if not finished:
        print(f"[minilife] no finished pretrained checkpoint at {last}: "
              f"{'finishing' if last.is_file() else 'training'} one")
        run_chapter("ch2_pretrain", (["--smoke"] if smoke else []) + ["--out", str(out)]
                    + (["--resume"] if last.is_file() else []) + (["--data-dir", str(data_dir)] if data_dir else []))
    return last


def ensure_sft(smoke: bool = False, run_dir: str | Path | None = None, args: list[str] | None = None) -> Path:
    """Path of chapter 3's exported chat model (``<run_dir>/model.pt``); runs ch3_sft (with ``args``) when
    it is missing. ``load_pretrained`` reads it like any portable checkpoint."""
    out = chapter_dir("ch3_sft", smoke, run_dir)
    model_pt = out / "model.pt"
    if not model_pt.is_file():
        print(f"[minilife] no fine-tuned chat model at {model_pt}: training one with ch3_sft")
        again = ["--resume"] if (out / "last.pt").is_file() else ["--overwrite"]  # finish a run cut short
        run_chapter("ch3_sft", (["--smoke"] if smoke else []) + ["--out", str(out), *again, *(args or [])])
        if not model_pt.is_file():
            raise RuntimeError(f"ch3_sft finished without {model_pt}: only full, lora and dora runs export plain "
                               f"weights (adapters and prefixes cannot be merged)")
    return model_pt


def ensure_reward(smoke: bool = False, run_dir: str | Path | None = None, args: list[str] | None = None) -> Path:
    """Path of chapter 4's reward model (``<run_dir>/reward.pt``); runs ch4_reward (with ``args``) when it
    is missing. ``align.reward.load_reward_model`` reads it."""
    out = chapter_dir("ch4_reward", smoke, run_dir)
    reward_pt = out / "reward.pt"
    if not reward_pt.is_file():
        print(f"[minilife] no reward model at {reward_pt}: training one with ch4_reward")
        again = ["--resume"] if (out / "last.pt").is_file() else ["--overwrite"]  # finish a run cut short
        run_chapter("ch4_reward", (["--smoke"] if smoke else []) + ["--out", str(out), *again, *(args or [])])
        if not reward_pt.is_file():
            raise RuntimeError(f"ch4_reward finished without {reward_pt}; run it yourself to see why")
    return reward_pt


def load_pretrained(path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a checkpoint path or binary file object holding
    ``config["model"]`` and ``extra["tokenizer_state"]`` (what ch2_pretrain saves). RNGs are left alone."""
    state = read_checkpoint(path)
    name = getattr(path, "name", path)
    if "model" not in state["config"] or "tokenizer_state" not in state["extra"]:
        raise CheckpointError(f"{name}: carries no model config and tokenizer (config['model'], "
                              f"extra['tokenizer_state']); it was not saved by a minilife chapter")
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        model = GPT(ModelConfig(**state["config"]["model"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{name}: weights do not fit the model config it carries: {str(e)[:400]}") from None
    tokenizer = Tokenizer.from_state(state["extra"]["tokenizer_state"], source=f"{name} (tokenizer_state)")
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"{name}: its tokenizer has vocab_size {tokenizer.vocab_size} but its model "
                              f"vocab_size {model.cfg.vocab_size}")
    return model.to(device).eval(), tokenizer
