r"""The combined angular margin: the one place its formula, derivative and named settings live.

Every margin head (``trainer/losses/margin.py``), the fused kernel's host-side target terms and its
pure-PyTorch reference (``kernels/margin_ce.py``) call :func:`target_logit` (and the kernel also
:func:`target_slope`); nothing else writes the formula.

Target logit (insightface's ``CombinedMarginLoss``; Deng et al. 2019, eq. 4)::

    c      = clamp(cos, -1 + 1e-7, 1 - 1e-7)      (cos of the target class only)
    theta  = arccos(c)                            in (0, pi)
    theta* = (pi - m2) / m1                       where m1*theta + m2 reaches pi

    phi(c) = cos(m1*theta + m2) - m3              theta <= theta*    (main branch)
           = c - cos(theta*) - 1 - m3             theta >  theta*    (continuation)

    logits: s*cos for the other classes, s*phi for the target.

Continuation ("theta + m > pi").  On the main branch phi falls from ``cos(m2) - m3`` to ``-1 - m3``
as theta goes from 0 to theta*; past theta* the angle m1*theta + m2 passes pi and cos would rise
again, rewarding a target that moves further away.  Past theta* we use the straight line in c of
slope 1 through ``(cos theta*, -1 - m3)``: phi is continuous at theta* (both sides equal
``-1 - m3``) and strictly decreasing in theta on all of (0, pi).  For ArcFace (theta* = pi - m)
the continuation reads ``c + cos(m) - 1``.  When theta* >= pi (m1 = 1 and m2 = 0, or m1 < 1) it
is never used.

Derivative (exact; :func:`target_slope` writes it, the torch path gets the same from autograd)::

    d theta / dc = -1 / sin(theta)
    dphi/dc = m1 sin(m1*theta + m2) / sin(theta)     main branch
            = 1                                      continuation
            = 0      where cos lies outside [-1 + 1e-7, 1 - 1e-7] (the clamp passes no gradient)

    sin(theta) >= sqrt(1 - (1 - 1e-7)^2) ~ 4.5e-4 thanks to the clamp, so the slope is finite.

``easy_margin`` (insightface's ``easy_margin``: ``cos(theta + m) if cos > 0 else cos``).  For any
``(m1, m2, m3)`` we define::

    phi_easy(c) = phi(c)    if c > 0
                = c         otherwise            (dphi_easy/dc = 1 there, 0 outside the clamp)

i.e. the margin applies only to targets within 90 degrees of their class centre.  phi_easy jumps
at c = 0 (from ``cos(m1*pi/2 + m2) - m3``, e.g. ``-sin m`` for ArcFace or ``-m`` for CosFace, up to
0), so it is neither continuous nor monotone; that is the rule as insightface defines it.  With
theta* < pi/2 (e.g. SphereFace m = 4) the continuation still applies on (theta*, pi/2).

Named settings (:data:`MARGINS`): each is ``(m1, m2, m3)`` as a function of one ``margin`` m::

    normface    (1, 0, 0)   no margin                       Wang et al. 2017
    arcface     (1, m, 0)   m in [0, pi),  default 0.5      Deng et al. 2019
    cosface     (1, 0, m)   m in [0, 1),   default 0.35     Wang et al. 2018
    sphereface  (m, 0, 0)   m in [1, inf), default 1.35     Liu et al. 2017, in insightface's
                                                            normalised form cos(m*theta)

How our continuation differs from insightface's fallback.  ``arcface_torch``'s ArcFace (with
``easy_margin=False``) uses ``cos(theta + m)`` while ``cos > cos(pi - m)`` and the fallback
``cos - m sin m`` past theta* = pi - m.  Ours is ``cos + cos(m) - 1`` there.  Both have slope 1 in
c, so on every affected row (theta > pi - m) the two target logits differ by the same constant::

    delta(m) = (cos + cos m - 1) - (cos - m sin m) = m sin m - (1 - cos m)

which is also exactly the size of the jump of insightface's fallback at theta*: there it drops
from ``cos(pi) = -1`` to ``-cos m - m sin m = -1 - delta``, while ours stays continuous.
(delta > 0 for 0 < m < 2.33, where tan(m/2) = m; delta(0.5) = 0.1173.)  In the loss
``L = log(S + e^{z_y}) - z_y``, with ``S`` the sum of the other classes' ``e^{z_j}`` and the
target logit ``z_y = s*phi`` raised by ``s*delta``::

    L_ours - L_insightface = -s*delta + log(1 + p_y (e^{s*delta} - 1)),   p_y = e^{z_y} / (S + e^{z_y})

with p_y the target's softmax probability under insightface's logit.  An affected row has its
target logit below ``s*(-1 - delta)``, the smallest of the row, so p_y is negligible
(``p_y <= exp(-s (1 + delta + max_{j != y} cos_j))``) and our loss is lower by about
``s*(m sin m - (1 - cos m))`` nats per affected row (7.5 nats at s = 64, m = 0.5), while the
gradients agree up to the same p_y term (both slopes are 1).  With label smoothing eps the target
logit's weight in the loss is ``1 - eps + eps/C``, which scales the difference by that factor.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

CLAMP_EPS = 1e-7  # the target cos is clamped to [-1 + CLAMP_EPS, 1 - CLAMP_EPS] before arccos


def _theta_star(m1: float, m2: float) -> float:
    return (math.pi - m2) / m1


def target_logit(cos: torch.Tensor, m1: float, m2: float, m3: float, easy_margin: bool = False) -> torch.Tensor:
    """``phi(cos)`` of the module docstring (``phi_easy`` with ``easy_margin``), in ``cos``'s
    dtype (float32/float64 and others acos supports); differentiable by autograd."""
    c = cos.clamp(-1.0 + CLAMP_EPS, 1.0 - CLAMP_EPS)
    theta = torch.acos(c)
    theta_star = _theta_star(m1, m2)
    main = torch.cos(m1 * theta + m2) - m3
    continuation = c - math.cos(theta_star) - 1.0 - m3
    phi = torch.where(theta <= theta_star, main, continuation)
    return torch.where(c > 0, phi, c) if easy_margin else phi


def target_slope(cos: torch.Tensor, m1: float, m2: float, m3: float, easy_margin: bool = False) -> torch.Tensor:
    """``dphi/dcos`` of :func:`target_logit`, written out (the module docstring's derivative), for
    the fused backward; same shape and dtype as ``cos``.  ``m3`` only shifts phi."""
    del m3
    c = cos.clamp(-1.0 + CLAMP_EPS, 1.0 - CLAMP_EPS)
    theta = torch.acos(c)
    main = m1 * torch.sin(m1 * theta + m2) / torch.sin(theta)
    slope = torch.where(theta <= _theta_star(m1, m2), main, torch.ones_like(c))
    if easy_margin:
        slope = torch.where(c > 0, slope, torch.ones_like(c))
    inside = (cos >= -1.0 + CLAMP_EPS) & (cos <= 1.0 - CLAMP_EPS)
    return torch.where(inside, slope, torch.zeros_like(c))


class Range(NamedTuple):
    """The half-open interval ``[low, high)`` (NaN is never inside)."""

    low: float
    high: float
    text: str

    def check(self, name: str, value: float) -> float:
        if not self.low <= value < self.high:
            raise ValueError(f"{name} must be in {self.text}, got {value}")
        return float(value)


class NamedMargin(NamedTuple):
    """A named ``(m1, m2, m3)`` setting as a function of one margin ``m``."""

    name: str
    triple: Callable[[float], tuple[float, float, float]]
    default: float | None = None  # None: the setting takes no margin (NormFace)
    valid: Range | None = None

    def margins(self, margin: float | None = None) -> tuple[float, float, float]:
        """``(m1, m2, m3)`` at ``margin`` (the default when None); ValueError outside the range."""
        if self.default is None:
            if margin is not None:
                raise ValueError(f"margin: {self.name} takes no margin, got {margin}")
            return self.triple(0.0)
        m = self.default if margin is None else margin
        return self.triple(self.valid.check(f"margin ({self.name})", m))


MARGINS: dict[str, NamedMargin] = {
    m.name: m
    for m in (
        NamedMargin("normface", lambda m: (1.0, 0.0, 0.0)),
        NamedMargin("arcface", lambda m: (1.0, m, 0.0), 0.5, Range(0.0, math.pi, "[0, pi)")),
        NamedMargin("cosface", lambda m: (1.0, 0.0, m), 0.35, Range(0.0, 1.0, "[0, 1)")),
        NamedMargin("sphereface", lambda m: (m, 0.0, 0.0), 1.35, Range(1.0, math.inf, "[1, inf)")),
    )
}

# (m1, m2, m3) set directly (the "combined" head): the union of the named settings' ranges.
COMBINED_RANGES = {
    "m1": Range(1.0, math.inf, "[1, inf)"),
    "m2": Range(0.0, math.pi, "[0, pi)"),
    "m3": Range(0.0, 1.0, "[0, 1)"),
}


def check_margins(m1: float, m2: float, m3: float) -> tuple[float, float, float]:
    """``(m1, m2, m3)`` as floats; ValueError naming the first one outside :data:`COMBINED_RANGES`."""
    return tuple(COMBINED_RANGES[k].check(k, v) for k, v in (("m1", m1), ("m2", m2), ("m3", m3)))
