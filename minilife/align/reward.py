"""The reward model: a language model with a scalar head, trained on preference pairs with the
Bradley-Terry loss.

What it implements
- ``RewardModel``: a GPT trunk (``GPT.hidden``) and a head Linear(C, 1) read at each row's LAST REAL
  token, so a reward does not depend on the padding side or on the other rows of the batch (causal
  attention: that token has seen the whole prompt and response). ``RewardModel.from_gpt`` copies a
  pretrained/SFT GPT, as InstructGPT's reward model starts from the SFT model (Ouyang et al. 2022, sec. 3.5).
  The head starts at N(0, 1 / (C + 1)) with bias 0, the scale of Ziegler et al. 2019's reward head.
- ``last_token_index``: the position of each row's last real token (also where a value head or a
  sequence score is read).
- ``bradley_terry_loss``: with d = r_chosen - r_rejected,
      loss = mean_i(-log sigmoid(d_i - m_i)) + c * mean_i((r_chosen_i + r_rejected_i)^2)
  The first term is the negative log-likelihood of the Bradley-Terry model P(chosen > rejected) =
  sigmoid(d) (Bradley & Terry 1952; InstructGPT eq. 1); the margin m asks for d > m, Llama 2's
  margin term (Touvron et al. 2023, eq. 2); the second term, with coefficient c, pulls the pair's
  rewards toward zero sum (reward centring, the auxiliary loss of Eisenstein et al. 2023). Also the
  pairwise accuracy: the share of pairs with r_chosen > r_rejected (a tie counts half).
- ``check_same_tokenizer``: a reward model scores token ids, so it must share the policy's tokenizer.
- ``end_at_response``: an encoded preference pair cut after each side's last response token (the
  assistant's closing <|end|>), dropping the template's trailing newline, so the reward is read at the
  token a sampled rollout (``align.rollout``) ends with: training and scoring read the same position.
- ``gold_agreement``: how well rewards order answers the way a gold scorer does: the pairwise agreement
  over pairs of answers to the same prompt whose gold scores differ (a reward tie counts half), and the
  Spearman (ties: average ranks) and Pearson correlations over all answers.
- ``save_reward_model`` / ``load_reward_model``: the portable reward-model file PPO and GRPO load
  (``reward.pt``: trunk config, trunk + head weights with LoRA merged, the tokenizer, ``kind`` =
  "reward_model", and free-form extras such as the reward's mean/std on SFT samples).
- ``load_policy_reward``: the reward model an RL chapter scores a policy with: loaded, its tokenizer
  checked against the policy's, and the (mean, std) that normalise its score (``policy.rollout_rewards``):
  reward.pt's ``reward_mean``/``reward_std``, else measured on answers sampled from the SFT model.

What it leaves out: ensembles, per-token (process) rewards, and the training loop (the chapter).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilife.align.logprobs import last_token_index
from minilife.align.pairs import EncodedPair
from minilife.align.rollout import sample_rollouts
from minilife.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from minilife.data.bpe import Tokenizer
from minilife.model.transformer import GPT, ModelConfig

__all__ = ["BTLoss", "REWARD_KIND", "RewardModel", "bradley_terry_loss", "check_same_tokenizer", "end_at_response",
           "gold_agreement", "last_token_index", "load_reward_model", "preference_accuracy", "save_reward_model"]

REWARD_KIND = "reward_model"  # extra["kind"] of a reward.pt


class RewardModel(nn.Module):
    """A GPT trunk and a scalar head: (idx (B, T), padding_mask (B, T)) -> rewards (B,)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        if not hasattr(body, "hidden") or not hasattr(body, "cfg"):
            raise TypeError(f"RewardModel: body must be a GPT (with .hidden and .cfg), got {type(body).__name__}")
        self.body = body
        C = body.cfg.n_embd
        self.head = nn.Linear(C, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(C + 1))
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt: nn.Module) -> "RewardModel":
        """A reward model whose trunk is a deep copy of ``gpt`` (e.g. the SFT model): training it
        leaves ``gpt`` untouched. The copy keeps its LM head, unused here (tied to the embedding by default)."""
        return cls(copy.deepcopy(gpt))

    def forward(self, idx: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) long; padding_mask (B, T) bool, True = real token (None: all real).
        Returns rewards (B,): the head applied to the final hidden state at each row's last real token."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        B, T = idx.shape
        if padding_mask is None:
            padding_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        elif padding_mask.shape != idx.shape:
            raise ValueError(f"padding_mask must have idx's shape {tuple(idx.shape)}, got {tuple(padding_mask.shape)}")
        last = last_token_index(padding_mask)  # (B,)
        h = self.body.hidden(idx, padding_mask=padding_mask)  # (B, T, C)
        h_last = h[torch.arange(B, device=h.device), last]  # (B, C)
        return self.head(h_last).squeeze(-1)  # (B, 1) -> (B,)


