"""Training losses of discrete flow matching on the mixture path.

Both take the denoiser's logits of p_θ(x_1 | x_t) over the V data tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsdfm.models.path import MixturePath


def cross_entropy_loss(
    logits: torch.Tensor, x_1: torch.Tensor, x_t: torch.Tensor, path: MixturePath
) -> torch.Tensor:
    """Mean −log p_θ(x_1^i | x_t) over the positions that carry information.

    Under the mask source only masked positions count (a revealed token is x_1 itself); under
    the uniform source every position counts.

    Args:
        logits: (B, L, V).
        x_1, x_t: (B, L) int64.
    """
    nll = F.cross_entropy(logits.transpose(1, 2).float(), x_1, reduction="none")
    if path.source == "mask":
        weight = (x_t == path.mask_token_id).float()
        return (nll * weight).sum() / weight.sum().clamp(min=1.0)
    return nll.mean()


def generalized_kl_loss(
    logits: torch.Tensor,
    x_1: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    path: MixturePath,
    t_max: float = 1.0 - 1e-3,
) -> torch.Tensor:
    """Generalized KL (Bregman) loss of the mixture path's velocity, per position i:

        ℓ^i = −κ̇(t)/(1 − κ(t)) · [ p_θ(x_t^i | x_t) − δ(x_1^i, x_t^i)
                                   + (1 − δ(x_1^i, x_t^i)) · log p_θ(x_1^i | x_t) ]

    It is the ELBO-derived objective of discrete flow matching for the velocity
    u_t(y | x_t) = κ̇/(1 − κ) · (p_θ(y | x_t) − δ(y, x_t)); under the mask source it reduces to the
    κ̇/(1−κ)-weighted cross-entropy on masked positions (p_θ never predicts [MASK]).

    Args:
        logits: (B, L, V); x_1, x_t: (B, L) int64; t: (B,) times (clamped to ≤ t_max).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    V = log_p.shape[-1]
    t = t.clamp(max=t_max).to(log_p.dtype)
    k = path.scheduler.kappa(t)
    coef = (path.scheduler.d_kappa(t) / (1.0 - k)).view(-1, 1)
    log_p_x1 = log_p.gather(-1, x_1.unsqueeze(-1)).squeeze(-1)
    in_vocab = x_t < V
    p_xt = log_p.gather(-1, x_t.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1).exp() * in_vocab
    delta = (x_t == x_1).to(log_p.dtype)
    loss = -coef * (p_xt - delta + (1.0 - delta) * log_p_x1)
    return loss.mean()


def segment_loss(
    logits: torch.Tensor,
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    x_1: torch.Tensor,
    t: torch.Tensor,
    h: torch.Tensor,
    path: MixturePath,
    final_weight: float = 0.0,
) -> torch.Tensor:
    """Negative log-likelihood of one recorded segment x_t → x_{t+h} under the student's jump rule.

    The S-step sampler moves position i from t to t+h by drawing x̂^i ~ p_θ(· | x_t, t, h) and
    jumping to it with probability q = (κ(t+h) − κ(t)) / (1 − κ(t)), so the student's one-step
    kernel is, per position,

        P_θ(x_{t+h}^i | x_t) = (1 − q) · δ(x_{t+h}^i, x_t^i) + q · p_θ(x_{t+h}^i | x_t, t, h).

    Summed over a trajectory's S segments, −log P_θ is the NLL of the whole shaped trajectory
    under the S-step student chain; its expectation over the dataset is KL(P_shaped ‖ P_θ) of
    path measures up to a constant, which bounds the KL of the final samples from above.

    Under the mask source only masked positions move and a masked position never stays a
    token, so per masked position i

        ℓ^i = −log q − log p_θ(x_{t+h}^i | x_t, t, h)    if i was revealed in the segment,
        ℓ^i = −log(1 − q)                                 if it stayed masked;

    the q terms do not depend on θ and are dropped: the loss is the cross-entropy toward the
    trajectory's own draws on the positions the segment revealed. Under the uniform source the
    mixture is kept as it is (every position may move).

    With ``final_weight`` λ > 0, positions that a segment leaves unrevealed (mask) or all
    positions (uniform) also get λ · (−log p_θ(x_1^i | x_t, t, h)) toward the final sequence:
    lower variance, but it pulls p_θ toward the final posterior instead of the segment's own
    draw (see docs/distill.md).

    Args:
        logits: (B, L, V) student logits of p_θ(x_1 | x_t, t, h).
        x_t, x_next, x_1: (B, L) int64 states at t, t+h and 1.
        t, h: (B,) float times and step sizes.
        path: the mixture path (scheduler, source, mask id).
        final_weight: λ ≥ 0.

    Returns:
        Scalar: the mean over supervised positions (nats per position).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    V = log_p.shape[-1]
    nll_1 = -log_p.gather(-1, x_1.unsqueeze(-1)).squeeze(-1)
    if path.source == "mask":
        masked = x_t == path.mask_token_id
        revealed = masked & (x_next != path.mask_token_id)
        stayed = masked & ~revealed
        nll_next = -log_p.gather(-1, x_next.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
        total = (nll_next * revealed).sum() + final_weight * (nll_1 * stayed).sum()
        count = revealed.sum() + final_weight * stayed.sum()
        return total / count.clamp(min=1.0)
    t64, h64 = t.double(), h.double()
    k_t = path.scheduler.kappa(t64)
    k_next = path.scheduler.kappa(t64 + h64)
    q = ((k_next - k_t) / (1.0 - k_t).clamp(min=1e-12)).clamp(0.0, 1.0)
    last = t64 + h64 >= 1.0 - 1e-6  # t and h arrive as float32
    q = torch.where(last, torch.ones_like(q), q).to(log_p.dtype).view(-1, 1)
    jump = torch.log(q) + log_p.gather(-1, x_next.unsqueeze(-1)).squeeze(-1)
    stay = torch.where(x_next == x_t, torch.log1p(-q), torch.full_like(jump, -torch.inf))
    nll_next = -torch.logaddexp(jump, stay)  # −log[(1 − q)·δ + q·p_θ], stable for tiny p_θ
    return (nll_next + final_weight * nll_1).mean() / (1.0 + final_weight)
