"""A layer table like torchsummary's (the seed README's), with parameter and memory totals."""
from __future__ import annotations

import torch
from torch import nn

from ..models import build_model

SKIP = (nn.ReLU, nn.GELU, nn.SiLU, nn.Identity, nn.Sequential)  # no parameters, no new shape: not listed
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)  # no parameters, new shape


def _rows(net: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple, int]]:
    rows, hooks = [], []

    def hook(module, _inp, out):
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, SKIP) or (not params and len(list(module.children())) == 0
                                        and not isinstance(module, POOLS)):
            return
        rows.append((type(module).__name__, tuple(out.shape[1:]), params))

    for m in net.modules():
        if m is not net:
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


def summary_table(model: str, num_classes: int = 10, input_size=(3, 32, 32)) -> str:
    net = build_model(model, num_classes)
    rows = _rows(net, torch.zeros(1, *input_size))
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    mb = 1024 ** 2
    act = sum(torch.Size(s).numel() for _, s, _ in rows) * 4 * 2 / mb  # forward + backward, fp32
    inp = torch.Size(input_size).numel() * 4 / mb
    lines = ["-" * 64, f"{'Layer (type)':>25}  {'Output Shape':>22}  {'Param #':>12}", "=" * 64]
    for i, (name, shape, params) in enumerate(rows, start=1):
        lines.append(f"{f'{name}-{i}':>25}  {str([-1, *shape]):>22}  {params:>12,}")
    lines += ["=" * 64, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}", "-" * 64,
              f"Input size (MB): {inp:.2f}", f"Forward/backward pass size (MB): {act:.2f}",
              f"Params size (MB): {total * 4 / mb:.2f}",
              f"Estimated Total Size (MB): {inp + act + total * 4 / mb:.2f}", "-" * 64]
    return "\n".join(lines)
