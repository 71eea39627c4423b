"""The solver's vocabulary of a teacher whose [MASK] sits anywhere in its own vocabulary.

The solver (``tsdfm.models.solver``) works on data tokens 0..V−1 with [MASK] = V, one past
them. A model of M tokens whose mask id is m (BERT: 103, RoBERTa: 50264, MDLM: M − 1) is seen
through the bijection

    internal(j) = j        for j < m
    internal(j) = j − 1    for j > m
    internal(m) = V,       V = M − 1,

so its data tokens keep their order and [MASK] moves to V; ids above m shift down by one. A
uniform-source model (no mask) is seen as it is: V = M. Tokens that are never data (special
tokens, padding rows of the output layer) keep their place in 0..V−1 but get probability 0:
their logit is :data:`NEVER`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from tsdfm.models.errors import CheckpointError

# softmax(NEVER) is exactly 0 in float32 and float64, and NEVER stays finite (a loss reading
# p · log p of a never-drawn token gets 0, not 0 · −inf = nan)
NEVER = -1e30


@dataclass(frozen=True)
class VocabMap:
    """The bijection between a model's token ids and the solver's (module docstring).

    Args:
        model_vocab: M, the rows of the model's output layer.
        mask_id: m, the model's mask id, or None (uniform source: the map is the identity).
        never: model ids that are never drawn (special tokens, padding rows), mask excluded.
    """

    model_vocab: int
    mask_id: int | None
    never: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_vocab < 2:
            raise CheckpointError(f"a teacher vocabulary of {self.model_vocab} tokens is too small")
        if self.mask_id is not None and not 0 <= self.mask_id < self.model_vocab:
            raise CheckpointError(
                f"mask id {self.mask_id} lies outside the model's {self.model_vocab} tokens; "
                "give the mask id of this vocabulary"
            )
        bad = [j for j in self.never if not 0 <= j < self.model_vocab]
        if bad:
            raise CheckpointError(f"special token ids {bad} lie outside the model's vocabulary")

    @property
    def vocab_size(self) -> int:
        """V, the solver's data tokens."""
        return self.model_vocab - (0 if self.mask_id is None else 1)

    def to_internal(self, ids: torch.Tensor) -> torch.Tensor:
        """Model ids → solver ids (any shape, int64)."""
        if self.mask_id is None:
            return ids
        m = self.mask_id
        return torch.where(ids == m, self.vocab_size, ids - (ids > m).long())

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Solver ids (0..V, V = [MASK]) → model ids."""
        if self.mask_id is None:
            return x
        m = self.mask_id
        return torch.where(x == self.vocab_size, m, x + (x >= m).long())

    def never_internal(self) -> list[int]:
        """The never-drawn tokens as solver ids."""
        return list(self._never_ids)

    @cached_property
    def _never_ids(self) -> tuple[int, ...]:  # computed once, not on every forward
        never = [j for j in self.never if j != self.mask_id]
        return tuple(self.to_internal(torch.tensor(never, dtype=torch.long)).tolist())

    def logits(self, model_logits: torch.Tensor) -> torch.Tensor:
        """(..., M) model logits → (..., V) solver logits: the mask column removed, the
        never-drawn tokens at :data:`NEVER`."""
        out = model_logits if model_logits.dtype == torch.float64 else model_logits.float()
        if self.mask_id is not None:
            m = self.mask_id
            out = torch.cat([out[..., :m], out[..., m + 1 :]], dim=-1)
        never = list(self._never_ids)
        if never:
            out = out.clone()
            out[..., never] = NEVER
        return out

    def to_dict(self) -> dict:
        return {"model_vocab": self.model_vocab, "mask_id": self.mask_id, "never": list(self.never)}


def carry_over(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS carry-over: at revealed positions (x_t^i ≠ [MASK]) p(x_1^i | x_t) = δ(x_t^i).

    Args:
        logits: (B, L, V) solver logits.
        x_t: (B, L) solver ids, [MASK] = ``mask_id`` = V.
    """
    revealed = x_t != mask_id
    if not revealed.any():
        return logits
    onehot = torch.nn.functional.one_hot(x_t.clamp_max(logits.shape[-1] - 1), logits.shape[-1])
    carried = torch.where(onehot.bool(), 0.0, NEVER).to(logits.dtype)
    return torch.where(revealed.unsqueeze(-1), carried, logits)
