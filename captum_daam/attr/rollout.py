"""Attention rollout and gradient-weighted rollout, the transformer baselines DAAM is compared
with, as Captum attributions sharing DAAM's adapters.

Both need every block's full attention matrix. The adapters record what forms it (queries,
keys, any logit bias) and the attributions form one block's (B, H, N, N) matrix at a time,
reduce it over heads at once and fold it into a running product, so peak memory stays at
about one block's attention matrix.
"""

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ..adapters import BlockRecord, ViTAdapter
from .._targets import check_target_range
from ..decompose import tokens_to_grid
from .base import (
    ViTLayerAttribution,
    backward_to_records,
    check_output_options,
    format_attributions,
    over_chunks,
)

__all__ = ["AttentionRollout", "GradientRollout"]


class _RolloutBase(ViTLayerAttribution):
    """Refuses adapters without full self-attention, and lays the rollout row on the grid."""

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
                        of the blocks the rollout runs over, taken in block order.
                        Default: None, every block.
            adapter (ViTAdapter, optional): Default: None, the registered adapter of the
                        model's family. Models whose blocks are class-attention blocks (CaiT,
                        XCiT) are refused.
        """
        ViTLayerAttribution.__init__(self, model, layer, adapter)
        if not self.adapter.has_class_token:
            raise TypeError(
                f"{type(self).__name__} gives the [class] token's row of the rollout, but this "
                f"model has no [class] token ({self.adapter.family}). Use DAAM, which explains "
                f"every query row of such a model."
            )
        self._leave_out_attention_pool(
            layer is not None, f"{type(self).__name__} multiplies square attention matrices.")
        if not self.adapter.self_attention:
            raise TypeError(
                f"{type(self).__name__} needs full self-attention matrices, but the blocks of "
                f"this model ({self.adapter.family}) give attention weights for the [class] "
                f"query only (class-attention blocks, or factorised attention). Use DAAM for "
                f"this model."
            )

    def _one_grid(self, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """The grid every block reads, or a ValueError for a model whose tokens change
        between blocks (the rollout multiplies the blocks' attention matrices, which must be
        square and of one size: a model that pools tokens anywhere is refused, whichever
        blocks ``layer`` picks)."""
        layouts = self.adapter.block_layouts(self._block_attention(), image_size)
        if any(layout.positions is not None for layout in layouts):
            raise ValueError(
                f"{type(self).__name__} multiplies the attention matrices of consecutive "
                f"blocks over one sequence of tokens, but the blocks of this model "
                f"({self.adapter.family}) attend within windows, over keys other than their "
                f"queries, or read their tokens in another order. Use DAAM, which places each "
                f"block's tokens on the grid."
            )
        grids = {layout.grid for layout in layouts}
        if len(grids) > 1 or len({layout.branch for layout in layouts}) > 1:
            listed = ", ".join(
                "tokens from the forward pass" if grid is None else f"{grid[0]}x{grid[1]}"
                for grid in dict.fromkeys(layout.grid for layout in layouts)
            )
            raise ValueError(
                f"{type(self).__name__} multiplies the attention matrices of consecutive "
                f"blocks, which needs the same tokens in every block, but the blocks of this "
                f"model ({self.adapter.family}) read different grids ({listed}) or run in "
                f"separate branches. Use DAAM, which resamples each block map to one grid."
            )
        return layouts[0].grid

    def _to_grid(self, class_row: Tensor, grid: Optional[Tuple[int, int]], like: Tensor) -> Tensor:
        """(B, N) rollout row of the [class] token -> (B, 1, gh, gw) over the patches."""
        grid = self._patch_grid(grid, class_row.shape[-1])
        maps = tokens_to_grid(class_row, self.adapter.num_prefix_tokens, grid).unsqueeze(1)
        return maps.detach().to(device=like.device, dtype=like.dtype)


def _check_ran(records: Sequence[BlockRecord]) -> None:
    for index, record in enumerate(records):
        if record.class_attention is None:
            raise RuntimeError(
                f"Attention module {index} of the rollout did not run during the forward pass; "
                f"check that the model uses the modules given as layer."
            )


class AttentionRollout(_RolloutBase):
    r"""
    Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL
    2020, https://arxiv.org/abs/2005.00928).

    Per block, the attention averaged over heads plus the identity (the residual connection),
    rows renormalised to sum to one: Â_l = (mean_h A_l + I) / 2. The rollout multiplies
    them from the first block to the last, R = Â_L ... Â_1, and the attribution is the
    [class] token's row of R over the patch tokens. It has no target: the map is the same for
    every class.

    One forward pass without gradients. Attributions are shaped like DAAM's final map,
    (B, 1, gh, gw), non-negative, on the input's device and dtype.
    """

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        internal_batch_size: Optional[int] = None,
        input_shaped: bool = False,
        interpolate_mode: str = "bilinear",
    ) -> Union[Tensor, Tuple[Tensor]]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor]): Images, (B, C, H, W), as the model takes them.
            target (int, list[int] or Tensor, optional): Accepted, and checked as DAAM
                        checks it, so that the call is the same as for the other
                        attributions; the rollout does not depend on it.
                        Default: None
            additional_forward_args (Any, optional): Further arguments of the forward
                        function, passed after ``inputs`` in order, as in Captum.
                        Default: None
            internal_batch_size (int, optional): Attribute this many examples at a time,
                        as :meth:`DAAM.attribute`. Default: None, all at once.
            input_shaped (bool, optional): Return the map at the input's shape,
                        (B, C, H, W), as :meth:`DAAM.attribute`. Default: False
            interpolate_mode (str, optional): The interpolation of ``input_shaped``.
                        Default: "bilinear"

        Returns:
            *Tensor* or *tuple[Tensor]* of **attributions**:
            - **attributions** (*Tensor*): (B, 1, gh, gw), the [class] row of the rollout
                        over the patch grid; (B, C, H, W) with ``input_shaped``; a 1-tuple
                        when ``inputs`` is a tuple.

        Examples::

            >>> model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
            >>> rollout = AttentionRollout(model).attribute(torch.rand(2, 3, 224, 224))
            >>> rollout.shape
            torch.Size([2, 1, 14, 14])
        """
        images, is_tuple = self._check_inputs(inputs)
        check_output_options(internal_batch_size, input_shaped, interpolate_mode)
        grid = self._one_grid(tuple(images.shape[-2:]))
        target_indices = self._check_target(target, images.shape[0], images.device)
        self._warn_if_training()
        self._warn_if_class_token_unread()
        maps = over_chunks(
            lambda chunk, targets, forward_args: self._rollout(chunk, forward_args, grid, targets),
            images, target_indices, additional_forward_args, internal_batch_size,
        )
        return format_attributions(maps, images, is_tuple, input_shaped, interpolate_mode)

    def _rollout(
        self, images: Tensor, additional_forward_args: Optional[object],
        grid: Optional[Tuple[int, int]], target_indices: Optional[Tensor] = None,
    ) -> Tensor:
        """One forward pass without gradients: the rollout maps (B, 1, gh, gw). The targets,
        which the rollout does not use, are still checked against the scores' width where it
        was not known before the forward pass."""
        rollout = {}

        def fold(record: BlockRecord) -> None:
            # Runs as each block's attention runs: one (B, H, N, N) matrix at a time.
            attention = record.attention().mean(dim=1)
            record.attention = record.values = None
            tokens = attention.shape[-1]
            identity = torch.eye(tokens, dtype=attention.dtype, device=attention.device)
            mixed = attention + identity
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout["R"] = mixed if "R" not in rollout else mixed @ rollout["R"]

        with torch.no_grad(), self.adapter.record(
            self.layer, full=True, on_attention=fold
        ) as records:
            scores = self._scores(
                _run_forward(self.forward_func, images, None, additional_forward_args)
            )
            if target_indices is not None:
                check_target_range(target_indices, scores.shape[1])
        _check_ran(records)
        return self._to_grid(rollout["R"][:, 0], grid, images)


