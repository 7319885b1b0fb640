"""DAAM, the Dynamic Accumulated Attention Map, as a Captum layer attribution."""

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _run_forward
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ..adapters import BlockLayout, BlockRecord, ViTAdapter
from ..adapters.base import TokenRows
from ..decompose import accumulate as accumulate_maps
from ..decompose import Mixing, all_queries_block_map, block_map, query_rows
from ..ssl import MemoryBank
from .._warnings import warn_user
from .base import (
    ViTLayerAttribution,
    backward_to_records,
    check_output_options,
    chunks,
    format_attributions,
    on_one_grid,
    split_forward_args,
)

_QUERIES = ("class", "head", "all")

__all__ = ["DAAM"]


def queries_name(queries: Union[str, Tuple[int, ...], TokenRows]) -> str:
    """How a resolved ``queries`` reads in a message."""
    if isinstance(queries, TokenRows):
        return f"'head' (rows {queries.first} and {queries.start} on)"
    return f"{queries!r}" if isinstance(queries, str) else f"'head' (rows {queries})"


class DAAM(ViTLayerAttribution, GradientAttribution):
    r"""
    Dynamic Accumulated Attention Map (Liao, Gao & Zhang, Pattern Recognition 2025,
    https://arxiv.org/abs/2503.14640).

    DAAM explains a Vision Transformer block by block. In every block it splits the
    [class] token's attention output (before the output projection) into the contribution
    of each source token, F[n, (h, e)] = A[h, 0, n] * v[h, n, e], weights the channels by the
    gradient of the target score with respect to that output, g, and keeps the positive part:
    cam[n] = relu(sum_c relu(g[c]) * F[n, c]). Summing the block maps from the first block
    gives the accumulated maps D_1, ..., D_L, the attention flow of the decision; D_L is the
    final map. Self-supervised backbones, which output features, are explained through
    dimension-wise importance weights instead of a class score (``importance=``, see
    :class:`~captum_daam.MemoryBank`), without the relu on the gradients.

    One forward and one backward pass give every block's map. The backward pass takes
    gradients only with respect to the recorded attention outputs (no weight gradients),
    and only the [class] row of each attention matrix is formed, so models using fused
    attention keep it.

    The flow runs over the blocks whose [class] token decides: every block of a ViT, DeiT or
    BEiT, the class-attention blocks of CaiT and XCiT (the blocks before them have no [class]
    token). The grid is the model's patch grid for the input size. In models whose grid
    changes between blocks (PiT and MViTv2 pool tokens, CrossViT runs two branches on two
    grids) each block map is brought to the finest grid by area-weighted resampling, which
    keeps its sum, before the maps are added up; ``block_grids=True`` gives the block maps on
    their own grids.

    For models whose head pools the tokens instead of reading the [class] token
    (``global_pool='avg'``), and for models without a [class] token (SigLIP, the gap and
    register-gap ViTs, AIMv2), every query row of the attention output is split over the
    tokens it reads and weighted by its own gradient (``queries='all'``, the default there):
    cam[n] = relu(sum_i sum_h A[h, i, n] <v[h, n], relu(g[h, i])>). Prefix tokens (registers,
    [class], [dist]) are read as every other token but are never part of the grid. An
    attention-pool head (timm's ``global_pool='map'``: SigLIP, AIMv2, Perception Encoder) is
    the last block of the flow, explained from its latent query rows over the tokens it
    reads, so the flow has one map more than the model has blocks. Windowed attention (Swin
    V1 / V2 / V2-Cr, timm and torchvision; SAM's encoder; Twins-SVT) is explained row by row within
    each window, and each window's tokens are laid back on their patches with the partition,
    padding and cyclic shift undone. Attention over reduced keys and values (PVTv2, Twins,
    MViTv2, NextViT's keys averaged over runs of tokens) and LeViT's and EfficientFormerV2's
    shrinking attention are split over the keys they read, on their grid; EfficientFormerV2's
    depthwise convolution of the values is part of its block's mixing. Softmax attention is
    mixed a chunk of query rows at a time, so no block's (B, H, N, N) attention is formed.
    Convolution stems, patch merging and other convolution stages of hybrid models are not
    blocks of the flow.

    Attributions are raw: non-negative and unnormalised, on the input's device and dtype,
    shaped like a layer attribution over the patch grid, (B, 1, gh, gw), so
    ``LayerAttribution.interpolate(attributions, (H, W), "bilinear")`` brings them to the
    image. Normalisation is a visualisation choice (see ``captum_daam.decompose``).

    The model should be in eval mode: with dropout active the explained forward pass is a
    random one.
    """

    def __init__(
        self,
        model: Union[nn.Module, Callable[..., Tensor]],
        layer: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        adapter: Optional[ViTAdapter] = None,
    ) -> None:
        r"""
        Args:
            model (torch.nn.Module or Callable): The Vision Transformer; or a module holding
                        exactly one Vision Transformer of a known family, such as
                        ``nn.DataParallel``, ``DistributedDataParallel``,
                        ``torch.compile(model)`` or ``nn.Sequential(normalize, model)``, whose
                        forward pass is explained (a wrapper that only distributes or
                        compiles the model is explained by running the model inside it:
                        the same result, on one device per process); or any callable whose
                        forward pass runs the model, with ``adapter`` given for the model
                        inside. TorchScript models are not supported.
            layer (torch.nn.Module or list[torch.nn.Module], optional): Attention modules
                        of the blocks the flow runs over. They are taken in the model's block
                        order, whatever the order given. The flow has one map per module.
                        Default: None, the attention modules of all blocks, and the
                        attention-pool head where the model has one.
            adapter (ViTAdapter, optional): The adapter that knows where the model keeps
                        its attention. Default: None, the registered adapter of ``model``'s
                        family (``captum_daam.adapters.adapter_for``): timm ViT / DeiT /
                        DINO, SigLIP, CaiT, XCiT, BEiT, EVA, RelPos, NaFlexViT, VOLO, ConViT,
                        TNT, PiT, MViTv2, CrossViT, CoaT, Swin (timm, torchvision), SAM,
                        PVTv2, Twins, LeViT,
                        torchvision's ViT, Swin and MaxViT, the Hugging Face transformers
                        vision encoders (ViT, DeiT, BEiT, DINOv2, DINOv3, CLIP, SigLIP,
                        SigLIP 2, AIMv2, Swin, PVT, Hiera and more, found inside classifiers,
                        embedding and image-text models) and open_clip's image towers
                        (`captum-daam check --list` lists them all). For an image-text
                        model, explain ``ImageTextSimilarity(model, ...)``. For
                        other models built from timm-style attention (T2T-ViT, research
                        code), give ``captum_daam.adapters.GenericAdapter(attention_modules)``.
        """
        ViTLayerAttribution.__init__(self, model, layer, adapter)
        GradientAttribution.__init__(self, self.forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        return_flow: bool = False,
        accumulate: bool = True,
        importance: Optional[Union[Tensor, MemoryBank, Callable[[Tensor], Tensor]]] = None,
        relu_gradients: Optional[bool] = None,
        internal_batch_size: Optional[int] = None,
        input_shaped: bool = False,
        interpolate_mode: str = "bilinear",
        queries: Optional[str] = None,
        block_grids: bool = False,
    ) -> Union[Tensor, Tuple[Tensor], List[Tensor], List[Tuple[Tensor]]]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor]): Images, (B, C, H, W), as the model takes them.
                        A tuple must hold exactly this one tensor; the attributions then come
                        back as a 1-tuple, as in Captum.
            target (int, list[int] or Tensor, optional): The output class whose decision is
                        explained:

                        - None: the class the model predicts for each example;
                        - an int (or a one-element tensor), for every example;
                        - a list of ints or a 1-D tensor with one class per example.

                        A backbone without a classifier head predicts no class: there
                        None takes each example's largest output feature, with a warning;
                        explain it with ``importance`` instead.
                        Default: None
            additional_forward_args (Any, optional): Further arguments of the forward
                        function, passed after ``inputs`` in order, as in Captum.
                        Default: None
            return_flow (bool, optional): Return the map of every block of the flow,
                        (B, L, gh, gw), instead of only the last, (B, 1, gh, gw).
                        Default: False
            accumulate (bool, optional): Return accumulated maps D_l = cam_1 + ... + cam_l
                        (the DAAM flow). With False, return the block maps cam_l themselves;
                        without ``return_flow`` that is the last block's map alone.
                        Default: True
            importance (Tensor, MemoryBank or Callable, optional): For self-supervised
                        backbones, which output features (B, D) rather than class scores:
                        dimension-wise importance weights w, and the explained objective is
                        sum_d w_d f_d instead of a class score. A (D,) tensor applies to every
                        example, a (B, D) tensor gives one row per example. A
                        :class:`~captum_daam.MemoryBank` computes the weights from the
                        backbone's own output in the same forward pass
                        (``bank.importance(features)``, k=20, T=0.07); a callable maps the
                        features (B, D) to weights (B, D), or to (weights, prediction), e.g.
                        ``lambda f: bank.importance(f, k=10)``. Cannot be combined with
                        ``target``.
                        Default: None
            relu_gradients (bool, optional): Keep only positive channel weights (the
                        gradients) in each block map. Default: None, which means True for
                        class targets (supervised DAAM) and False with ``importance``
                        (self-supervised DAAM), as in the paper.
            internal_batch_size (int, optional): Explain the batch this many examples at
                        a time (one forward and one backward pass each), to bound memory.
                        Per-example targets, (B, D) importance weights and the tensors in
                        ``additional_forward_args`` whose first dimension is B are split
                        with the inputs, as in Captum; other arguments (a mask shared by all
                        examples) are passed whole. The result does not depend on it.
                        Default: None, the whole batch in one pass.
            input_shaped (bool, optional): Return the final map at the input's shape,
                        (B, C, H, W): interpolated from the patch grid to (H, W) with
                        ``LayerAttribution.interpolate`` and the same map in every channel,
                        as ``captum.metrics.infidelity`` and ``sensitivity_max`` expect.
                        Cannot be combined with ``return_flow``. Default: False
            interpolate_mode (str, optional): The interpolation of ``input_shaped``:
                        "bilinear", "bicubic", "nearest", "nearest-exact" or "area".
                        Default: "bilinear"
            queries (str, optional): Which query rows of each block's attention are
                        explained. "class": the [class] token's row, as in the paper, for
                        models whose head reads the [class] token. "all": every row,
                        each weighted by the gradient at its own output, cam[n] =
                        relu(sum_i sum_h A[h, i, n] <v[h, n], relu(g[h, i])>), for models
                        whose head pools the tokens (``global_pool='avg'``) and models
                        without a [class] token; it forms one block's full (B, H, N, N)
                        attention at a time, in the backward pass. "head": the rows of the
                        tokens the model's head reads (``adapter.head_queries``): the [class]
                        and [dist] rows of a distilled DeiT, whose output is the mean of
                        its two heads; "class" or "all" for other models. An attention-pool
                        head (``global_pool='map'``) is the last block of the flow, explained
                        from all its latent query rows whatever ``queries``.
                        Default: None, "class" where the head reads the [class] token and,
                        where it pools or there is no [class] token
                        (``adapter.reads_class_token``) and the blocks have full attention
                        matrices (``adapter.self_attention``), "head": the rows it reads,
                        every row for a head that pools them all ("all"), the [class] token
                        and the patches, not the registers, for DINOv2's classifier, the
                        patches for BEiT's mean pooling. For a distilled DeiT the
                        default is the paper's [class] row, with a warning that the [dist]
                        row's share is left out.
            block_grids (bool, optional): Return the block maps cam_l each on its own
                        patch grid, unresampled: a list of L tensors (B, 1, gh_l, gw_l), one
                        per block of the flow, as Captum returns one attribution per layer
                        for a list of layers. Only block maps can be given on their own
                        grids, so ``accumulate`` must be False; ``return_flow`` and
                        ``input_shaped`` do not apply. Default: False

        Returns:
            *Tensor* or *tuple[Tensor]* of **attributions**:
            - **attributions** (*Tensor*): Non-negative, unnormalised, detached, on the
                        input's device and dtype. (B, 1, gh, gw) by default, the final DAAM
                        map D_L over the patch grid; (B, L, gh, gw) with ``return_flow``,
                        one map per block of the flow, on the finest grid of its blocks;
                        (B, C, H, W) with ``input_shaped``; with ``block_grids``, a list of
                        L tensors (B, 1, gh_l, gw_l). A 1-tuple holding that tensor (with
                        ``block_grids``, a list of 1-tuples) when ``inputs`` is a tuple, as in
                        Captum. An example whose maps are zero everywhere (nothing
                        contributes positively to the target score) gets a warning.

        Targets follow Captum's conventions except for None, which here means each example's
        predicted class (in Captum, None is for models with a scalar output). Negative class
        indices are refused rather than counted from the end: a negative label is usually a
        data set's mark for "no label" (e.g. -1 or an ``ignore_index`` of -100).

        Examples::

            >>> import timm, torch
            >>> from captum.attr import LayerAttribution
            >>> from captum_daam import DAAM
            >>> model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
            >>> images = torch.rand(2, 3, 224, 224)
            >>> daam = DAAM(model)
            >>> final_map = daam.attribute(images, target=[3, 7])
            >>> final_map.shape
            torch.Size([2, 1, 14, 14])
            >>> flow = daam.attribute(images, target=3, return_flow=True)
            >>> flow.shape
            torch.Size([2, 12, 14, 14])
            >>> upsampled = LayerAttribution.interpolate(final_map, (224, 224), "bilinear")
            >>> daam.attribute(images, target=3, input_shaped=True).shape  # for captum.metrics
            torch.Size([2, 3, 224, 224])
        """
        images, is_tuple = self._check_inputs(inputs)
        check_output_options(internal_batch_size, input_shaped, interpolate_mode, return_flow)
        _check_block_grids(block_grids, accumulate, return_flow, input_shaped)
        queries_given, queries = queries, self._check_queries(queries)
        layouts = self.adapter.block_layouts(self.layer, tuple(images.shape[-2:]))
        if importance is not None:
            if target is not None:
                raise ValueError(
                    "Expected either target (a class score to explain) or importance (weights "
                    "of a self-supervised feature objective), got both."
                )
            _check_importance(importance, images.shape[0], self._output_width())
        target_indices = self._check_target(target, images.shape[0], images.device)
        if relu_gradients is None:
            relu_gradients = importance is None
        self._warn_if_training()
        if importance is None:
            self._warn_if_explaining_a_feature(target)
        if queries == "class":
            self._warn_if_class_token_unread()
            if queries_given is None:
                self._warn_if_other_head_rows()

        chunk_maps = [
            self._block_maps(
                images[examples],
                None if target_indices is None else target_indices[examples],
                split_forward_args(additional_forward_args, examples, images.shape[0]),
                _importance_of(importance, examples, images.shape[0]),
                relu_gradients,
                layouts,
                queries,
            )
            for examples in chunks(images.shape[0], internal_batch_size)
        ]
        block_maps = [torch.cat(chunk_blocks) for chunk_blocks in zip(*chunk_maps)]
        self._warn_if_all_zero(torch.cat([block.flatten(1) for block in block_maps], dim=1))
        if block_grids:
            return [
                format_attributions(block.unsqueeze(1), images, is_tuple) for block in block_maps
            ]
        maps = on_one_grid(block_maps)
        if accumulate:
            maps = accumulate_maps(maps, dim=1)
        if not return_flow:
            maps = maps[:, -1:]
        return format_attributions(maps, images, is_tuple, input_shaped, interpolate_mode)

    def _check_queries(self, queries: Optional[str]) -> Union[str, Tuple[int, ...]]:
        """``queries`` checked against the model, or its default for the model: "class",
        "all", or the head's rows (a tuple) for ``queries='head'`` where they are others."""
        adapter = self.adapter
        if queries is None:
            pooled = not adapter.reads_class_token and adapter.self_attention
            if not pooled:
                return "class"
            queries = "head"  # the rows the head reads: every row where it pools them all
        if queries not in _QUERIES:
            raise ValueError(
                f"Expected queries to be 'class', 'head' or 'all', got {queries!r}."
            )
        if queries == "head":
            rows = adapter.head_queries
            if rows is None or isinstance(rows, TokenRows):
                queries = "all" if rows is None else rows
            else:
                queries = "class" if tuple(rows) == (0,) else tuple(rows)
        if queries == "class" and not adapter.has_class_token:
            default = "'all', its default" if adapter.self_attention else "another model"
            raise ValueError(
                f"Expected a model with a [class] token for queries='class', got a "
                f"{type(adapter.model).__name__} without one ({adapter.family}). Use "
                f"queries={default}."
            )
        if queries != "class" and not adapter.self_attention:
            raise ValueError(
                f"Expected queries='class' for this model ({adapter.family}): its blocks "
                f"give attention weights for the [class] query only (class-attention blocks, "
                f"or factorised attention), not full attention matrices, got "
                f"queries={queries_name(queries)}."
            )
        return queries

    def _warn_if_other_head_rows(self) -> None:
        """Warn that the head also reads other tokens than the [class] token (distilled
        DeiT), whose rows the default leaves out."""
        rows = self.adapter.head_queries
        if rows is not None and tuple(rows) != (0,):
            warn_user(
                f"This {type(self.adapter.model).__name__}'s head reads tokens {tuple(rows)}, "
                f"not the [class] token alone (a distilled DeiT averages its [class] and "
                f"[dist] heads): the default, the paper's [class] rows, leaves out the other "
                f"rows' share of the output. Pass queries='head' to explain all of them."
            )

    def _block_maps(
        self,
        images: Tensor,
        target_indices: Optional[Tensor],
        additional_forward_args: Optional[object],
        importance: Optional[Union[Tensor, MemoryBank, Callable[[Tensor], Tensor]]],
        relu_gradients: bool,
        layouts: List[BlockLayout],
        queries: Union[str, Tuple[int, ...]],
    ) -> List[Tensor]:
        """One forward and one backward pass: the block maps cam_l, (B, gh_l, gw_l) each."""
        latent = {id(module) for module in self.adapter.every_row_modules()}
        # Per block, the query rows explained: None for every row, else their indices.
        rows = [
            None if id(module) in latent or queries == "all"
            else (0,) if queries == "class" else queries
            for module in self.layer
        ]
        token_maps = {}
        rows_of = {}

        def reduce_record(record: BlockRecord) -> None:
            # Runs in the backward pass: the map is formed and the values freed at once.
            record_rows = rows_of[id(record)]
            if record_rows == (0,):
                token_maps[id(record)] = block_map(
                    record.class_attention, record.values, record.class_gradient, relu_gradients
                )
            else:
                # A Mixing is applied as its factors allow (softmax attention chunk by chunk);
                # other attention is formed here, one block at a time.
                attention, gradient = record.attention, record.gradient
                if not isinstance(attention, Mixing):
                    attention = attention()
                if isinstance(record_rows, TokenRows):
                    record_rows = record_rows.rows(gradient.shape[1])
                if record_rows is not None:
                    attention = query_rows(attention, record_rows)
                    gradient = gradient[:, record_rows]
                token_maps[id(record)] = all_queries_block_map(
                    attention, record.values, gradient, relu_gradients
                )
                record.attention = record.gradient = None
            record.values = None

        with torch.enable_grad(), self.adapter.record(
            self.layer, reduce_record, full=[block_rows != (0,) for block_rows in rows]
        ) as records:
            rows_of.update((id(record), block_rows) for record, block_rows in zip(records, rows))
            output = self._scores(
                _run_forward(self.forward_func, images, None, additional_forward_args)
            )
            if importance is not None:
                score = (output * _importance_weights(importance, output)).sum()
            else:
                score = self._target_score(output, target_indices)
            backward_to_records(score, records, layouts)

        block_maps = [token_maps[id(record)] for record in records]
        return self._on_grids(block_maps, layouts, images.shape[0])

    @property
    def multiplies_by_inputs(self) -> bool:
        return False


