"""The GRPO loss, as small named pieces: group-relative advantages, the clipped importance
ratio, the k3 KL estimator, masked aggregation. Tensors only: no model, no environment.

    A_i      = r_i - mean(r_group)                 (/ (std(r_group) + eps) with std normalization)
    ratio_t  = exp(logp_t - logp_old_t)
    pg_t     = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A)
    kl_t     = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1       (k3: unbiased, >= 0)
    loss_t   = pg_t + kl_coef * kl_t
    loss     = sum_t mask_t * loss_t / N,   N = sum(mask)                     ("token-mean")
                                            N = episodes * norm_tokens         ("constant", Dr.GRPO)

Design choices, and why:
- Separate low and high clip bounds (DAPO's clip-higher): a larger upper bound lets
  low-probability tokens that earned a positive advantage grow, which keeps exploration alive.
- "constant" aggregation divides by a fixed number of tokens per episode instead of the
  tokens actually generated, so a long wrong episode is not diluted per token (Dr.GRPO); its
  gradient scale then depends on --norm-tokens, not on the batch's lengths.
- Every tensor here is [episodes, tokens] with a 0/1 mask: prompt, environment (state
  message) and padding tokens are 0, so they carry no loss and no KL.
"""
import torch


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards [groups, G] -> advantages [groups, G]: reward minus its group's mean (divided by
    the group's standard deviation when asked; a group with equal rewards gets 0)."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centered
    return centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def clipped_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate (to minimize) and whether the clip was active.
    logp, logp_old [E, T]; advantages [E] (one per episode, spread over its tokens)."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - policy."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm_tokens: int = 1024,
              episodes: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar: 'token-mean' (over learned tokens) or 'constant'
    (sum over learned tokens / (episodes * norm_tokens), Dr.GRPO). `episodes` defaults to the
    rows here; pass the whole batch's count when a batch is split into micro-batches."""
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "constant":
        return (per_token * mask).sum() / ((episodes or per_token.shape[0]) * norm_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}: expected token-mean or constant")


def grpo_loss(logp, logp_old, advantages, mask, clip_low=0.2, clip_high=0.28, kl_coef=0.0,
              logp_ref=None, aggregation="token-mean", norm_tokens=1024, total_tokens=None, episodes=None):
    """The whole loss and its statistics. `total_tokens` (learned tokens of the whole batch)
    makes 'token-mean' exact when a batch is split into micro-batches."""
    pg, clipped = clipped_policy_loss(logp, logp_old, advantages, clip_low, clip_high)
    per_token = pg
    kl = torch.zeros_like(logp)
    if kl_coef > 0:
        if logp_ref is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probs")
        kl = k3_kl(logp, logp_ref)
        per_token = pg + kl_coef * kl
    if aggregation == "token-mean" and total_tokens is not None:
        loss = (per_token * mask).sum() / max(1, total_tokens)
    else:
        loss = aggregate(per_token, mask, aggregation, norm_tokens, episodes)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean(clipped.float(), mask).item(),
                 "kl": masked_mean(kl, mask).item(),
                 "ratio": masked_mean(torch.exp(logp - logp_old), mask).item()}
    return loss, stats