class GradientRollout(_RolloutBase, GradientAttribution):
    r"""
    Gradient-weighted attention rollout, the rule of Chefer, Gur & Wolf ("Generic
    Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers",
    ICCV 2021, https://arxiv.org/abs/2103.15679): R = I, and for each block from the first
    to the last, R <- R + mean_h(relu(dA_l ⊙ A_l)) R, with dA_l the gradient of the target
    score with respect to the block's attention probabilities A_l. The attribution is the
    [class] token's row of R over the patch tokens.

    One forward and one activation-only backward pass. dA_l follows from the gradient at the
    attention output before the projection, dO_l: dA_l = dO_l v_l^T per head. The row of R is
    built from the last block down as the gradients arrive, r <- r + r M_l, so only one
    block's (B, H, N, N) matrices exist at a time. Attributions are (B, 1, gh, gw),
    non-negative, on the input's device and dtype.
    """

    def __init__(
        self,
        model: Union[nn.Module, Callable[..., Tensor]],
        layer: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        adapter: Optional[ViTAdapter] = None,
    ) -> None:
        """The arguments are :class:`AttentionRollout`'s."""
        _RolloutBase.__init__(self, model, layer, adapter)
        GradientAttribution.__init__(self, self.forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        internal_batch_size: Optional[int] = None,
        input_shaped: bool = False,
        interpolate_mode: str = "bilinear",
    ) -> Union[Tensor, Tuple[Tensor]]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor]): Images, (B, C, H, W), as the model takes them.
            target (int, list[int] or Tensor, optional): The output class explained, as in
                        :meth:`DAAM.attribute`: None for each example's predicted class, an
                        int for all, or one class per example.
                        Default: None
            additional_forward_args (Any, optional): Further arguments of the forward
                        function, passed after ``inputs`` in order, as in Captum.
                        Default: None
            internal_batch_size (int, optional): Attribute this many examples at a time,
                        as :meth:`DAAM.attribute`. Default: None, all at once.
            input_shaped (bool, optional): Return the map at the input's shape,
                        (B, C, H, W), as :meth:`DAAM.attribute`. Default: False
            interpolate_mode (str, optional): The interpolation of ``input_shaped``.
                        Default: "bilinear"

        Returns:
            *Tensor* or *tuple[Tensor]* of **attributions**:
            - **attributions** (*Tensor*): (B, 1, gh, gw), the [class] row of R over the
                        patch grid; (B, C, H, W) with ``input_shaped``; a 1-tuple when
                        ``inputs`` is a tuple.

        Examples::

            >>> model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
            >>> maps = GradientRollout(model).attribute(torch.rand(2, 3, 224, 224), target=3)
            >>> maps.shape
            torch.Size([2, 1, 14, 14])
        """
        images, is_tuple = self._check_inputs(inputs)
        check_output_options(internal_batch_size, input_shaped, interpolate_mode)
        grid = self._one_grid(tuple(images.shape[-2:]))
        target_indices = self._check_target(target, images.shape[0], images.device)
        self._warn_if_training()
        self._warn_if_class_token_unread()
        self._warn_if_explaining_a_feature(target)
        maps = over_chunks(
            lambda chunk, targets, forward_args: self._rollout(chunk, targets, forward_args, grid),
            images, target_indices, additional_forward_args, internal_batch_size,
        )
        self._warn_if_all_zero(maps)
        return format_attributions(maps, images, is_tuple, input_shaped, interpolate_mode)

    def _rollout(
        self,
        images: Tensor,
        target_indices: Optional[Tensor],
        additional_forward_args: Optional[object],
        grid: Optional[Tuple[int, int]],
    ) -> Tensor:
        """One forward and one backward pass: the rollout maps (B, 1, gh, gw)."""
        state = {"next": len(self.layer) - 1}

        def fold(record: BlockRecord) -> None:
            # Runs in the backward pass, from the last block to the first.
            index = next(i for i, candidate in enumerate(records) if candidate is record)
            if index != state["next"]:
                raise RuntimeError(
                    "GradientRollout expects the blocks' gradients from the last block to the "
                    "first, as they arrive in a ViT's backward pass."
                )
            state["next"] -= 1
            values = record.values  # (B, H, N, d)
            gradient = record.gradient.unflatten(-1, (values.shape[1], -1)).transpose(1, 2)
            attention = record.attention()  # (B, H, N, N)
            record.attention = record.values = record.gradient = None
            dtype = attention.dtype
            weighted = gradient.to(dtype) @ values.to(dtype).transpose(-2, -1)  # dA, (B, H, N, N)
            weights = weighted.mul_(attention).clamp_(min=0).mean(dim=1)  # in place: (B, N, N)
            if "row" not in state:
                state["row"] = torch.zeros_like(weights[:, 0])
                state["row"][:, 0] = 1  # e_0: the [class] token's row of R = I
            state["row"] = state["row"] + (state["row"].unsqueeze(1) @ weights).squeeze(1)

        with torch.enable_grad(), self.adapter.record(
            self.layer, on_gradient=fold, full=True
        ) as records:
            scores = self._scores(
                _run_forward(self.forward_func, images, None, additional_forward_args)
            )
            backward_to_records(self._target_score(scores, target_indices), records)
        return self._to_grid(state["row"], grid, images)

    @property
    def multiplies_by_inputs(self) -> bool:
        return False
