"""What the attributions of this package share: the adapter, the flow's attention modules,
the checks made before any work, and the scored forward pass."""

import inspect
import itertools
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _select_targets,
)
from captum._utils.typing import TargetType
from captum.attr import LayerAttribution
from torch import Tensor, nn

from .._outputs import describe_output
from .._patches import patches_as_images
from .._targets import check_target_range, format_target
from .._warnings import warn_user
from ..adapters import BlockLayout, BlockRecord, ViTAdapter, adapter_for, forward_module
from ..adapters.base import _adapter_class, _video_or_detection
from ..decompose import place_on_grid, resample_to_grid, tokens_to_grid

__all__ = ["ViTLayerAttribution", "backward_to_records"]

#: Modules whose forward pass differs between training and eval mode.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
_INTERPOLATE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


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
        self._refuse_image_text_model(model)
        if adapter is None:
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"Expected a torch.nn.Module, got {type(model).__name__}. To explain a "
                    f"forward function, pass adapter=... for the model it runs."
                )
            adapter = adapter_for(model)
        if isinstance(model, nn.Module):
            model = forward_module(model)
        attention_modules = _select_attention_modules(adapter, layer)
        LayerAttribution.__init__(self, model, attention_modules)
        self.adapter = adapter

    def _refuse_image_text_model(self, model: object) -> None:
        """Refuses an image-text model (CLIP, SigLIP, a dual encoder), whose forward needs
        texts too, before any work; a wrapper that only distributes or compiles it as well."""
        inner = forward_module(model) if isinstance(model, nn.Module) else model
        if not isinstance(inner, nn.Module):
            return
        if all(callable(getattr(inner, name, None)) for name in _OPEN_CLIP_ENCODERS):
            tower = "model.visual"
        elif all(callable(getattr(inner, name, None)) for name in _HF_IMAGE_TEXT_FEATURES):
            tower = "model.vision_model"
        elif _takes_token_ids_first(inner) and _video_or_detection(inner, inside=False) is None:
            raise TypeError(
                f"Expected an image model, got a {type(inner).__name__}, whose forward takes "
                f"token ids first (a vision-language model), which {type(self).__name__} "
                f"cannot give it. Explain its vision tower, e.g. "
                f"{type(self).__name__}({_vision_tower_path(inner)}), with the tower's output "
                f"as the scores or importance= weights."
            )
        else:
            return
        raise TypeError(
            f"Expected an image model, got a {type(inner).__name__}, an image-text model whose "
            f"forward takes texts as well as images, which {type(self).__name__} does not "
            f"give it. Explain image-text matching with "
            f"captum_daam.ImageTextSimilarity(model, input_ids=...), or the image embedding "
            f"with {type(self).__name__}({tower})."
        )

    def _output_width(self) -> Optional[int]:
        """The width of the forward pass's scores where it is known before the forward pass
        (:func:`forward_output_width`), else None: then targets and importance weights are
        checked right after the forward pass, against the scores' width."""
        return forward_output_width(self.forward_func, self.adapter)[0]

    def _block_attention(self) -> List[nn.Module]:
        """The attention modules of the model's blocks: all but an attention-pool head's."""
        latent = {id(module) for module in self.adapter.latent_query_modules()}
        return [module for module in self.adapter.attention_modules() if id(module) not in latent]

    def _leave_out_attention_pool(self, layer_given: bool, why: str) -> None:
        """Without ``layer``, drop an attention-pool head's modules from :attr:`layer`; with
        it, refuse them (their learned queries are no tokens), saying ``why``."""
        blocks = {id(module) for module in self._block_attention()}
        if not layer_given:
            self.layer = [module for module in self.layer if id(module) in blocks]
        elif any(id(module) not in blocks for module in self.layer):
            raise ValueError(
                f"Expected layer to hold the attention modules of the model's blocks, got its "
                f"attention-pool head, whose learned queries are no tokens: {why} Leave it out."
            )

    def _warn_if_training(self) -> None:
        if self._in_training_mode():
            warn_user(
                "The model is in training mode, so dropout makes the explained forward pass "
                "random. Call model.eval() first."
            )

    def _warn_if_explaining_a_feature(self, target: TargetType) -> None:
        # A head in the forward module (nn.Sequential(backbone, nn.Linear(...)), or a module
        # declaring its num_outputs) gives scores, whatever the backbone's adapter says.
        declared = forward_output_width(self.forward_func, self.adapter)[1] == "declared"
        if target is None and self.adapter.outputs_features and not declared:
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
                f"the target score through the attention rows explained. A classifier "
                f"initialised to zero (torchvision's, before training) gives this."
            )

    def _warn_if_class_token_unread(self) -> None:
        """Warn that the [class] rows explain only part of the output of a pooling head."""
        if not self.adapter.reads_class_token:
            pooling = getattr(self.adapter.model, "global_pool", None)
            how = f"global_pool={pooling!r}" if isinstance(pooling, str) else "its head"
            # A head that pools every token leaves the last block's [class] row unread; one
            # that reads some rows (DINOv2's: [class] and the patches' mean) reads it too.
            pools_all = self.adapter.head_queries is None
            default = "'all'" if pools_all else "'head' (the rows its head reads)"
            remedy = (
                f" DAAM explains the pooled output in full with queries={default}, its default "
                f"for this model." if self.adapter.self_attention else ""
            )
            last = ", and the last block's map is zero" if pools_all else ""
            warn_user(
                f"This {type(self.adapter.model).__name__} pools its output with {how}, not "
                f"from the [class] token alone, whose attention rows {type(self).__name__} "
                f"follows: the maps show only what reaches the output through the [class] "
                f"token{last}.{remedy}"
            )

    def _scores(self, output: object) -> Tensor:
        """The (B, K) class scores or features in the forward pass's output."""
        scores = self.adapter.output_scores(output)
        if not isinstance(scores, Tensor) or scores.dim() != 2:
            raise ValueError(
                f"Expected the model to return class scores or features shaped (B, K), or an "
                f"output object with logits, image_embeds, pooler_output or "
                f"last_hidden_state, got {describe_output(output)}."
            )
        return scores

    @staticmethod
    def _target_score(scores: Tensor, target_indices: Optional[Tensor]) -> Tensor:
        """The sum over the batch of each example's target score (None: the predicted class),
        the targets checked against the scores' width first, before any backward pass."""
        if target_indices is None:
            target_indices = scores.argmax(dim=1)
        else:
            check_target_range(target_indices, scores.shape[1])
        return _select_targets(scores, target_indices).sum()

    def _in_training_mode(self) -> bool:
        """Whether the explained forward pass runs anything in training mode: the ViT or its
        attention modules (timm's fused attention drops out only in training mode), or a
        dropout or batch-norm layer anywhere in the forward module. A wrapper's or container's
        own flag (DataParallel, nn.Sequential(normalize, vit)) changes nothing and is ignored.
        """
        if any(module.training for module in [self.adapter.model, *self.layer]
               if isinstance(module, nn.Module)):
            return True
        if not isinstance(self.forward_func, nn.Module):
            return False
        return any(
            module.training
            for module in self.forward_func.modules()
            if isinstance(module, _MODE_DEPENDENT) or type(module).__name__ == "DropPath"
        )

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

    def _on_grids(
        self, token_maps: Sequence[Tensor], layouts: Sequence[BlockLayout], batch_size: int
    ) -> List[Tensor]:
        """Block maps over the tokens each block's queries read, (B * W, N_l) each, as maps
        over their own patch grids (B, gh_l, gw_l): the prefix tokens dropped and the patches
        laid row by row, or each token placed where its layout's ``positions`` say."""
        block_maps = []
        for index, (tokens, layout) in enumerate(zip(token_maps, layouts)):
            if layout.positions is None:
                grid = self._patch_grid(layout.grid, tokens.shape[-1])
                block_maps.append(tokens_to_grid(tokens, self.adapter.num_prefix_tokens, grid))
                continue
            windows, per_window = layout.positions.shape[:2]
            if tuple(tokens.shape) != (batch_size * windows, per_window):
                raise ValueError(
                    f"Expected block {index}'s attention to read {windows} window(s) of "
                    f"{per_window} tokens per image ({batch_size * windows} x {per_window} for "
                    f"{batch_size} images), as its adapter laid it out, got "
                    f"{tokens.shape[0]} x {tokens.shape[1]}. Check the adapter's "
                    f"block_layouts."
                )
            block_maps.append(place_on_grid(tokens, layout.positions, layout.grid))
        return block_maps

    def _check_inputs(self, inputs: Union[Tensor, Tuple[Tensor]]) -> Tuple[Tensor, bool]:
        """The image batch, checked against the model (which must have values, and take the
        images' dtype); and whether it came as a tuple (Captum answers a tuple with a tuple)."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "DAAM needs gradients, which torch.inference_mode() disables. Call attribute() "
                "outside inference mode (torch.no_grad() is fine)."
            )
        self._check_model_has_values()
        if isinstance(inputs, Mapping):
            inputs = _pixel_values(inputs)
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
        self._check_image_dtype(images)
        return images, _is_tuple(inputs)

    def _check_model_has_values(self) -> None:
        """Refuses a model built on the meta device, whose tensors have shapes but no values
        (the constructor accepts it: only the adapter's view of its structure is needed)."""
        for module in [self.forward_func, self.adapter.model, *self.layer]:
            if isinstance(module, nn.Module) and any(
                tensor.is_meta for tensor in itertools.chain(module.parameters(), module.buffers())
            ):
                raise ValueError(
                    f"Expected a model with weights, got a {type(module).__name__} whose "
                    f"parameters are on the meta device and have no values. Load its weights "
                    f"first, e.g. model.to_empty(device='cpu') then "
                    f"model.load_state_dict(state_dict)."
                )

    def _check_image_dtype(self, images: Tensor) -> None:
        """Refuses images of another floating dtype than the model's (the adapter's
        ``image_dtype``), which its first layer would reject with a bare dtype error. Under
        torch.autocast only float64 images are refused: autocast casts every lower precision."""
        if self.forward_func is not self.adapter.model:
            return  # a wrapper or forward function in between may convert the images
        model_dtype = self.adapter.image_dtype
        if model_dtype is None or images.dtype == model_dtype:
            return
        if _autocast_enabled(images.device.type):
            if images.dtype != torch.float64 or model_dtype == torch.float64:
                return
            raise ValueError(
                f"Expected images that torch.autocast casts (float32 or lower precision) for "
                f"this {model_dtype} model, got {images.dtype}, which autocast leaves as it "
                f"is. Convert them with images.to({model_dtype})."
            )
        raise ValueError(
            f"Expected images of the model's dtype {model_dtype}, got {images.dtype}. Convert "
            f"them with images.to({model_dtype}), or the model with model.to({images.dtype}), "
            f"or run under torch.autocast for mixed precision."
        )

    def _check_target(
        self, target: TargetType, batch_size: int, device: torch.device
    ) -> Optional[Tensor]:
        """Targets as a (B,) long tensor, or None for the predicted classes; their range is
        checked here where the forward's width is known before the forward pass."""
        return format_target(target, batch_size, device, self._output_width())


#: An image-text model's encoders: transformers' CLIPModel, SiglipModel,
#: VisionTextDualEncoderModel ...; open_clip's CLIP.
_HF_IMAGE_TEXT_FEATURES = ("get_image_features", "get_text_features")
_OPEN_CLIP_ENCODERS = ("encode_image", "encode_text")


def _takes_token_ids_first(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model whose forward's first argument is token ids
    (a language or vision-language model), which an image batch cannot be."""
    if not type(model).__module__.startswith("transformers."):
        return False
    try:
        parameters = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[0] == "input_ids"


def _vision_tower_path(model: nn.Module) -> str:
    """``model.<path>`` of the vision model inside ``model`` that an adapter takes, or a
    placeholder when none does."""

    for name, module in model.named_modules():
        if name and _adapter_class(module) is not None:
            return f"model.{name}"
    return "model.<vision tower>"


def forward_output_width(
    forward: object, adapter: ViTAdapter
) -> Tuple[Optional[int], Optional[str]]:
    """The width of the scores ``forward`` returns, where it is known before the forward pass,
    and where it comes from: ``adapter.num_outputs`` ("adapter") when ``forward`` is the
    adapter's model itself (or an adapter given its modules directly, told the width), or an
    ``nn.Sequential`` ending in that model; else ("declared") the int ``num_outputs`` a
    forward module declares (an image-text similarity declares its number of texts), or the
    ``out_features`` of the last module of an ``nn.Sequential``. (None, None) otherwise: a
    forward function, or a module that declares nothing, is checked after the forward pass.
    """
    if forward is adapter.model or adapter.model is None:
        return adapter.num_outputs, "adapter"
    if not isinstance(forward, nn.Module):
        return None, None
    declared = getattr(forward, "num_outputs", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared, "declared"
    if isinstance(forward, nn.Sequential) and len(forward) > 0:
        last = forward[-1]
        width, source = forward_output_width(last, adapter)
        if width is not None:
            return width, source
        features = getattr(last, "out_features", None)
        if isinstance(features, int) and not isinstance(features, bool):
            return features, "declared"
    return None, None


def _pixel_values(inputs: Mapping) -> Tensor:
    """The images in a processor's output (transformers' ``BatchFeature``: a Mapping whose
    ``pixel_values`` are the image tensor); any other Mapping is refused naming its keys."""
    images = inputs.get("pixel_values")
    if isinstance(images, Tensor) and isinstance(inputs.get("spatial_shapes"), Tensor):
        return patches_as_images(inputs)  # SigLIP 2's processor: patches of one grid
    if isinstance(images, Tensor):
        return images
    if images is not None:
        raise TypeError(
            f"Expected the pixel_values of the {type(inputs).__name__} given as inputs to be a "
            f"Tensor, got {type(images).__name__}. Call the processor with return_tensors='pt'."
        )
    keys = ", ".join(repr(key) for key in inputs.keys()) or "none"
    raise TypeError(
        f"Expected inputs to be a Tensor, got {type(inputs).__name__} with keys {keys} and no "
        f"'pixel_values' tensor. Pass the image tensor, or a processor's output, whose "
        f"pixel_values are explained."
    )


def check_output_options(
    internal_batch_size: Optional[int],
    input_shaped: bool,
    interpolate_mode: str,
    return_flow: bool = False,
) -> None:
    """The options shared by every attribute(), checked before any work."""
    if internal_batch_size is not None and (
        not isinstance(internal_batch_size, int)
        or isinstance(internal_batch_size, bool)
        or internal_batch_size < 1
    ):
        raise ValueError(
            f"Expected internal_batch_size to be None or a positive int, got "
            f"{internal_batch_size!r}."
        )
    if input_shaped and return_flow:
        raise ValueError(
            "Expected either input_shaped=True (the final map at the input's size) or "
            "return_flow=True (every block's map on the patch grid), got both. Upsample a "
            "flow with LayerAttribution.interpolate(flow, (H, W))."
        )
    if interpolate_mode not in _INTERPOLATE_MODES:
        raise ValueError(
            f"Expected interpolate_mode to be one of {', '.join(_INTERPOLATE_MODES)}, got "
            f"{interpolate_mode!r}."
        )


def chunks(batch_size: int, internal_batch_size: Optional[int]) -> List[slice]:
    """The slices of a batch taken ``internal_batch_size`` examples at a time (all at once
    for None)."""
    size = batch_size if internal_batch_size is None else internal_batch_size
    return [slice(start, min(start + size, batch_size)) for start in range(0, batch_size, size)]


def over_chunks(
    compute: Callable[[Tensor, Optional[Tensor], Any], Tensor], images: Tensor,
    target_indices: Optional[Tensor], additional_forward_args: Any,
    internal_batch_size: Optional[int],
) -> Tensor:
    """``compute(images, targets, additional_forward_args)`` on each chunk of at most
    ``internal_batch_size`` examples, the chunk's share of the targets and of the forward
    arguments, concatenated along the batch."""
    return torch.cat([
        compute(
            images[examples],
            None if target_indices is None else target_indices[examples],
            split_forward_args(additional_forward_args, examples, images.shape[0]),
        )
        for examples in chunks(images.shape[0], internal_batch_size)
    ])


def split_forward_args(additional_forward_args: Any, examples: slice, batch_size: int) -> Any:
    """The additional forward arguments of a chunk of the batch: tensors whose first dimension
    is the batch size are split with the inputs (as Captum splits them); everything else, an
    attention mask shared by all examples say, is passed whole."""
    if additional_forward_args is None or examples == slice(0, batch_size):
        return additional_forward_args
    formatted = _format_additional_forward_args(additional_forward_args)
    return tuple(
        argument[examples]
        if isinstance(argument, Tensor) and argument.dim() > 0 and len(argument) == batch_size
        else argument
        for argument in formatted
    )


def format_attributions(
    maps: Tensor,
    images: Tensor,
    is_tuple: bool,
    input_shaped: bool = False,
    interpolate_mode: str = "bilinear",
) -> Union[Tensor, Tuple[Tensor]]:
    """Raw maps (B, L, gh, gw) as attribute() returns them: detached on the input's device and
    dtype; with ``input_shaped``, (B, 1, gh, gw) brought to the input's (B, C, H, W), each
    channel the same map; a 1-tuple when the inputs came as a tuple."""
    maps = maps.detach().to(device=images.device, dtype=images.dtype)
    if input_shaped:
        maps = LayerAttribution.interpolate(maps, tuple(images.shape[-2:]), interpolate_mode)
        maps = maps.expand(-1, images.shape[1], -1, -1).contiguous()
    return _format_output(is_tuple, (maps,))


def flow_grid(grids: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """The grid of the flow: the finest of the blocks' grids (the most cells; the first of
    equals)."""
    return max(grids, key=lambda grid: grid[0] * grid[1])


def on_one_grid(block_maps: Sequence[Tensor]) -> Tensor:
    """Block maps (B, gh_l, gw_l) stacked on the flow's grid, (B, L, gh, gw): each brought to
    the finest grid by area-weighted resampling, which keeps its sum
    (:func:`~captum_daam.decompose.resample_to_grid`)."""
    grid = flow_grid([tuple(block.shape[-2:]) for block in block_maps])
    return torch.stack([resample_to_grid(block, grid) for block in block_maps], dim=1)


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


def backward_to_records(
    score: Tensor, records: List[BlockRecord], layouts: Optional[Sequence[BlockLayout]] = None
) -> None:
    """One activation-only backward pass; the records' hooks keep the [class] gradient rows.

    The gradient is taken only with respect to the first recorded block of each branch
    (``layouts``; one branch when None): every later block of the branch lies on the way from
    the score to it, so all their hooks fire, and no weight gradient is computed.
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
    branches = [0] * len(records) if layouts is None else [layout.branch for layout in layouts]
    first_of_branch = {}
    for record, branch in zip(records, branches):
        first_of_branch.setdefault(branch, record)
    roots = [record.anchor for record in first_of_branch.values()]
    torch.autograd.grad(score, roots, allow_unused=True)
    for index, record in enumerate(records):
        if record.class_gradient is None:
            raise RuntimeError(
                f"The target scores do not depend on attention module {index} of the flow "
                f"through the first block of its branch; DAAM expects the blocks of a branch "
                f"to run one after another."
            )


def _autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (False for one autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type: one flag for CPU, one for CUDA
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else (
            device_type == "cuda" and torch.is_autocast_enabled()
        )
    except RuntimeError:  # a device type without autocast, e.g. meta
        return False
