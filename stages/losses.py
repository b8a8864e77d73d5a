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
