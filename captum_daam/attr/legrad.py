"""LeGrad, the layer-wise gradient of the attention maps, as a Captum attribution sharing
DAAM's adapters, for every model whose blocks have full self-attention.

Each block's score is the model's own output read from that block's tokens. One forward pass
gives every block's score: the blocks' inputs are detached, so that a block's output depends
on its own attention but on no earlier block's, and the last block hands on every chosen
block's output stacked along the batch, so that the layers after it (final norm, pooling,
head) score all of them at once. One backward pass of the summed scores then gives at each
block's attention output the gradient of that block's score alone.
"""

import threading
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _run_forward, _select_targets
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..adapters import BlockLayout, BlockRecord, Hook, ViTAdapter
from ..adapters.base import _install
from .._targets import check_target_range
from ..decompose import per_map_scaling, tokens_to_grid
from .base import (
    ViTLayerAttribution,
    backward_to_records,
    check_output_options,
    format_attributions,
    over_chunks,
)

__all__ = ["LeGrad", "legrad_layer_map"]


def legrad_layer_map(gradient: Tensor, values: Tensor) -> Tensor:
    """One block's LeGrad map over the key tokens, (B, N): the mean over heads and over every
    query row of relu(dA), where dA = dO v^T per head is the gradient of the block's score
    with respect to its attention probabilities A (O = A v, so dA follows from the gradient
    dO at the attention output before the projection).

    Args:
        gradient: (B, H, N, d) the gradient at the attention output, per head.
        values: (B, H, N, d) the values.
    """
    dtype = torch.promote_types(gradient.dtype, values.dtype)
    attention_gradient = gradient.to(dtype) @ values.to(dtype).transpose(-2, -1)  # (B, H, N, N)
    return attention_gradient.clamp_(min=0).mean(dim=(1, 2))


def _tokens_of(output: object) -> Tensor:
    """The tokens a block returns: its output, or the first element of a tuple."""
    tokens = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"Expected a block to return its tokens as a Tensor (or first in a tuple), got "
            f"{type(tokens).__name__}."
        )
    return tokens


def _batch_dim(attention: nn.Module) -> int:
    """Where the batch is in the tokens of the block around ``attention``: first, unless the
    block runs an nn.MultiheadAttention built with batch_first=False, sequence first."""
    return 1 if isinstance(attention, nn.MultiheadAttention) and not attention.batch_first else 0


