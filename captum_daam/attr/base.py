"""What the attributions of this package share: the adapter, the flow's attention modules,
the checks made before any work, and the scored forward pass."""

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _format_tensor_into_tuples, _select_targets
from captum._utils.typing import TargetType
from captum.attr import LayerAttribution
from torch import Tensor, nn

from .._targets import format_target
from .._warnings import warn_user
from ..adapters import BlockRecord, ViTAdapter, adapter_for

__all__ = ["ViTLayerAttribution", "backward_to_records"]


class ViTLayerAttribution(LayerAttribution):
    """Base class of the attributions over a Vision Transformer's attention blocks.

    It finds the model's adapter, selects the attention modules of the blocks (``layer``),
    and checks inputs and targets before any work, as :class:`~captum_daam.DAAM` documents.
    """

    def __init__(
        self,
        model: Union[nn.Module, Callable[..., Tensor]],
        layer: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        adapter: Optional[ViTAdapter] = None,
    ) -> None:
        """The arguments are DAAM's (:class:`~captum_daam.DAAM`)."""
        if adapter is None:
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"Expected a torch.nn.Module, got {type(model).__name__}. To explain a "
                    f"forward function, pass adapter=... for the model it runs."
                )
            adapter = adapter_for(model)
        attention_modules = _select_attention_modules(adapter, layer)
        LayerAttribution.__init__(self, model, attention_modules)
        self.adapter = adapter

    def _warn_if_training(self) -> None:
        if self._in_training_mode():
            warn_user(
                "The model is in training mode, so dropout makes the explained forward pass "
                "random. Call model.eval() first."
            )

    def _warn_if_explaining_a_feature(self, target: TargetType) -> None:
        if target is None and self.adapter.outputs_features:
            warn_user(
                f"This model outputs {self.adapter.num_outputs} features, not class scores (it "
                f"has no classifier head), so target=None explains each example's largest "
                f"feature. Give target= a feature index or, with DAAM, importance= weights, a "
                f"MemoryBank or a callable, as for a self-supervised backbone."
            )

    def _warn_if_all_zero(self, maps: Tensor) -> None:
        """Warn about examples whose maps (B, ...) are zero everywhere: nothing to show."""
        empty = (maps.flatten(1).amax(dim=1) <= 0).nonzero().flatten().tolist()
        if empty:
            listed = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            warn_user(
                f"{type(self).__name__}'s maps are zero everywhere for {len(empty)} of "
                f"{maps.shape[0]} examples ({listed}): no block contributes positively to "
                f"the target score through the [class] token's attention. A classifier "
                f"initialised to zero (torchvision's, before training) gives this."
            )

    def _scores(self, output: object) -> Tensor:
        """The (B, K) class scores or features in the forward pass's output."""
        scores = self.adapter.output_scores(output)
        if not isinstance(scores, Tensor) or scores.dim() != 2:
            raise ValueError(
                f"Expected the model to return class scores or features shaped (B, K), "
                f"got {_describe(scores)}."
            )
        return scores

    @staticmethod
    def _target_score(scores: Tensor, target_indices: Optional[Tensor]) -> Tensor:
        """The sum over the batch of each example's target score (None: the predicted class)."""
        if target_indices is None:
            target_indices = scores.argmax(dim=1)
        elif int(target_indices.max()) >= scores.shape[1]:
            raise ValueError(
                f"Expected target classes below the model's {scores.shape[1]} "
                f"outputs, got {int(target_indices.max())}."
            )
        return _select_targets(scores, target_indices).sum()

    def _in_training_mode(self) -> bool:
        modules = [self.forward_func, self.adapter.model, *self.layer]
        return any(module.training for module in modules if isinstance(module, nn.Module))

    def _patch_grid(self, grid: Optional[Tuple[int, int]], num_tokens: int) -> Tuple[int, int]:
        """The grid of the forward pass's patch tokens: the adapter's, checked against them."""
        num_patches = num_tokens - self.adapter.num_prefix_tokens
        if grid is None:
            grid = self.adapter.grid_from_tokens(num_patches)
        if grid[0] * grid[1] != num_patches:
            raise ValueError(
                f"Expected {grid[0]}x{grid[1]} = {grid[0] * grid[1]} patch tokens after "
                f"{self.adapter.num_prefix_tokens} prefix tokens, got {num_patches} "
                f"({num_tokens} tokens in all). Check the adapter's num_prefix_tokens and "
                f"grid_size."
            )
        return tuple(grid)

    def _check_inputs(self, inputs: Union[Tensor, Tuple[Tensor]]) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "DAAM needs gradients, which torch.inference_mode() disables. Call attribute() "
                "outside inference mode (torch.no_grad() is fine)."
            )
        if not isinstance(inputs, (Tensor, tuple)):
            raise TypeError(f"Expected inputs to be a Tensor, got {type(inputs).__name__}.")
        formatted = _format_tensor_into_tuples(inputs)
        if len(formatted) != 1 or not isinstance(formatted[0], Tensor):
            raise ValueError(
                f"Expected one image tensor, got a tuple of {len(formatted)} items. Pass other "
                f"forward arguments through additional_forward_args."
            )
        images = formatted[0]
        channels = self.adapter.in_channels
        expected = f"(B, {channels if channels is not None else 'C'}, H, W)"
        if images.dim() != 4 or (channels is not None and images.shape[1] != channels):
            raise ValueError(f"Expected images shaped {expected}, got {tuple(images.shape)}.")
        if images.shape[0] == 0:
            raise ValueError("Expected at least one image, got an empty batch.")
        if not images.is_floating_point():
            raise TypeError(f"Expected floating-point images, got dtype {images.dtype}.")
        if images.is_inference():
            raise RuntimeError(
                "The images were created under torch.inference_mode(), which rules out "
                "gradients. Create them outside inference mode, or pass images.clone() made "
                "outside it."
            )
        if not bool(torch.isfinite(images).all()):
            raise ValueError("Expected finite images, got NaN or infinite values.")
        return images

    def _check_target(
        self, target: TargetType, batch_size: int, device: torch.device
    ) -> Optional[Tensor]:
        """Targets as a (B,) long tensor, or None for the predicted classes."""
        return format_target(target, batch_size, device, self.adapter.num_outputs)


