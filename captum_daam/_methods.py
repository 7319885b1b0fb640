"""The attribution methods :func:`~captum_daam.explain_dataset` and
:func:`~captum_daam.compare` run, each held as one :class:`Method`: DAAM, any other
Captum attribution object, or a callable ``(images, targets) -> maps``; and the methods the
command line names (``daam``, ``rollout``, ``gradcam``, ...).

What a method's maps are in a store: (B, L, h, w) at the grid they come in. DAAM's flow has
L blocks (L = 1 for its final map); every other method has L = 1. A map with colour channels,
(B, C, H, W) as Captum's pixel attributions give it, is stored summed over them, (B, 1, H, W),
as :mod:`captum_daam.metrics` reads it; (B, h, w) becomes (B, 1, h, w). So patch-level methods
(DAAM, the rollouts, LeGrad, Grad-CAM on a ViT block) are stored on the patch grid and pixel
methods (Saliency, IntegratedGradients, Occlusion) at the input size.
"""

import hashlib
import inspect
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ._names import METHOD_NAMES

__all__ = ["Method", "as_method", "named_method", "RandomMaps", "ScoresOf", "METHOD_NAMES"]

class RandomMaps:
    r"""Uniformly random maps on a fixed grid: the chance level of every metric.

    Each example's map is drawn from a generator seeded with ``seed`` and a CRC-32 of the
    example's image (its float32 values), so an example gets the same map in any batch, on any
    process and in a resumed run.

    Args:
        grid (tuple of int): (gh, gw), the grid of the maps (a ViT's patch grid).
        seed (int, optional): Default: 0
    """

    def __init__(self, grid: Tuple[int, int], seed: int = 0) -> None:
        self.grid, self.seed = (int(grid[0]), int(grid[1])), int(seed)

    def __call__(self, images: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        maps = []
        for image in images:
            values = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            generator = torch.Generator().manual_seed(
                (zlib.crc32(values) << 16) ^ self.seed)
            maps.append(torch.rand((1, *self.grid), generator=generator))
        return torch.stack(maps).to(images.device)

    def __repr__(self) -> str:
        return f"RandomMaps(grid={self.grid}, seed={self.seed})"


class ScoresOf(nn.Module):
    """A model as a function from images to class scores: a transformers output object gives
    the scores it holds (:func:`captum_daam._outputs.scores_in_output`), so that Captum's
    attributions and the metrics, which need a tensor, take any model the adapters take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Any:
        from ._outputs import scores_in_output

        output = self.model(images)
        return output if isinstance(output, Tensor) else scores_in_output(output)


def explains(forward: Any, model: nn.Module) -> bool:
    """Whether ``forward`` is ``model`` or its scores."""
    return forward is model or (isinstance(forward, ScoresOf) and forward.model is model)


class Method:
    """One attribution method over batches of images, as a store holds it.

    Args:
        attribution: a :class:`~captum_daam.DAAM`, any other ``captum.attr.Attribution``
            (its ``attribute(images, target=..., **attribute_kwargs)`` is called), or a
            callable ``(images, targets) -> maps``.
        model (nn.Module): the classifier whose predictions and metrics go with the maps.
        attribute_kwargs (dict, optional): further arguments of each call.
        return_flow (bool): DAAM only: the whole flow D_1..D_L, else its final map.
        internal_batch_size (int, optional): DAAM only: passed to ``attribute``.
    """

    def __init__(self, attribution: Any, model: nn.Module,
                 attribute_kwargs: Optional[Dict[str, Any]] = None, return_flow: bool = False,
                 internal_batch_size: Optional[int] = None) -> None:
        from .attr import DAAM

        self.attribution, self.model = attribution, model
        self.kwargs = dict(attribute_kwargs or {})
        self.is_daam = isinstance(attribution, DAAM)
        if return_flow and not self.is_daam:
            raise ValueError(
                f"Expected return_flow=False for {_describe(attribution)}: only DAAM has a "
                f"flow of block maps.")
        if internal_batch_size is not None and not self.is_daam:
            raise ValueError(
                f"Expected internal_batch_size=None for {_describe(attribution)}: it is "
                f"DAAM's; give other attributions theirs in attribute_kwargs (e.g. "
                f"IntegratedGradients' internal_batch_size, Occlusion's "
                f"perturbations_per_eval).")
        self.return_flow, self.internal_batch_size = bool(return_flow), internal_batch_size
        reserved = {"target", "inputs", "return_flow", "internal_batch_size"} & set(self.kwargs) \
            if self.is_daam else {"target", "inputs"} & set(self.kwargs)
        if reserved:
            raise ValueError(f"Expected attribute_kwargs without {sorted(reserved)}: the "
                             f"dataset gives them.")

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        """(B, L, h, w) float maps of ``images`` for ``targets`` (B,)."""
        if self.is_daam:
            maps = self.attribution.attribute(
                images, target=targets, return_flow=True,
                internal_batch_size=self.internal_batch_size, **self.kwargs)
            return maps if self.return_flow else maps[:, -1:]
        if hasattr(self.attribution, "attribute"):
            maps = self.attribution.attribute(images, target=targets, **self.kwargs)
        else:
            maps = self.attribution(images, targets, **self.kwargs)
        return self.as_maps(maps, len(images))

    def as_maps(self, maps: Any, batch: int) -> Tensor:
        if isinstance(maps, tuple) and len(maps) == 1:
            maps = maps[0]
        if not isinstance(maps, Tensor) or maps.dim() not in (3, 4) or maps.shape[0] != batch:
            shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
            raise ValueError(
                f"Expected {_describe(self.attribution)} to give ({batch}, h, w) or "
                f"({batch}, C, h, w) maps, got {shape}.")
        maps = maps.detach()
        maps = maps.unsqueeze(1) if maps.dim() == 3 else maps.sum(dim=1, keepdim=True)
        return maps.float() if not maps.is_floating_point() else maps

    def settings(self) -> Dict[str, Any]:
        """The method and what its maps depend on besides the model and the data, as a
        store's settings hold them: its class (and the class it wraps), its layer or layers
        (by their names in the model), whether it multiplies by the inputs, its forward
        function where that is not the model, a callable's description, and the arguments
        of its calls."""
        from .data import stable_repr

        attribution = self.attribution
        described: Dict[str, Any] = {"class": _qualified_name(attribution)}
        if self.is_daam:
            modules = attribution.adapter.attention_modules()
            described["blocks"] = [next(i for i, module in enumerate(modules)
                                        if module is layer) for layer in attribution.layer]
        inner = getattr(attribution, "attribution_method", None)
        if inner is not None:  # NoiseTunnel
            described["wraps"] = _qualified_name(inner)
        for part in (attribution, inner):
            layer = getattr(part, "layer", None)
            if isinstance(layer, nn.Module):
                described["layer"] = _module_name(self.model, layer)
            elif isinstance(layer, (list, tuple)) and not self.is_daam:
                described["layer"] = [_module_name(self.model, module) for module in layer]
        multiplies = getattr(inner or attribution, "_multiply_by_inputs", None)
        if isinstance(multiplies, bool):
            described["multiplies_by_inputs"] = multiplies
        forward = getattr(attribution, "forward_func", None)
        if forward is not None and not explains(forward, self.model):
            described["forward_func"] = _model_identity(forward) \
                if isinstance(forward, nn.Module) else stable_repr(forward)
        if not hasattr(self.attribution, "attribute"):
            described["callable"] = stable_repr(self.attribution)
        described["arguments"] = _jsonable(self.kwargs)
        return described


def as_method(spec: Any, model: Optional[nn.Module] = None, return_flow: bool = False,
              internal_batch_size: Optional[int] = None,
              attribute_kwargs: Optional[Dict[str, Any]] = None) -> Method:
    """A :class:`Method` from an attribution object, ``(attribution, attribute_kwargs)``, or a
    callable (which needs ``model``). The model is the attribution's own forward module
    (``forward_func``) unless given."""
    kwargs = dict(attribute_kwargs or {})
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        spec, kwargs = spec[0], {**spec[1], **kwargs}
    if isinstance(spec, str):
        raise TypeError(f"Expected an attribution object or a callable, got the name {spec!r}; "
                        f"captum_daam.compare takes the names {', '.join(METHOD_NAMES)}.")
    forward = getattr(spec, "forward_func", None)
    if model is None:
        from .attr import DAAM

        if isinstance(spec, DAAM):
            forward = forward if isinstance(forward, nn.Module) else spec.adapter.model
        if isinstance(forward, ScoresOf):
            forward = forward.model
        if not isinstance(forward, nn.Module):
            raise TypeError(
                f"Expected a Captum attribution whose forward_func is the model (an "
                f"nn.Module), or model= with {_describe(spec)}.")
        model = forward
    if not (hasattr(spec, "attribute") or callable(spec)):
        raise TypeError(f"Expected a Captum attribution or a callable (images, targets) -> "
                        f"maps, got {type(spec).__name__}.")
    return Method(spec, model, kwargs, return_flow, internal_batch_size)


def named_method(name: str, model: nn.Module, grid: Tuple[int, int],
                 image_shape: Tuple[int, ...], batch_size: int = 64) -> Any:
    """The attribution the command line names ``name``, built for ``model``, as
    ``(attribution, attribute_kwargs)``. ``grid`` is the model's patch grid (the random maps'
    grid and Occlusion's window), ``image_shape`` (C, H, W)."""
    from captum.attr import (
        InputXGradient, IntegratedGradients, LayerGradCam, Occlusion, Saliency)

    from .attr import DAAM, AttentionRollout, GradientRollout

    if name == "daam":
        return DAAM(model), {}
    if name == "rollout":
        return AttentionRollout(model), {}
    if name == "gradient-rollout":
        return GradientRollout(model), {}
    if name == "legrad":
        from .attr import LeGrad

        return LeGrad(model), {}
    scores = ScoresOf(model)  # Captum's own attributions need scores as a tensor
    if name == "gradcam":
        from .token_grid import TokenGrid

        return LayerGradCam(scores, TokenGrid(model, last_block_input(model))), \
            {"relu_attributions": True}
    if name == "integrated-gradients":
        return IntegratedGradients(scores), {"n_steps": 32, "internal_batch_size": batch_size}
    if name == "saliency":
        return Saliency(scores), {}
    if name == "input-x-gradient":
        return InputXGradient(scores), {}
    if name == "occlusion":
        channels, height, width = image_shape
        window = (channels, max(1, height // grid[0]), max(1, width // grid[1]))
        stride = (channels, max(1, window[1] // 2), max(1, window[2] // 2))
        # Captum runs perturbations_per_eval x batch images per forward pass
        return Occlusion(scores), {"sliding_window_shapes": window, "strides": stride,
                                  "baselines": 0.0,
                                  "perturbations_per_eval": max(1, 256 // batch_size)}
    if name == "random":
        return RandomMaps(grid), {}
    raise ValueError(f"Expected a method among {', '.join(METHOD_NAMES)}, got {name!r}.")


def last_block_input(model: nn.Module) -> nn.Module:
    """The first norm of the model's last transformer block, whose output is that block's
    input tokens: where Grad-CAM reads a ViT (pytorch-grad-cam's ``blocks[-1].norm1``;
    ``ln_1`` in torchvision, ``layernorm_before`` in transformers)."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    latent = {id(module) for module in adapter.latent_query_modules()}
    attention = [module for module in adapter.attention_modules() if id(module) not in latent]
    block = adapter.block_modules(attention[-1:])[0]
    for module in block.modules():
        if "norm" in type(module).__name__.lower() or isinstance(module, nn.LayerNorm):
            return module
    raise TypeError(
        f"Expected a norm in the last block ({_module_name(model, block)}) "
        f"of this model for gradcam; give LayerGradCam(model, TokenGrid(model, layer)) "
        f"with the layer to read instead.")


def _model_identity(module: nn.Module) -> Dict[str, str]:
    from .dataset import _model_identity as identity

    return identity(module)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    block = getattr(module, "block", None)  # a TokenGrid reads a block of the model
    if isinstance(block, nn.Module):
        return f"{type(module).__name__}({_module_name(model, block)})"
    return type(module).__name__


def _qualified_name(value: Any) -> str:
    kind = value if inspect.isfunction(value) else type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _describe(value: Any) -> str:
    return type(value).__name__ if not inspect.isfunction(value) else value.__qualname__


def _jsonable(value: Any) -> Any:
    """A value as JSON holds it, the same in every process: tensors by their values (or a
    SHA-256 of them when large), other objects by their repr without addresses."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, Tensor):
        if value.numel() <= 16:
            return {"tensor": value.detach().cpu().double().tolist()}
        data = value.detach().cpu().contiguous()
        return {"tensor_sha256": hashlib.sha256(
            data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
            "shape": list(data.shape)}
    if isinstance(value, torch.dtype):
        return str(value)
    from .data import stable_repr

    return stable_repr(value)


Explain = Callable[[Tensor, Tensor], Tensor]
