"""timm ``CrossVit`` (CrossViT: crossvit_tiny_240, crossvit_9_240, crossvit_15_dagger_408, ...).

CrossViT runs two branches side by side, each a ViT with its own [class] token, on patches
of two sizes (12 and 16 pixels for the registered models), so on two grids (20x20 and 14x14
at 240x240). Every multi-scale block (``model.blocks[i]``) first runs each branch's ViT
blocks (timm ``Block`` with its standard ``Attention``: every token of the branch a query),
then fuses the branches: in ``fusion[d]`` branch d's [class] token, projected to the other
branch's width, is the only query of a ``CrossAttention`` over [itself, the other branch's
patch tokens]. The head averages the two branches' heads on their [class] tokens.

The flow runs over every module with a [class] query, in forward order: per multi-scale
block, branch 0's blocks, branch 1's blocks, then the fusion attentions of branch 0 and 1.
A branch block reads its own branch's grid; a fusion attention reads the other branch's
grid. Each block is in the branch of the [class] token it updates: a fusion attention of
branch d changes branch d's [class] token, which its later blocks read. So every block of a
branch depends on every earlier one of it, and the backward pass taken to the first chosen
block of each branch reaches every chosen block.

Each branch rescales the image to its own size (``model.img_size_scaled``, bicubic), so any
image size is taken and both grids cover the whole image. A model built with
``crop_scale=True`` crops larger images instead; their branch grids then cover different
parts of the image and are refused.

Only the branch blocks have full self-attention; in the fusion attentions the [class] token
is the only query. ``queries='all'`` and the attention rollouts are therefore refused (see
:attr:`TimmCrossVitAdapter.self_attention`).
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

from timm.layers import Attention
from timm.models.crossvit import CrossAttention, CrossAttentionBlock, CrossVit
from torch import Tensor, nn

from ..decompose import class_attention_row
from .base import BlockLayout, BlockRecord, Hook, ViTAdapter, register_adapter
from .timm_vit import timm_attention_hooks


def cross_attention_hooks(attention: CrossAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``CrossAttention`` (CrossViT's
    fusion), which takes [the projected [class] token, the other branch's patches] and has
    the [class] token as its only query: q = wq(x[:, :1]), k = wk(x), v = wv(x). The hooks
    read those three linear outputs and watch the head-concatenated output, (B, 1, C), where
    it enters ``proj``. The module scales the logits by ``attention.scale``."""
    heads = attention.num_heads
    call: dict = {}

    def by_heads(tokens: Tensor) -> Tensor:
        return tokens.detach().unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, d)

    def on_query(module: nn.Module, args: tuple, query: Tensor) -> None:
        call["class_query"] = by_heads(query)[:, :, 0]  # (B, H, d)

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        call["keys"] = by_heads(keys)

    def on_values(module: nn.Module, args: tuple, values: Tensor) -> None:
        call["values"] = by_heads(values)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        # wq, wk and wv have all run by the time the output reaches proj.
        row = class_attention_row(call.pop("class_query"), call.pop("keys"), attention.scale)
        record.set_attention(row, call.pop("values"))
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention.wq, "forward", on_query),
        Hook(attention.wk, "forward", on_keys),
        Hook(attention.wv, "forward", on_values),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


class _FlowModule(NamedTuple):
    """One attention module of the flow and the branches it belongs to."""

    attention: nn.Module
    branch: int  # the branch whose [class] token the module updates
    reads: int  # the branch whose patch tokens its [class] query reads