def _select_attention_modules(
    adapter: ViTAdapter, layer: Optional[Union[nn.Module, Sequence[nn.Module]]]
) -> List[nn.Module]:
    """The attention modules of the flow, in block order; checks a user's choice."""
    all_modules = adapter.attention_modules()
    if layer is None:
        return list(all_modules)
    chosen = [layer] if isinstance(layer, nn.Module) else list(layer)
    if not chosen:
        raise ValueError("Expected at least one attention module in layer, got an empty list.")
    position = {id(module): index for index, module in enumerate(all_modules)}
    for module in chosen:
        if id(module) not in position:
            raise ValueError(
                f"Expected layer to hold attention modules of this model's blocks (e.g. "
                f"{adapter.layer_example}), got {type(module).__name__}, which is not one of "
                f"its {len(all_modules)} attention modules."
            )
    if len({id(module) for module in chosen}) != len(chosen):
        raise ValueError("Expected each attention module at most once in layer, got repeats.")
    return sorted(chosen, key=lambda module: position[id(module)])


def backward_to_records(score: Tensor, records: List[BlockRecord]) -> None:
    """One activation-only backward pass; the records' hooks keep the [class] gradient rows.

    The gradient is taken only with respect to the first recorded block: every later block
    lies on the way from the score to it, so all their hooks fire, and no weight gradient
    is computed.
    """
    for index, record in enumerate(records):
        if record.class_attention is None:
            raise RuntimeError(
                f"Attention module {index} of the flow did not run during the forward pass; "
                f"check that the model uses the modules given as layer."
            )
        if record.anchor is None:
            raise RuntimeError(
                f"The model ran attention module {index} of the flow with gradients disabled "
                f"(reentrant gradient checkpointing does), so DAAM cannot take gradients there. "
                f"Turn checkpointing off (model.set_grad_checkpointing(False)) or use "
                f"non-reentrant checkpointing."
            )
        record.close()  # a checkpointed backward re-runs the forward: record nothing more
    if not score.requires_grad:
        raise ValueError(
            "The target scores do not depend on the model's attention blocks, so there is "
            "nothing to attribute. Check that the forward function returns the model's output."
        )
    torch.autograd.grad(score, records[0].anchor, allow_unused=True)
    for index, record in enumerate(records):
        if record.class_gradient is None:
            raise RuntimeError(
                f"The target scores do not depend on attention module {index} of the flow "
                f"through its first block; DAAM expects blocks that run one after another."
            )


def _describe(output: object) -> str:
    if isinstance(output, Tensor):
        return f"a tensor shaped {tuple(output.shape)}"
    return f"a {type(output).__name__}"
