"""The matting Laplacian (Levin, Lischinski & Weiss 2008) and the photorealism loss built on it.

For every 3x3 window w_k of the content image I (colours in [0, 1]):
    L += I_9 - (1 + (I_i - mu_k)^T (Sigma_k + eps/9 I_3)^-1 (I_j - mu_k)) / 9
Luan et al. (2017) penalize sum_c V_c^T L V_c: small when the output is locally an affine
function of the content's colours, i.e. when it stays a photograph of the same scene.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse
import torch

MATTING_EPS = 1e-7


def matting_laplacian(image: np.ndarray | torch.Tensor, eps: float = MATTING_EPS, radius: int = 1,
                      chunk: int = 1 << 15) -> scipy.sparse.csr_matrix:
    """The (H*W, H*W) sparse matting Laplacian of an (H, W, 3) or (3, H, W) image in [0, 1].

    Two pixels of one window are at most 2 * radius apart, so L has (4 * radius + 1)^2 diagonals: they are
    kept as images (scipy's diagonal format, each entry at its column's pixel) while the windows are added
    in, and the windows are computed as whole images too (one plane per window pixel and channel, about
    `chunk` windows at a time). Measured 4-6x faster than a sparse matrix per chunk of windows.
    """
    img = np.ascontiguousarray(_as_hwc(image).transpose(2, 0, 1))  # (3, H, W): planes
    _, h, w = img.shape
    size = 2 * radius + 1
    span = 2 * size - 1
    # diagonals[(dy + size - 1) * span + dx + size - 1, y, x] = L[(y - dy, x - dx), (y, x)]
    diagonals = np.zeros((span * span, h, w))
    step = max(1, chunk // max(1, w - size + 1))
    for top in range(0, h - size + 1, step):
        n = min(step, h - size + 1 - top)
        _add_windows(diagonals, img[:, top:top + n + size - 1], top, size, eps)
    dy, dx = np.divmod(np.arange(span * span), span)
    offsets = (dy - size + 1) * w + (dx - size + 1)  # column - row of each diagonal
    return scipy.sparse.dia_matrix((diagonals.reshape(span * span, h * w), offsets), shape=(h * w, h * w)).tocsr()


def _add_windows(diagonals: np.ndarray, img: np.ndarray, top: int, size: int, eps: float) -> None:
    """Add the blocks I_m - (1 + (I_a - mu)^T (Sigma + eps/m I)^-1 (I_b - mu)) / m of every window of the
    (3, h, w) `img` (whose first row is row `top` of the image) into the diagonals. Zeros stay where no
    window reaches (a window never leaves the image), and scipy leaves those out of the matrix."""
    m, span = size * size, 2 * size - 1
    rows_h, rows_w = img.shape[1] - size + 1, img.shape[2] - size + 1
    pixels = [(i // size, i % size) for i in range(m)]  # a window's pixels, row-major
    colours = [img[:, y:y + rows_h, x:x + rows_w] for y, x in pixels]  # m arrays (3, rows_h, rows_w)
    mean = sum(colours) / m
    centered = [c - mean for c in colours]
    cov = np.empty((rows_h, rows_w, 3, 3))
    for i in range(3):
        for j in range(i, 3):
            cov[..., i, j] = cov[..., j, i] = sum(c[i] * c[j] for c in centered) / m + (eps / m if i == j else 0.0)
    inv = np.ascontiguousarray(np.linalg.inv(cov).transpose(2, 3, 0, 1))  # (3, 3, rows_h, rows_w)
    weighted = [inv[:, 0] * c[0] + inv[:, 1] * c[1] + inv[:, 2] * c[2] for c in centered]  # inv (I_a - mu)
    for a, (ya, xa) in enumerate(pixels):
        for b in range(a, m):
            yb, xb = pixels[b]
            wa, cb = weighted[a], centered[b]
            block = ((1.0 if a == b else 0.0) - 1.0 / m) - (wa[0] * cb[0] + wa[1] * cb[1] + wa[2] * cb[2]) / m
            d = (yb - ya + size - 1) * span + xb - xa + size - 1
            diagonals[d, top + yb:top + yb + rows_h, xb:xb + rows_w] += block  # L[a, b], at pixel b
            if a != b:  # the block is symmetric: L[b, a], at pixel a
                diagonals[span * span - 1 - d, top + ya:top + ya + rows_h, xa:xa + rows_w] += block


def _as_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) or (3, H, W) image, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def to_torch_sparse(matrix: scipy.sparse.spmatrix, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scipy sparse matrix as a torch CSR tensor (for products on the optimization's device)."""
    csr = matrix.tocsr()
    with warnings.catch_warnings():  # torch calls its CSR support beta; impasto checks the result in its tests
        for message in ("Sparse CSR tensor support is in beta", "Sparse invariant checks are implicitly disabled"):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(csr.indptr.astype(np.int64)),
                                       torch.from_numpy(csr.indices.astype(np.int64)),
                                       torch.from_numpy(csr.data).to(dtype), size=csr.shape, device=device,
                                       check_invariants=False)


class _QuadraticForm(torch.autograd.Function):
    """sum_c V_c^T M V_c for a symmetric sparse M, with the gradient 2 M V_c."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        v = image.reshape(image.shape[-3], -1).T  # (H*W, 3)
        mv = matrix @ v
        ctx.save_for_backward(mv)
        ctx.shape = image.shape
        return (v * mv).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mv,) = ctx.saved_tensors
        return (2 * grad * mv.T).reshape(ctx.shape), None


def matting_loss(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The photorealism loss sum_c V_c^T M V_c of a (3, H, W) or (1, 3, H, W) image, divided by H*W
    so its weight does not depend on the image size."""
    h, w = image.shape[-2:]
    return _QuadraticForm.apply(image.float(), matrix) / (h * w)