class BTLoss(NamedTuple):
    """``bradley_terry_loss``'s result: loss (scalar, differentiable), accuracy (scalar, no grad)."""
    loss: torch.Tensor
    accuracy: torch.Tensor


def _check_pair(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> None:
    for name, r in (("r_chosen", r_chosen), ("r_rejected", r_rejected)):
        if not isinstance(r, torch.Tensor) or r.dim() != 1 or not r.is_floating_point() or r.numel() == 0:
            got = f"{r.dtype} {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"{name} must be a non-empty floating tensor (B,), got {got}")
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must have "
                         f"the same shape (B,): one reward per pair")


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs (B,) with r_chosen > r_rejected, a tie counting 1/2 (an untrained constant
    reward scores 0.5, chance). Returns a float scalar without grad."""
    _check_pair(r_chosen, r_rejected)
    with torch.no_grad():
        wins = (r_chosen > r_rejected).double() + 0.5 * (r_chosen == r_rejected).double()  # (B,)
        return wins.mean().float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0,
                       center_coef: float = 0.0) -> BTLoss:
    """The reward model's pairwise loss (formula in the module docstring). r_chosen, r_rejected (B,)
    float; margin a float or (B,) tensor (how much better chosen must be, in reward units); center_coef
    >= 0. Computed in float32 or wider. Returns BTLoss(loss, accuracy)."""
    _check_pair(r_chosen, r_rejected)
    if isinstance(center_coef, bool) or not isinstance(center_coef, (int, float)) or not 0 <= center_coef < math.inf:
        raise ValueError(f"center_coef must be a finite number >= 0, got {center_coef!r}")
    dtype = torch.promote_types(r_chosen.dtype, torch.float32)
    rc, rr = r_chosen.to(dtype), r_rejected.to(dtype)
    if isinstance(margin, torch.Tensor):
        if margin.shape not in ((), r_chosen.shape):
            raise ValueError(f"margin must be a float or a tensor of shape {tuple(r_chosen.shape)} (one per pair), "
                             f"got {tuple(margin.shape)}")
        if not bool(torch.isfinite(margin).all()):
            raise ValueError("margin must be finite")
        margin = margin.to(device=rc.device, dtype=dtype).detach()
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite float or a (B,) tensor, got {margin!r}")
    # exercise: bradley_terry
    nll = -F.logsigmoid(rc - rr - margin).mean()
    loss = nll + center_coef * (rc + rr).pow(2).mean() if center_coef else nll
    # end exercise: bradley_terry
    return BTLoss(loss, preference_accuracy(r_chosen, r_rejected))


def end_at_response(pair: EncodedPair) -> EncodedPair:
    """``pair`` with each side's ids (T,) and response mask (T,) cut after its last response token."""
    def cut(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = int(mask.nonzero().max()) + 1 if mask.any() else len(ids)  # one past the last response token
        return ids[:end], mask[:end]
    return EncodedPair(*cut(pair.chosen_ids, pair.chosen_mask), *cut(pair.rejected_ids, pair.rejected_mask),
                       pair.truncated, pair.pair)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(N,) float64 -> (N,) ranks 0..N-1, tied values sharing the mean of their ranks."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)  # values sorted
    first = torch.cumsum(counts, 0) - counts  # (U,) rank of each distinct value's first occurrence
    return (first + (counts - 1) / 2).double()[inverse]


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x - x.mean(), y - y.mean()
    denom = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else None  # a constant side has no correlation


def gold_agreement(rewards: torch.Tensor, gold: torch.Tensor, groups: torch.Tensor) -> dict:
    """rewards, gold (N,) float, groups (N,) long (the prompt each answer answers). Returns {"pairs": the
    number of same-prompt pairs whose gold scores differ, "agreement": the share of them the rewards order
    the same way (a reward tie counts half; None without pairs), "spearman", "pearson": over all N
    answers (None when either side is constant)}. Computed in float64."""
    r, g = rewards.detach().double().flatten().cpu(), gold.detach().double().flatten().cpu()  # (N,), (N,)
    groups = groups.flatten().cpu()
    if not r.numel() == g.numel() == groups.numel() or r.numel() == 0:
        raise ValueError(f"gold_agreement: rewards, gold and groups must be non-empty and of one length (N,), got "
                         f"{r.numel()}, {g.numel()}, {groups.numel()}")
    same = groups[:, None] == groups[None, :]  # (N, N)
    dg, dr = g[:, None] - g[None, :], r[:, None] - r[None, :]  # (N, N) gold and reward differences
    counted = same & (dg > 0)  # each unordered pair once: i is gold-better than j
    agree = (dr > 0).double() + 0.5 * (dr == 0).double()  # (N, N)
    n = int(counted.sum())
    return {"pairs": n, "agreement": float(agree[counted].mean()) if n else None,
            "spearman": _pearson(_average_ranks(r), _average_ranks(g)), "pearson": _pearson(r, g)}


def _tokenizer_state(tok, who: str) -> dict:
    state = tok.state() if hasattr(tok, "state") else tok
    if not isinstance(state, dict) or "vocab_size" not in state:
        raise TypeError(f"check_same_tokenizer: {who} must be a Tokenizer or its state() dict, "
                        f"got {type(tok).__name__}")
    return state


def check_same_tokenizer(reward_tokenizer, policy_tokenizer, names: tuple[str, str] = ("reward model", "policy")
                         ) -> None:
    """Raise ValueError unless the two tokenizers (``Tokenizer`` objects or their ``state()`` dicts,
    as checkpoints carry them) are identical: same vocabulary, merges, special tokens and pattern.
    A reward model fed another tokenizer's ids reads the wrong tokens without any error of its own."""
    a, b = _tokenizer_state(reward_tokenizer, names[0]), _tokenizer_state(policy_tokenizer, names[1])
    if a == b:
        return
    what = [k for k in ("ranks", "special_tokens", "pattern") if a.get(k) != b.get(k)] or ["name/format"]
    raise ValueError(f"the {names[0]} and the {names[1]} use different tokenizers ({names[0]}: vocab_size "
                     f"{a['vocab_size']}, {names[1]}: vocab_size {b['vocab_size']}; they differ in "
                     f"{', '.join(what)}); train the {names[0]} from a model with the {names[1]}'s tokenizer")


def save_reward_model(path: str | os.PathLike, reward_model: RewardModel, tokenizer: Tokenizer, *,
                      extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``reward_model`` atomically (``checkpoint.save_checkpoint``) as a portable file: config
    {"model": the trunk's ModelConfig}, weights with any LoRA merged into plain Linears (so the loader
    needs no PEFT code), extra = ``extra`` + {"tokenizer_state", "kind": "reward_model"}. Returns the path."""
    from minilife.model.finetune import export_model  # model.finetune is heavier; only saving needs it
    if not isinstance(reward_model, RewardModel):
        raise TypeError(f"save_reward_model: need a RewardModel, got {type(reward_model).__name__}")
    plain = export_model(reward_model.body)
    if plain is None:
        raise CheckpointError(f"{path}: the reward model's trunk holds adapters or prefixes, which cannot be merged "
                              f"into plain weights; train it with full fine-tuning or LoRA")
    to_save = reward_model
    if plain is not reward_model.body:  # LoRA merged into a copy: pair the copy with the trained head
        with torch.random.fork_rng(devices=[]):  # the head's throwaway init must not move the caller's RNG
            to_save = RewardModel(plain)
        to_save.head.load_state_dict(reward_model.head.state_dict())
    body_cfg = dataclasses.asdict(reward_model.body.cfg)
    return save_checkpoint(Path(path), model=to_save, step=0, config={"model": body_cfg},
                           extra={**dict(extra or {}), "tokenizer_state": tokenizer.state(), "kind": REWARD_KIND})


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer]:
    """(reward model in eval mode with requires_grad False, tokenizer) from a ``save_reward_model`` file.
    Its extras (e.g. ``reward_mean``, ``reward_std``) are in ``checkpoint.read_checkpoint(path)["extra"]``.
    A file of another kind (e.g. a plain GPT ``model.pt``) is a CheckpointError naming it."""
    state = read_checkpoint(path)
    kind = state["extra"].get("kind")
    if kind != REWARD_KIND or "model" not in state["config"] or "tokenizer_state" not in state["extra"]:
        what = f"extra['kind'] is {kind!r}" if kind is not None else "it has no extra['kind']"
        raise CheckpointError(f"{path}: not a reward model checkpoint ({what}, expected {REWARD_KIND!r}); a plain "
                              f"GPT model.pt loads with artifacts.load_pretrained, a reward.pt comes from ch4_reward")
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        model = RewardModel(GPT(ModelConfig(**state["config"]["model"])))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the reward model config it carries: {str(e)[:400]}"
                              ) from None
    tokenizer = Tokenizer.from_state(state["extra"]["tokenizer_state"], source=f"{path} (tokenizer_state)")
    if tokenizer.vocab_size != model.body.cfg.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has vocab_size {tokenizer.vocab_size} but its model "
                              f"vocab_size {model.body.cfg.vocab_size}")
    return model.to(device).eval().requires_grad_(False), tokenizer


class PolicyReward(NamedTuple):
    """``load_policy_reward``'s result: the frozen reward model, the (mean, std) of its score on SFT samples,
    and where they came from ("reward.pt", or "measured on N SFT samples")."""
    model: RewardModel
    stats: tuple[float, float]
    stats_from: str


def load_policy_reward(path: str | os.PathLike, policy_tokenizer: Tokenizer, *, policy_name: str = "policy",
                       device: str | torch.device = "cpu", sft: nn.Module | None = None, prompts: Sequence = (),
                       max_new_tokens: int = 64, seed: int = 0) -> PolicyReward:
    """The reward model of ``path`` for a policy that uses ``policy_tokenizer`` (a ValueError naming
    ``path`` and ``policy_name`` if the tokenizers differ), with the statistics that normalise its score:
    the file's extras ``reward_mean`` and ``reward_std`` when both are set (std > 0), else the mean and
    (unbiased) std of its scores on one answer per conversation in ``prompts`` sampled from ``sft`` at
    temperature 1 (seeded by ``seed``; std floored at 1e-6). Neither: a ValueError."""
    model, reward_tokenizer = load_reward_model(path, device)
    check_same_tokenizer(reward_tokenizer, policy_tokenizer, names=(f"reward model {path}", policy_name))
    extra = read_checkpoint(path)["extra"]
    if extra.get("reward_mean") is not None and extra.get("reward_std"):
        return PolicyReward(model, (float(extra["reward_mean"]), float(extra["reward_std"])), "reward.pt")
    if sft is None or not prompts:
        raise ValueError(f"{path} holds no reward_mean/reward_std: give the SFT model and prompts to measure them on")
    probe = sample_rollouts(sft, policy_tokenizer, list(prompts), max_new_tokens,
                            generator=torch.Generator(device=device).manual_seed(seed))
    with torch.no_grad():
        r = model(probe.tokens, probe.padding_mask).float()  # (N,)
    return PolicyReward(model, (r.mean().item(), max(r.std().item(), 1e-6)), f"measured on {len(r)} SFT samples")
