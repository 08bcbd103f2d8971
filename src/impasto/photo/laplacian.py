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

    Vectorized over windows and built in chunks, so memory stays proportional to the nonzeros.
    """
    img = _as_hwc(image)
    h, w, c = img.shape
    size = 2 * radius + 1
    m = size * size
    index = np.arange(h * w, dtype=np.int64).reshape(h, w)
    windows = np.lib.stride_tricks.sliding_window_view(index, (size, size)).reshape(-1, m)
    flat = img.reshape(-1, c)
    result = scipy.sparse.csr_matrix((h * w, h * w))
    for start in range(0, len(windows), chunk):
        idx = windows[start:start + chunk]
        values = _window_blocks(flat[idx], eps)
        rows = np.repeat(idx, m, axis=1).ravel()
        cols = np.tile(idx, (1, m)).ravel()
        result = result + scipy.sparse.csr_matrix((values.ravel(), (rows, cols)), shape=(h * w, h * w))
    return result.tocsr()


def _window_blocks(colours: np.ndarray, eps: float) -> np.ndarray:
    """(n, m, 3) window colours -> (n, m, m) blocks I_m - (1 + X^T (Sigma + eps/m I)^-1 X) / m."""
    n, m, c = colours.shape
    mu = colours.mean(axis=1, keepdims=True)
    centered = colours - mu
    cov = np.einsum("nmi,nmj->nij", centered, centered) / m + (eps / m) * np.eye(c)
    inv = np.linalg.inv(cov)
    g = (1.0 + np.einsum("nai,nij,nbj->nab", centered, inv, centered)) / m
    return np.eye(m)[None] - g


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
