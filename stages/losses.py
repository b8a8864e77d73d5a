"""Pure loss functions of the alignment stages (tensors in, tensors out; no models, no I/O).

Reward model (Llama 2, eq. 2 with the margin of Table 27)::

    L = -log sigmoid(r(x, y_c) - r(x, y_r) - m(rating))

with the margin a discrete function of the annotator's rating, in two published variants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Llama 2 Table 27: preference-rating-based margins.
MARGINS: dict[str, dict[str, float]] = {
    "small": {"significantly_better": 1.0, "better": 2.0 / 3.0, "slightly_better": 1.0 / 3.0,
              "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
    "none": {"significantly_better": 0.0, "better": 0.0, "slightly_better": 0.0, "negligibly_better": 0.0},
}


def margin_for(rating: str, variant: str = "small") -> float:
    """m(rating) of Table 27 (``variant`` small | large | none)."""
    return MARGINS[variant][rating]


def ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Binary ranking loss with margin, averaged over pairs.

    Args:
        r_chosen: (P,) scalar rewards of the preferred responses.
        r_rejected: (P,) scalar rewards of the other responses.
        margin: (P,) or scalar, m(rating) per pair.

    Returns:
        Scalar ``mean(-log sigmoid(r_chosen - r_rejected - margin))`` (computed as softplus, stable).
    """
    return F.softplus(-(r_chosen - r_rejected - margin)).mean()


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly (ties count as wrong): (P,), (P,) -> scalar."""
    return (r_chosen > r_rejected).float().mean()


# ---------------------------------------------------------------------------------------------- RLHF
#
# Shapes: B sequences, T response tokens; ``mask`` (B, T) is 1 on response tokens that count.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (scalar; 0 if the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the (masked) entries; population std, as PPO implementations do."""
    if mask is None:
        mean, var = x.mean(), x.var(unbiased=False)
    else:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps)


def combine_rewards(r_helpful: torch.Tensor, r_safe: torch.Tensor, is_safety: torch.Tensor,
                    threshold: float = 0.15) -> torch.Tensor:
    """Llama 2's piecewise reward: the safety RM's score for safety prompts or when it is below
    ``threshold`` (0.15), else the helpfulness RM's score. Scores are probabilities in (0, 1)."""
    return torch.where(is_safety.bool() | (r_safe < threshold), r_safe, r_helpful)


def whitened_reward(score: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama 2's final reward: ``whiten(logit(score))`` (the logit reverses the RM's sigmoid)."""
    s = score.clamp(eps, 1.0 - eps)
    return whiten(torch.log(s) - torch.log1p(-s))


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate ``log pi(y_t) - log pi_0(y_t)`` of the sampled tokens (B, T)."""
    return logp - ref_logp


def token_rewards(final_reward: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Per-token rewards ``-beta * KL_t`` plus the sequence reward on each sequence's last response token.

    final_reward: (B,); logp, ref_logp, mask: (B, T). Returns (B, T), zero outside the mask.
    """
    mask = mask.to(logp.dtype)
    r = -beta * kl_per_token(logp, ref_logp) * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    r[torch.arange(len(r)), last] += final_reward.to(r.dtype)
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (V after the last token is 0), ``A_t = delta_t + gamma lam A_{t+1}``.
    Returns (advantages, returns = advantages + values), both (B, T) and zero outside the mask.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    adv = torch.zeros_like(values)
    last = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    for t in reversed(range(values.shape[1])):
        next_v = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, to minimise: ``-mean(min(rho A, clip(rho, 1-eps, 1+eps) A))`` over the mask.

    Returns (loss, clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped < unclipped).to(logp.dtype), mask)
    return loss, clipfrac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """Clipped value loss: ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over masked positions: logits (B, T, V) predict labels (B, T) -> (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask.to(logp.dtype)).sum(dim=-1)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """DPO: ``-mean(log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))))`` on summed response log-probs (B,)."""
    return F.softplus(-beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))).mean()


def dpo_nll_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, beta: float = 0.1,
                 nll_coef: float = 0.2) -> torch.Tensor:
    """Llama 3's DPO: the DPO term plus ``nll_coef`` (0.2) times the chosen response's per-token NLL.

    The log-probs must already exclude formatting tokens (headers, end of turn): see ``content_mask``."""
    nll = -(pi_chosen / chosen_tokens.to(pi_chosen.dtype).clamp(min=1.0)).mean()
    return dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta) + nll_coef * nll


def content_mask(labels: torch.Tensor, response_mask: torch.Tensor, formatting_ids: list[int]) -> torch.Tensor:
    """``response_mask`` with formatting tokens (header markers, end of turn) zeroed: Llama 3 masks them out
    of the DPO loss because they appear in both responses and their pull cancels poorly."""
    keep = response_mask.bool().clone()
    for t in formatting_ids:
        keep &= labels != t
    return keep
