"""Built-in stage functions used by the example configs: scale, normalize, cast, and a small linear model.

A stage function takes a tensor already on the stage's device (``[N, ...]``
for a batched stage) and keyword ``args`` from the YAML, and returns a tensor
or a NumPy array, or a tuple/dict of them (the next stage then receives the
same tuple/dict). A factory is called once per worker process and returns
such a function (load a model there).

A function that accepts ``out=`` may be handed the output slot in the arena
(a tensor of the result's shape, known from an earlier input of the same
shape) and should write its result there and return it: the stage then
copies nothing (CPU stages without a ``dtype`` cast; see docs/pipelines.md).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["scale", "normalize", "cast", "linear", "matmul", "identity", "fail_on"]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def scale(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    return x * factor


def normalize(x: torch.Tensor, mean: float | None = None, std: float | None = None,
              eps: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - mean) / std``; without ``mean``/``std``, standardize each image plane (the last
    two dimensions), so a batch ``[N, C, H, W]`` and an item ``[C, H, W]`` give the same rows."""
    m: float | torch.Tensor
    s: float | torch.Tensor
    if mean is not None and std is not None:
        m, s = mean, std
    else:
        dims = (-2, -1) if x.dim() >= 2 else (-1,)
        m = x.mean(dim=dims, keepdim=True)
        s = x.std(dim=dims, keepdim=True, unbiased=False) + eps
    if out is None:
        return (x - m) / s
    return torch.sub(x, m, out=out).div_(s)


def cast(x: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """The tutorials' ``.type(torch.float32)``."""
    return x.type(getattr(torch, dtype))


def matmul(x: torch.Tensor, size: int = 64, seed: int = 0,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W`` with a fixed random ``W`` of ``[x.shape[-1], size]`` (the CPU "model")."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[-1], size, generator=g, dtype=x.dtype).to(x.device)
    return torch.matmul(x, w, out=out) if out is not None else x @ w


def linear(in_features: int, out_features: int, seed: int = 0, device: str = "cpu",
           activation: str | None = "relu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A factory: a seeded ``nn.Linear`` (+ ReLU) on ``device``, built once per worker."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features).to(device).eval()

    def apply(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = layer(x.to(layer.weight.dtype))
            return torch.relu(y) if activation == "relu" else y

    return apply


def fail_on(x: torch.Tensor, value: float = 13.0) -> torch.Tensor:
    """For tests and demos of ``on_error``: raise on items whose first element equals ``value``."""
    if float(x.reshape(-1)[0]) == value:
        raise ValueError(f"refusing an item whose first element is {value}")
    return x
