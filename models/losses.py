"""Training losses of discrete flow matching on the mixture path.

Both take the denoiser's logits of p_θ(x_1 | x_t) over the V data tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.path import MixturePath


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
