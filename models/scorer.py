"""The scorer interface: what the navigator selects candidates with.

A scorer maps a batch of states x_t at time t to energies, lower = more coherent:

    E: (x_t ∈ V^{B×L}, t ∈ [0, 1]^B) ↦ e ∈ ℝ^B

The energy compass (``tsdfm.models.compass.CompassScorer``), a causal LM scoring the teacher's
denoised guess (``CausalLMScorer``) and the synthetic language's exact likelihood
(``ExactScorer``) all stand behind it; the navigator (``tsdfm.models.navigator``) and the
compass metrics (``tsdfm.models.eval.compass_metrics``) take any object that has these members.

A scorer that sets ``uses_proposal = True`` is also given ``log_q`` by the navigator: (B,)
float64, the log probability with which the teacher drew the tokens each candidate revealed in
the segment (its proposal q), so that it can return a density-ratio energy E = log q − log p.
Softmax selection at temperature 1 with such an energy is importance resampling toward p.

A scorer whose energy is a sum over positions (the token-ratio compass) sets
``per_position = True`` and has ``token_energies(x_t, t)``: (B, L) float32 per-position energies
that sum to ``energy``. Per-position selection (``selection="token-softmax"``) reads them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Scorer(Protocol):
    """Energy of a batch of states at time t; lower = more coherent.

    Attributes:
        name: short label of the scorer (``"compass"``, ``"causal-lm"``), for reports.
        identity: what produced the energies, e.g. the compass checkpoint's ``sha256:...``
            identity; every dataset shaped with the scorer records it.

    Optional: ``uses_proposal: bool`` (default False); when true, ``energy`` also accepts the
    keyword ``log_q`` (see the module docstring).
    """

    name: str
    identity: str

    def energy(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Energies of a batch, computed in one batched pass (no loop over sequences).

        Args:
            x_t: (B, L) int64 states; the energies live on its device.
            t: a float or a (B,) tensor of times in [0, 1].

        Returns:
            (B,) float32 finite energies; row b depends on x_t[b] and t[b] only.
        """
        ...


def uses_proposal(scorer: object) -> bool:
    """Whether ``scorer`` wants the proposal ``log q`` of each candidate (``uses_proposal``)."""
    return bool(getattr(scorer, "uses_proposal", False))


def per_position(scorer: object) -> bool:
    """Whether ``scorer`` has per-position energies (``per_position``, ``token_energies``)."""
    return bool(getattr(scorer, "per_position", False)) and hasattr(scorer, "token_energies")
