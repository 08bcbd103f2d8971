"""Matrix products on the CPU through oneDNN's inner product, where MKL's sgemm is slow.

torch.matmul and bmm call MKL's sgemm. On an AVX-512 AMD CPU it ran Winograd's channel mixing at 130-190
GFLOP/s, where oneDNN's inner product, the op behind PyTorch's fused linear layer, ran it at 330-386; the
memory-bound tile transforms ran 1.4-2.6x faster on oneDNN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _inner_product() -> Callable[..., torch.Tensor] | None:
    """oneDNN's inner product (PyTorch's fused-linear op, private), where this build has it."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


LINEAR = _inner_product()


def onednn_for(t: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """oneDNN's inner product where it may take a product with t: float32 on the CPU, and no graph being
    built (its op has no derivative, so a double backward takes matmul)."""
    usable = (not torch.is_grad_enabled() and t.dtype == torch.float32 and t.device.type == "cpu"
              and torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled))
    return LINEAR if usable else None


def times_transposed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T, on oneDNN where `onednn_for(x)` allows, else matmul."""
    linear = onednn_for(x)
    return x @ w.t() if linear is None else linear(x, w, None, "none", [], "")