def _check_block_grids(
    block_grids: bool, accumulate: bool, return_flow: bool, input_shaped: bool
) -> None:
    """``block_grids`` checked against the options it rules out, before any work."""
    if not block_grids:
        return
    if accumulate:
        raise ValueError(
            "Expected accumulate=False with block_grids=True: the block maps are given on "
            "their own grids, and accumulating them needs one grid. Pass accumulate=False, "
            "or leave block_grids=False for the flow on the finest grid."
        )
    if return_flow or input_shaped:
        raise ValueError(
            "Expected neither return_flow nor input_shaped with block_grids=True, which "
            "returns every block's map on its own grid."
        )


def _check_importance(
    importance: Union[Tensor, MemoryBank, Callable[[Tensor], Tensor]],
    batch_size: int,
    num_outputs: Optional[int],
) -> None:
    """Shape and width checks that can be made before the forward pass; ``num_outputs``: the
    width of the forward's output where it is known before it (else None, and the width is
    checked right after the forward pass, by :func:`_importance_weights`)."""
    if isinstance(importance, MemoryBank):
        if num_outputs is not None:
            _check_bank_width(importance, num_outputs)
        return
    if not isinstance(importance, Tensor):
        if callable(importance):
            return
        raise TypeError(
            f"Expected importance to be a Tensor, a MemoryBank or a callable, got "
            f"{type(importance).__name__}."
        )
    per_example = importance.dim() == 2 and importance.shape[0] == batch_size
    if importance.dim() != 1 and not per_example:
        raise ValueError(
            f"Expected importance weights shaped (D,) or (B={batch_size}, D), got "
            f"{tuple(importance.shape)}."
        )
    if num_outputs is not None:
        _check_weights_width(importance, num_outputs)
    if not bool(torch.isfinite(importance).all()):
        raise ValueError("Expected finite importance weights, got NaN or infinite values.")


