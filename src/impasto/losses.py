"""The losses: content, Gram style (optionally masked), total variation, and their weighted sum.

Content and style terms are relative squared errors, ||x - target||^2 / ||target||^2, so their
weights mean the same thing whatever the scale of the loss network's activations (torchvision,
Caffe and MatConvNet weights differ by orders of magnitude there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

EPS = 1e-8


def gram_matrix(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of (N, C, H, W) features: G = F F^T / (C * H * W), shape (N, C, C).

    With a mask (N, 1, H, W) of weights in [0, 1], features are weighted by it and the
    normalization uses its area instead of H * W, so a region's statistics do not depend on its size.
    """
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)  # a view in NCHW and channels last alike
    if mask is None:
        area = float(h * w)
    else:
        m = mask.reshape(n, 1, h * w).to(flat.dtype)
        flat = flat * m
        area = m.sum(dim=-1, keepdim=True).clamp_min(EPS)  # type: ignore[assignment]
    gram = _OuterProduct.apply(flat)
    return gram / (c * area)


class _OuterProduct(torch.autograd.Function):
    """F F^T for (N, C, L) features, with the backward (G' + G'^T) F: one matrix product where autograd's
    generic bmm backward does two (measured 2.2x faster forward + backward on relu1_1 at 512 px). That
    product stays on MKL: on oneDNN's inner product (what Winograd's products use) an evaluation at 512 px ran
    1.05x faster, but as the impasto command runs the heap's high-water mark rose by 40-60 MiB at 256-512 px,
    with the same live memory (docs/benchmarks.md, session 9: it comes with the op's execution, not its output)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        return torch.bmm(flat, flat.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (flat,) = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)
        if flat.stride(1) == 1 and flat.stride(2) != 1:  # channels last: a gradient in the same layout
            return torch.bmm(flat.transpose(1, 2), sym).transpose(1, 2)
        return torch.bmm(sym, flat)


def relative_error(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||x - target||^2 / ||target||^2 — scale-free squared error."""
    return (x - target).pow(2).sum() / target.pow(2).sum().clamp_min(EPS)


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How far features are from the content image's, relative to the content's own energy."""
    return relative_error(features.float(), target)


def style_loss(gram: torch.Tensor, target_gram: torch.Tensor) -> torch.Tensor:
    """How far a Gram matrix is from the style image's, relative to the style's own energy.

    A batch of Grams (N, C, C) against one target (1, C, C) gives the mean over the batch."""
    return relative_error(gram, target_gram.expand_as(gram))


def tv_loss(image: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Total variation: mean of (dx^2 + dy^2)^(power/2) over pixels; power 2 is the squared form,
    1.25 the one of the Keras examples, 1 the isotropic (edge-preserving) form."""
    dx = image[..., :-1, 1:] - image[..., :-1, :-1]
    dy = image[..., 1:, :-1] - image[..., :-1, :-1]
    squared = dx.pow(2) + dy.pow(2)
    if power == 2.0:
        return squared.mean()
    return (squared + EPS).pow(power / 2).mean()


def normalized(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1 (style blend weights, per-layer weights)."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]


@dataclass
class StyleTarget:
    """Gram matrices of one style image at each style layer, with its blend weight."""

    grams: dict[str, torch.Tensor]
    weight: float = 1.0
    masks: dict[str, torch.Tensor] | None = None  # per layer (1, 1, h, w): the region of the output it styles


@dataclass
class PerceptualLoss:
    """content_weight * content + style_weight * style + tv_weight * TV, over named VGG layers.

    Holds only precomputed targets; evaluating it needs the features of the image being optimized.
    """

    content_targets: dict[str, torch.Tensor]
    content_layer_weights: dict[str, float]
    styles: list[StyleTarget]
    style_layer_weights: dict[str, float]
    content_weight: float = 1.0
    style_weight: float = 1.0
    tv_weight: float = 0.0
    tv_power: float = 2.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.content_layer_weights, *self.style_layer_weights]))

    def __call__(
        self, image: torch.Tensor, features: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its weighted terms for `image` whose network features are `features`."""
        return self.combine(image, [self.layer_terms(k, features[k]) for k in self.layers])

    def layer_terms(self, name: str, feature: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One layer's layer-weighted content and style errors (None where the layer has none).

        Called during the network's forward pass (see `VGGFeatures(on_feature=...)`), each term's
        backward then runs right when its layer's does, instead of every Gram gradient at once
        before the network's backward begins: less memory alive at the peak.
        """
        content = style = None
        w = self.content_layer_weights.get(name)
        if w is not None and self.content_weight:
            content = w * content_loss(feature, self.content_targets[name])
        w = self.style_layer_weights.get(name)
        if w is not None and self.style_weight and self.styles:
            flat = feature.float()
            plain: torch.Tensor | None = None
            style = torch.zeros((), device=feature.device)
            for t in self.styles:
                if t.masks is not None:
                    gram = gram_matrix(flat, t.masks[name])
                else:
                    plain = gram = plain if plain is not None else gram_matrix(flat)
                style = style + t.weight * w * style_loss(gram, t.grams[name])
        return content, style

    def combine(self, image: torch.Tensor, per_layer: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its weighted terms from the `layer_terms` of every layer, plus TV on `image`."""
        zero = torch.zeros((), device=image.device)
        terms: dict[str, torch.Tensor] = {}
        contents = [c for c, _ in per_layer if c is not None]
        styles = [s for _, s in per_layer if s is not None]
        if contents:
            terms["content"] = self.content_weight * sum(contents, zero)
        if styles:
            terms["style"] = self.style_weight * sum(styles, zero)
        if self.tv_weight:
            terms["tv"] = self.tv_weight * tv_loss(image, self.tv_power)
        return sum(terms.values(), zero), terms