@register_adapter
class TimmCrossVitAdapter(ViTAdapter):
    """timm ``CrossVit`` with its [class] tokens read by the head (``global_pool='token'``,
    the default): the flow runs over the branch blocks' ``Attention`` and the first
    ``CrossAttention`` of every fusion.

    A fusion of more than one ``CrossAttentionBlock`` (``depth[i][-1] > 1``; no registered
    model has one) runs its later blocks on the [class] token alone: their [class] query
    reads no patch token, so they are not part of the flow.
    """

    family = "timm CrossViT"
    examples = (
        "crossvit_tiny_240, crossvit_small_240, crossvit_base_240, crossvit_9_240, "
        "crossvit_15_240, crossvit_18_240, crossvit_*_dagger_240, crossvit_*_dagger_408"
    )
    layer_example = "model.blocks[i].blocks[branch][j].attn or model.blocks[i].fusion[branch].attn"
    #: False: in the fusion attentions the [class] token is the only query, so there is no
    #: full attention matrix to multiply (rollouts) or to split row by row over the blocks of
    #: the flow (``queries='all'``). The heads read the [class] tokens, so ``queries='class'``
    #: explains the output in full.
    self_attention = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        if model.global_pool != "token":
            raise TypeError(
                f"DAAM explains the [class] tokens, but this {name} uses "
                f"global_pool={model.global_pool!r}, so its heads average the patch tokens and "
                f"the fusion attentions of its last block, whose only query is the [class] "
                f"token, do not affect the output. Use global_pool='token' (the default)."
            )
        for index, block in enumerate(model.blocks):
            branches = 0 if block.blocks is None else len(block.blocks)
            if branches != block.num_branches:
                raise TypeError(
                    f"Expected ViT blocks in each of the {block.num_branches} branches of "
                    f"{name}.blocks[{index}], got blocks in {branches}: a branch of depth 0 "
                    f"shifts the others onto its tokens in timm's forward. Give every branch "
                    f"at least one block."
                )
        self._flow_modules()  # refuses unsupported attention types before any work

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, CrossVit)

    def _flow_modules(self) -> List[_FlowModule]:
        """Every [class]-query attention module in forward order, with its branches."""
        name = type(self.model).__name__
        flow = []
        for index, block in enumerate(self.model.blocks):
            branches = block.num_branches
            for branch, vit_blocks in enumerate(block.blocks):
                for position, vit_block in enumerate(vit_blocks):
                    attention = getattr(vit_block, "attn", None)
                    if not isinstance(attention, Attention):
                        raise TypeError(
                            f"Expected timm.layers.attention.Attention in "
                            f"{name}.blocks[{index}].blocks[{branch}][{position}].attn, got "
                            f"{type(attention).__name__}. Write an adapter for this attention "
                            f"type."
                        )
                    flow.append(_FlowModule(attention, branch, branch))
            for branch, fusion in enumerate(block.fusion):
                # Only the first fusion block reads patch tokens: it returns the [class] alone.
                first = fusion if isinstance(fusion, CrossAttentionBlock) else fusion[0]
                attention = getattr(first, "attn", None)
                if not isinstance(attention, CrossAttention):
                    raise TypeError(
                        f"Expected timm.models.crossvit.CrossAttention in the fusion of branch "
                        f"{branch} of {name}.blocks[{index}], got {type(attention).__name__}. "
                        f"Write an adapter for this attention type."
                    )
                flow.append(_FlowModule(attention, branch, (branch + 1) % branches))
        return flow

    def attention_modules(self) -> List[nn.Module]:
        return [entry.attention for entry in self._flow_modules()]

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # each branch's [class] token (in a fusion: the projected [class] token)

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.in_chans

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.num_classes or self.model.num_features

    @property
    def outputs_features(self) -> bool:
        return self.model.num_classes == 0

    def branch_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The patch grid of each branch for images of ``image_size``: the branch's image
        size (the model rescales every image to it) over its patch size, as timm lays out
        the tokens (``forward_intermediates``).

        Raises:
            ValueError: when the model crops the images (``crop_scale=True`` and images
                larger than a branch's size), so that the branches see different regions.
        """
        height, width = image_size
        model = self.model
        grids = []
        for branch, patch_embed in enumerate(model.patch_embed):
            branch_h, branch_w = model.img_size_scaled[branch]
            if model.crop_scale and (branch_h, branch_w) != (height, width) and (
                branch_h <= height and branch_w <= width
            ):
                raise ValueError(
                    f"This model crops {height}x{width} images to {branch_h}x{branch_w} for "
                    f"branch {branch} (crop_scale=True), so the branches' grids cover different "
                    f"regions and their block maps cannot be added up. Build the model with "
                    f"crop_scale=False (the default: every branch rescales the whole image)."
                )
            patch_h, patch_w = patch_embed.patch_size
            grids.append((patch_embed.img_size[0] // patch_h, patch_embed.img_size[1] // patch_w))
        return grids

    def block_layouts(
        self, attention_modules: Sequence[nn.Module], image_size: Tuple[int, int]
    ) -> List[BlockLayout]:
        grids = self.branch_grids(image_size)
        layout_of = {
            id(entry.attention): BlockLayout(grids[entry.reads], entry.branch)
            for entry in self._flow_modules()
        }
        return [layout_of[id(attention)] for attention in attention_modules]

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        return max(self.branch_grids(image_size), key=lambda grid: grid[0] * grid[1])

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        if isinstance(attention, CrossAttention):
            return cross_attention_hooks(attention, record)
        return timm_attention_hooks(attention, record)