class LeGrad(ViTLayerAttribution, GradientAttribution):
    r"""
    LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, "LeGrad: An Explainability
    Method for Vision Transformers via Feature Formation Sensitivity", ICCV 2025,
    https://arxiv.org/abs/2404.03214).

    For each block l of the L chosen blocks, with z^l the tokens after block l:

    - s^l is the target score the model's own layers after its last block (final norm,
      pooling of the [class] token or mean of the tokens, head) read from z^l;
    - dA^l = ds^l / dA^l, the gradient with respect to block l's attention probabilities
      A^l (B, H, N, N) through block l alone (the partial derivative with A^l's inputs
      held fixed: s^l's dependence on earlier blocks' attention is no part of it);
    - E^l = mean over heads h and over every query row i of relu(dA^l), over the key
      columns of the patch tokens ([class], distillation and register tokens dropped).

    The map is (1/L) sum_l E^l, min-max scaled to [0, 1] per image (``normalize=True``, as
    the paper). No [class] token is needed: models that pool the mean of their tokens
    (CLIP- and SigLIP-style towers, timm's ``global_pool='avg'``) are explained as they are.

    Models whose blocks have no full self-attention (class-attention blocks, windows,
    pooled or reduced keys) or whose tokens change between blocks are refused. An
    attention-pool head (timm's ``global_pool='map'``) is part of the layers after the last
    block that read each block's score, not a block of the map.

    One forward and one activation-only backward pass: the blocks' inputs are detached and
    the last block returns the chosen blocks' tokens stacked along the batch (L * B rows, and
    the last block's own when it is not chosen), so that the model's layers after the last
    block compute every s^l at once; the backward of sum_l s^l gives at block l's attention
    output the gradient of s^l alone, dO^l, and dA^l = dO^l v^T per head. The layers after
    the last block must take the L * B rows as a batch of L * B images. Attributions are
    (B, 1, gh, gw), on the input's device and dtype.
    """

    def __init__(
        self,
        model: Union[nn.Module, Callable[..., Tensor]],
        layer: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        adapter: Optional[ViTAdapter] = None,
    ) -> None:
        r"""
        Args:
            model (torch.nn.Module or Callable): The Vision Transformer, or a callable that
                        runs it, with ``adapter`` given.
            layer (torch.nn.Module or list[torch.nn.Module], optional): The attention modules
                        of the blocks whose maps are averaged, taken in block order.
                        Default: None, the last two blocks, as the authors' code
                        (``LeWrapper(model, layer_index=-2)``); give
                        ``adapter_for(model).attention_modules()`` for every block.
            adapter (ViTAdapter, optional): Default: None, the registered adapter of the
                        model's family. Models whose blocks have no full self-attention
                        (CaiT, XCiT, CoaT) are refused.
        """
        ViTLayerAttribution.__init__(self, model, layer, adapter)
        GradientAttribution.__init__(self, self.forward_func)
        if not self.adapter.self_attention:
            raise TypeError(
                f"LeGrad needs full self-attention matrices, but the blocks of this model "
                f"({self.adapter.family}) give attention weights for the [class] query only "
                f"(class-attention blocks, or factorised attention). Use DAAM for this model."
            )
        self._leave_out_attention_pool(
            layer is not None, "LeGrad reads each block's score through that head.")
        if layer is None:
            self.layer = self.layer[-2:]
        self._all_attention = self._block_attention()
        self._blocks = self.adapter.block_modules(self._all_attention)
        if len({id(block) for block in self._blocks}) != len(self._blocks):
            raise TypeError(
                f"LeGrad reads a score from each block's output, but the blocks of this model "
                f"({self.adapter.family}) hold several attention modules each. Use DAAM for "
                f"this model."
            )

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        internal_batch_size: Optional[int] = None,
        input_shaped: bool = False,
        interpolate_mode: str = "bilinear",
        normalize: bool = True,
    ) -> Union[Tensor, Tuple[Tensor]]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor]): Images, (B, C, H, W), as the model takes them.
            target (int, list[int] or Tensor, optional): The output class explained, as in
                        :meth:`DAAM.attribute`: None for each example's predicted class (by
                        the model's output), an int for all, or one class per example.
                        Default: None
            additional_forward_args (Any, optional): Further arguments of the forward
                        function, passed after ``inputs`` in order, as in Captum.
                        Default: None
            internal_batch_size (int, optional): Attribute this many examples at a time,
                        as :meth:`DAAM.attribute`. Default: None, all at once.
            input_shaped (bool, optional): Return the map at the input's shape,
                        (B, C, H, W), as :meth:`DAAM.attribute`; the map is scaled on the
                        patch grid, before it is interpolated. Default: False
            interpolate_mode (str, optional): The interpolation of ``input_shaped``.
                        Default: "bilinear"
            normalize (bool, optional): Min-max scale each image's map to [0, 1], as the
                        paper does (a map that is constant becomes zero). False gives the
                        raw mean over blocks, (1/L) sum_l E^l, non-negative.
                        Default: True

        Returns:
            *Tensor* or *tuple[Tensor]* of **attributions**:
            - **attributions** (*Tensor*): (B, 1, gh, gw), the LeGrad map over the patch
                        grid; (B, C, H, W) with ``input_shaped``; a 1-tuple when ``inputs``
                        is a tuple.

        Examples::

            >>> model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
            >>> maps = LeGrad(model).attribute(torch.rand(2, 3, 224, 224), target=3)
            >>> maps.shape
            torch.Size([2, 1, 14, 14])
        """
        images, is_tuple = self._check_inputs(inputs)
        check_output_options(internal_batch_size, input_shaped, interpolate_mode)
        if not isinstance(normalize, bool):
            raise TypeError(f"Expected normalize to be True or False, got {normalize!r}.")
        grid = self._one_grid(tuple(images.shape[-2:]))
        target_indices = self._check_target(target, images.shape[0], images.device)
        self._warn_if_training()
        self._warn_if_explaining_a_feature(target)
        maps = over_chunks(
            lambda chunk, targets, forward_args: self._legrad(chunk, targets, forward_args, grid),
            images, target_indices, additional_forward_args, internal_batch_size,
        )
        self._warn_if_all_zero(maps)
        if normalize:
            maps = per_map_scaling(maps)
        return format_attributions(maps, images, is_tuple, input_shaped, interpolate_mode)

    def _one_grid(self, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """The grid every block reads, or a ValueError for a model whose blocks attend within
        windows or over other keys, or whose tokens change between blocks (whichever blocks
        ``layer`` picks: the blocks' outputs are stacked, and their maps averaged)."""
        layouts = self.adapter.block_layouts(self._all_attention, image_size)
        if any(layout.positions is not None for layout in layouts):
            raise ValueError(
                f"LeGrad averages maps over the key tokens of full self-attention matrices, but "
                f"the blocks of this model ({self.adapter.family}) attend within windows, over "
                f"keys other than their queries, or read their tokens in another order. Use "
                f"DAAM, which places each block's tokens on the grid."
            )
        if len({layout.branch for layout in layouts}) > 1:
            raise ValueError(
                f"LeGrad reads a score from each block's output, which needs blocks that run "
                f"one after another, but the blocks of this model ({self.adapter.family}) run "
                f"attention in separate branches. Use DAAM, which follows each branch."
            )
        grids = list(dict.fromkeys(layout.grid for layout in layouts))
        if len(grids) > 1:
            listed = ", ".join(
                "tokens from the forward pass" if grid is None else f"{grid[0]}x{grid[1]}"
                for grid in grids
            )
            raise ValueError(
                f"LeGrad scores every block's tokens with the model's head and averages their "
                f"maps, which needs the same tokens in every block, but the blocks of this "
                f"model ({self.adapter.family}) read different grids ({listed}). Use DAAM, "
                f"which resamples each block map to one grid."
            )
        return layouts[0].grid

    def _legrad(
        self,
        images: Tensor,
        target_indices: Optional[Tensor],
        additional_forward_args: Optional[object],
        grid: Optional[Tuple[int, int]],
    ) -> Tensor:
        """One forward and one backward pass: the raw maps (1/L) sum_l E^l, (B, 1, gh, gw)."""
        total: Dict[str, Tensor] = {}

        def fold(record: BlockRecord) -> None:
            # Runs in the backward pass: one block's (B, H, N, N) gradient at a time.
            values = record.values
            gradient = record.gradient.unflatten(-1, (values.shape[1], -1)).transpose(1, 2)
            record.attention = record.values = record.gradient = None
            layer_map = legrad_layer_map(gradient, values)
            total["sum"] = layer_map if "sum" not in total else total["sum"] + layer_map

        batch_size = images.shape[0]
        with torch.enable_grad(), self.adapter.record(
            self.layer, on_gradient=fold, full=True
        ) as records, self._stacked_blocks(records, batch_size) as stacked:
            try:
                output = _run_forward(self.forward_func, images, None, additional_forward_args)
            except RuntimeError as error:
                if not stacked:
                    raise
                raise RuntimeError(
                    f"LeGrad runs the model's layers after its last block once on the "
                    f"{stacked[0]} blocks' tokens stacked along the batch ({stacked[0]} x "
                    f"{batch_size} rows), and they failed on them: {error} LeGrad needs layers "
                    f"after the last block that take each row as one image's tokens."
                ) from error
            if not stacked:
                raise RuntimeError(
                    "The model's last block did not run during the forward pass; check that "
                    "the forward function runs the model's blocks."
                )
            scores = self._scores(output)
            if scores.shape[0] != stacked[0] * batch_size:
                raise ValueError(
                    f"Expected the model's layers after its last block to score each of the "
                    f"{stacked[0]} blocks' tokens stacked along the batch ({stacked[0]} x "
                    f"{batch_size} rows), got scores shaped {tuple(scores.shape)}. LeGrad "
                    f"needs a head that scores every row of its input."
                )
            per_block = scores.unflatten(0, (stacked[0], batch_size))
            if target_indices is None:
                target_indices = per_block[-1].argmax(dim=1)  # the model's own output
            check_target_range(target_indices, scores.shape[1])
            chosen = per_block[: len(self.layer)]
            score = _select_targets(chosen.flatten(0, 1), target_indices.repeat(len(chosen)))
            # Each block is a branch of its own: its input is detached.
            layouts = [BlockLayout(grid, index) for index in range(len(records))]
            backward_to_records(score.sum(), records, layouts)
        maps = total["sum"] / len(self.layer)
        patch_grid = self._patch_grid(grid, maps.shape[-1])
        return tokens_to_grid(maps, self.adapter.num_prefix_tokens, patch_grid).unsqueeze(1)

    @contextmanager
    def _stacked_blocks(
        self, records: Sequence[BlockRecord], batch_size: int
    ) -> Iterator[List[int]]:
        """Hooks, always removed, that detach the chosen blocks' inputs and make the model's
        last block return the chosen blocks' tokens stacked along the batch (then its own,
        when it is not chosen). Yields a list that holds, once the last block has run, the
        number of blocks stacked."""
        block_of = {id(attention): block
                    for attention, block in zip(self._all_attention, self._blocks)}
        chosen = [block_of[id(attention)] for attention in self.layer]
        last_attention, last = self._all_attention[-1], self._blocks[-1]
        position = {id(block): index for index, block in enumerate(chosen)}
        tokens: Dict[int, Tensor] = {}
        stacked: List[int] = []

        def detach_input(module: nn.Module, args: tuple, kwargs: dict):
            if args and isinstance(args[0], Tensor):
                return (args[0].detach(),) + tuple(args[1:]), kwargs
            name = next((key for key, value in kwargs.items() if isinstance(value, Tensor)), None)
            if name is None:
                raise TypeError(
                    f"Expected a block ({type(module).__name__}) to take its tokens as its "
                    f"first argument, got no tensor argument."
                )
            return args, {**kwargs, name: kwargs[name].detach()}

        def keep_output(module: nn.Module, args: tuple, output: object):
            index = position.get(id(module))
            if index is not None:
                tokens[index] = self._checked_tokens(
                    _tokens_of(output), records[index], batch_size, index
                )
            if module is not last:
                return None
            dim = _batch_dim(last_attention)
            parts = [tokens[index] for index in range(len(chosen))]
            if id(last) not in position:
                parts.append(_tokens_of(output))
            if len({tuple(part.shape) for part in parts}) > 1:
                shapes = ", ".join(str(tuple(part.shape)) for part in parts)
                raise ValueError(
                    f"Expected every block to return tokens of one shape, to stack them for "
                    f"the model's head, got {shapes}. LeGrad needs the same tokens in every "
                    f"block."
                )
            stacked[:] = [len(parts)]
            joined = torch.cat(parts, dim=dim)
            if isinstance(output, (tuple, list)):
                return type(output)([joined, *output[1:]])
            return joined

        hooks = [Hook(block, "pre_kwargs", detach_input) for block in chosen]
        hooks += [Hook(block, "forward", keep_output) for block in dict.fromkeys(chosen + [last])]
        owner_thread = threading.get_ident()
        handles: List[RemovableHandle] = []
        try:
            for hook in hooks:
                # Guarded by the thread only, like the adapter's model hooks: never closed.
                handles.append(_install(hook, BlockRecord(), owner_thread))
            yield stacked
        finally:
            for handle in handles:
                handle.remove()

    def _checked_tokens(
        self, tokens: Tensor, record: BlockRecord, batch_size: int, index: int
    ) -> Tensor:
        """A chosen block's output tokens, checked against its attention's (B, H, N, d)."""
        dim = _batch_dim(self.layer[index])
        num_tokens = None if record.values is None else record.values.shape[2]
        if (
            tokens.dim() != 3
            or tokens.shape[dim] != batch_size
            or (num_tokens is not None and tokens.shape[1 - dim] != num_tokens)
        ):
            expected = "(N, B, C)" if dim == 1 else "(B, N, C)"
            raise ValueError(
                f"Expected block {index} to return its tokens shaped {expected} with B = "
                f"{batch_size} and N = {num_tokens}, as its attention read them, got "
                f"{tuple(tokens.shape)}. LeGrad needs blocks that keep the token sequence."
            )
        return tokens

    @property
    def multiplies_by_inputs(self) -> bool:
        return False
