"""One optimizer for the fast recipe: Muon for the conv filter banks, Nesterov SGD for the rest.

Muon (Jordan et al., 2024) replaces a filter bank's momentum-smoothed gradient (out, in, k, k),
read as the matrix (out, in*k*k), by its nearest semi-orthogonal matrix, found by a few Newton-Schulz
iterations: every direction of the update moves by the same amount. `torch.optim.Muon` takes 2-D
parameters only, hence this class. Every conv here feeds a BatchNorm, so a filter bank's scale is
free: it is held at norm sqrt(out) (renormalized before its step, every step or every few: a few
Muon steps of a fixed size move the norm little) and the step is a fixed fraction of it (no weight
decay needed).
Groups with `muon=True` get that update; the others are plain SGD (momentum, Nesterov, coupled decay).
"""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz, steepest at 0 (Jordan's Muon)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (singular values land in about [0.5, 1.5]); g is 2-D."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + eps)                  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T                        # (r, r), r = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict], lr: float, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 3, renorm_every: int = 1):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        muon=False, ns_steps=ns_steps, renorm_every=renorm_every)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        g, mu = p.grad, group["momentum"]
        if group["weight_decay"] and not group["muon"]:
            g = g.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"].mul_(mu).add_(g)
        g = g.add(buf, alpha=mu) if group["nesterov"] else buf
        if group["muon"]:
            state["step"] = state.get("step", 0) + 1
            if (state["step"] - 1) % group["renorm_every"] == 0:             # its 1st, then every renorm_every-th
                p.mul_(len(p) ** 0.5 / p.norm())                              # norm sqrt(out)
            g = orthogonalize(g.reshape(len(g), -1), group["ns_steps"]).view_as(p)
        p.add_(g, alpha=-group["lr"])