def _check_bank_width(bank: MemoryBank, num_outputs: int) -> None:
    if bank.dim != num_outputs:
        raise ValueError(
            f"Expected a memory bank of the model's output width {num_outputs}, got a bank "
            f"of width {bank.dim}."
        )


def _check_weights_width(weights: Tensor, num_outputs: int) -> None:
    if weights.shape[-1] != num_outputs:
        raise ValueError(
            f"Expected importance weights of the model's output width {num_outputs}, got "
            f"width {weights.shape[-1]}."
        )


def _importance_weights(
    importance: Union[Tensor, MemoryBank, Callable[[Tensor], Tensor]], output: Tensor
) -> Tensor:
    """The weights w of the objective sum_d w_d f_d, for the forward pass's output f; their
    width checked against f's, before any backward pass."""
    if isinstance(importance, MemoryBank):
        _check_bank_width(importance, output.shape[1])
        weights = importance.importance(output.detach())[0]
    elif isinstance(importance, Tensor):
        _check_weights_width(importance, output.shape[1])
        weights = importance
    else:
        weights = importance(output.detach())
        if isinstance(weights, tuple):
            weights = weights[0]
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"Expected the importance callable to return a Tensor of weights, got "
            f"{type(weights).__name__}."
        )
    if weights.shape[-1] != output.shape[1] or weights.dim() not in (1, 2):
        raise ValueError(
            f"Expected importance weights of the model's output width {output.shape[1]}, got "
            f"shape {tuple(weights.shape)}."
        )
    if weights.dim() == 2 and weights.shape[0] != output.shape[0]:
        raise ValueError(
            f"Expected importance weights shaped (D,) or (B={output.shape[0]}, D), got "
            f"{tuple(weights.shape)}."
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(
            "Expected finite importance weights, got NaN or infinite values from the "
            "importance callable; nothing was attributed."
        )
    return weights.detach().to(device=output.device, dtype=output.dtype)


def _importance_of(
    importance: Optional[Union[Tensor, MemoryBank, Callable[[Tensor], Tensor]]],
    examples: slice,
    batch_size: int,
) -> Optional[Union[Tensor, MemoryBank, Callable[[Tensor], Tensor]]]:
    """The importance of a chunk of the batch: the chunk's rows of per-example weights."""
    if isinstance(importance, Tensor) and importance.dim() == 2:
        return importance[examples]
    return importance
