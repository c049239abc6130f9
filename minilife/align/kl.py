"""Estimating KL(policy || reference) from samples, and a lab that measures the estimators exactly.

What it implements (Schulman 2020, "Approximating KL Divergence")
- ``kl_estimate``: per-token single-sample estimators of KL(pi || ref) = E_{x~pi}[log pi(x) - log ref(x)],
  with log r = log ref(x) - log pi(x) for a token x sampled from the policy pi:
      k1 = -log r                  unbiased, high variance, negative for some x
      k2 = (log r)^2 / 2           biased (right to second order when pi ~ ref), always >= 0
      k3 = (r - 1) - log r         unbiased (E_pi[r] = 1) and always >= 0 (log r <= r - 1)
  PPO's KL penalty in the reward (chapter 4) picks one of these per token.
- ``exact_kl``: sum_x p(x) log(p(x) / q(x)) for categorical vectors (0 log 0 = 0).
- The KL lab, by exact enumeration over a small categorical policy (float64):
  ``estimator_stats`` gives each estimator's mean, variance and bias under x ~ policy;
  ``expected_loss_gradients`` gives the expected gradient, wrt the policy's logits, of each estimator
  used as a *loss* (sample x, compute k(x), backpropagate), next to the true gradients.

What the lab shows about estimators as losses. Backpropagating k1 = log pi(x) - log ref(x) at sampled
x differentiates only the log pi(x) term (x itself carries no gradient, ref is frozen), and
E_{x~pi}[grad log pi(x)] = sum_x grad pi(x) = grad 1 = 0: the expected gradient is exactly zero, whatever
pi and ref are. The KL's real gradient, sum_x pi(x) (log pi(x) - log ref(x)) grad log pi(x), comes
from the *sampling* distribution, which a loss on fixed samples cannot see. So k1 is fine as a reward
term (a number a policy-gradient method multiplies grad log pi by; there its unbiasedness is what
counts) and wrong as a loss. As losses, k2 gives E[(log pi - log ref) grad log pi] = grad KL(pi || ref),
the right gradient, and k3 gives E[(1 - r) grad log pi] = grad KL(ref || pi), the other direction.

What it leaves out: masking and averaging over tokens (the caller's, with ``logprobs.masked_mean``),
estimators of other divergences, continuous distributions.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

KL_KINDS = ("k1", "k2", "k3")


def _check_kind(kind: str) -> None:
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def kl_estimate(logp_policy: torch.Tensor, logp_ref: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) at tokens sampled from the policy.
    logp_policy, logp_ref (B, T) (or any equal shapes): log-probs of the same sampled tokens.
    Returns the same shape; every position is computed (masking is the caller's)."""
    _check_kind(kind)
    if logp_policy.shape != logp_ref.shape:
        raise ValueError(f"logp_policy {tuple(logp_policy.shape)} and logp_ref {tuple(logp_ref.shape)} "
                         "must have the same shape")
    log_r = logp_ref - logp_policy  # (B, T)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    return torch.expm1(log_r) - log_r  # k3: r - 1 - log r, expm1 keeps it accurate (and >= 0) near r = 1


def _check_probs(name: str, p: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    if p.dim() < 1 or p.shape[-1] < 1:
        raise ValueError(f"{name} must be probability vectors (..., K), got shape {tuple(p.shape)}")
    sums_to_one = torch.allclose(p.sum(-1), torch.ones((), dtype=torch.float64), rtol=0, atol=1e-6)
    if not torch.isfinite(p).all() or (p < 0).any() or not sums_to_one:
        raise ValueError(f"{name} must be finite, >= 0 and sum to 1 over its last dim")
    return p


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_k p_k log(p_k / q_k) in float64. p, q (..., K) probability vectors -> (...,).
    Terms with p_k = 0 are 0; a p_k > 0 with q_k = 0 makes it +inf."""
    p, q = _check_probs("p", p), _check_probs("q", q)
    if p.shape != q.shape:
        raise ValueError(f"p {tuple(p.shape)} and q {tuple(q.shape)} must have the same shape")
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)  # (...,): the where drops 0 * log 0


class Moments(NamedTuple):
    """One estimator under x ~ policy: its mean, its (single-sample) variance, and bias = mean - true KL.
    The mean of n independent samples has the same mean and variance / n."""
    mean: float
    variance: float
    bias: float


def estimator_stats(policy_probs: torch.Tensor, ref_probs: torch.Tensor) -> dict[str, Moments]:
    """Exact mean, variance and bias of k1, k2, k3 under x ~ policy, by enumerating the K outcomes.
    policy_probs, ref_probs (K,) probability vectors, ref > 0 wherever policy > 0. Returns
    {kind: Moments}; the true KL is ``exact_kl(policy_probs, ref_probs)`` (also mean - bias)."""
    p, q = _check_probs("policy_probs", policy_probs), _check_probs("ref_probs", ref_probs)
    if p.dim() != 1 or p.shape != q.shape:
        raise ValueError(f"policy_probs {tuple(p.shape)} and ref_probs {tuple(q.shape)} must be the same (K,)")
    support = p > 0  # (K,): outcomes the policy can sample
    if (q[support] <= 0).any():
        raise ValueError("ref_probs is 0 where policy_probs is not: the KL and every estimator are infinite")
    true_kl = exact_kl(p, q).item()
    logp, logq = p[support].log(), q[support].log()  # (K',)
    stats = {}
    for kind in KL_KINDS:
        k = kl_estimate(logp, logq, kind)  # (K',): the estimator's value at each outcome
        mean = (p[support] * k).sum().item()
        variance = (p[support] * (k - mean) ** 2).sum().item()
        stats[kind] = Moments(mean, variance, mean - true_kl)
    return stats


def expected_loss_gradients(policy_logits: torch.Tensor, ref_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Expected gradients wrt the policy's logits (K,), by exact enumeration in float64.

    "k1", "k2", "k3": E_{x~pi}[grad k(x)] with the sample x held fixed, which is what averaging
    ``kl_estimate(...).backward()`` over many samples converges to. "kl_pi_ref": grad KL(pi || ref),
    the gradient a KL penalty is meant to give; "kl_ref_pi": grad KL(ref || pi). Each value is (K,).
    ref_probs (K,) must be > 0 everywhere (ref is frozen: it gets no gradient)."""
    z = torch.as_tensor(policy_logits, dtype=torch.float64).detach().requires_grad_()
    q = _check_probs("ref_probs", ref_probs)
    if z.dim() != 1 or q.shape != z.shape:
        raise ValueError(f"policy_logits {tuple(z.shape)} and ref_probs {tuple(q.shape)} must be the same (K,)")
    if (q <= 0).any():
        raise ValueError("ref_probs must be > 0 everywhere for the gradients to be finite")
    weights = torch.softmax(z, -1).detach()  # (K,): the sampling distribution, which the loss does not see
    objectives = {kind: lambda logp, kind=kind: (weights * kl_estimate(logp, q.log(), kind)).sum()
                  for kind in KL_KINDS}
    objectives["kl_pi_ref"] = lambda logp: (logp.exp() * (logp - q.log())).sum()  # pi differentiated too
    objectives["kl_ref_pi"] = lambda logp: (q * (q.log() - logp)).sum()
    return {name: torch.autograd.grad(f(torch.log_softmax(z, -1)), z)[0] for name, f in objectives.items()}
