"""timm ``VisionTransformer`` and its subclasses (ViT, DeiT, DeiT-III, DINO, distilled DeiT,
register-token models, SigLIP / SigLIP2, AIMv2, the gap ViTs), with timm's standard
``Attention``: fused or not, qk_norm, scale_norm, gated, with an attention mask or causal,
fixed or dynamic image size; with or without a [class] token.

Which query rows explain the output follows the head: the [class] row for
``global_pool='token'``; every row for 'avg', 'max', 'avgmax' and for models without a
[class] token; for ``global_pool='map'`` the attention-pool head (timm's
``AttentionPoolLatent``) is the last block of the flow, explained from its latent rows over
the tokens it reads (:mod:`~captum_daam.adapters.timm_attention_pool`). A distilled DeiT's head
reads the [class] and [dist] tokens (``head_queries`` (0, 1)). The convolution stems of
hybrids (ViT-hybrid, ViTamin) are not blocks of the flow.

The hooks here also serve :class:`~captum_daam.adapters.GenericAdapter`, for any model built
from timm-style attention (older timm and research code without q_norm / k_norm / norm).
"""

from abc import abstractmethod
from typing import Callable, ClassVar, List, Optional, Sequence, Tuple

from timm.layers import Attention
from timm.layers.diff_attention import DiffAttention
from timm.layers.attention import resolve_self_attn_mask
from timm.models.vision_transformer import (
    ParallelScalingBlock,
    ParallelThingsBlock,
    VisionTransformer,
)
from timm.models.deit import VisionTransformerDistilled
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, attention_probabilities, class_attention_row
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    ViTAdapter,
    register_adapter,
    watch_first_input,
)
from .timm_attention_pool import AttentionPoolLatent, attention_pool_hooks, attention_pool_layout


def _mask_of_call(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The additive mask a timm attention call applies, from its ``attn_mask`` and
    ``is_causal`` arguments, resolved as timm resolves them (None for none)."""
    tokens = args[0]
    attn_mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
    is_causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
    return resolve_self_attn_mask(tokens.shape[1], tokens, attn_mask, is_causal)


def timm_attention_hooks(
    attention: nn.Module,
    record: BlockRecord,
    call_bias: Optional[Callable[[tuple, dict], Optional[Tensor]]] = None,
) -> List[Hook]:
    """Hooks that fill ``record`` from one call of a timm-style attention module.

    The module has ``qkv`` (a linear layer giving [q, k, v] per token, heads inside each),
    ``proj`` and ``num_heads``, and maybe ``q_norm`` / ``k_norm``, ``norm`` and ``scale``, as
    timm's ``Attention`` has. The hooks read the query, keys and values from ``qkv``, or the
    query and keys after ``q_norm`` / ``k_norm`` where those exist (so qk_norm is included),
    the mask from the call's ``attn_mask`` / ``is_causal`` arguments, and watch the
    head-concatenated output where it enters ``norm`` (identity unless scale_norm; before any
    gate) or, without ``norm``, ``proj``.

    ``call_bias``, when given, replaces the mask: it maps the call's (args, kwargs) to the
    additive logit bias (..., N, N) the module adds (e.g. a relative position bias), or None.
    """
    heads = attention.num_heads
    width = attention.qkv.out_features // (3 * heads)
    scale = getattr(attention, "scale", width**-0.5)
    norms = [getattr(attention, name, None) for name in ("q_norm", "k_norm")]
    has_qk_norm = all(isinstance(norm, nn.Module) for norm in norms)
    call: dict = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bias = (call_bias or _mask_of_call)(args, kwargs)
        call["bias"] = None if bias is None else bias.detach()

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B, N, 3 * H * d) -> (3, B, H, N, d), as timm's reshape(B, N, 3, H, d).permute.
        queries, keys, values = qkv.detach().unflatten(-1, (3, heads, width)).permute(2, 0, 3, 1, 4)
        call["values"] = values
        if not has_qk_norm:
            set_attention(queries, keys)

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = queries.detach()

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        set_attention(call.pop("queries"), keys.detach())

    def set_attention(queries: Tensor, keys: Tensor) -> None:
        bias = call.pop("bias")
        row = class_attention_row(queries[:, :, 0], keys, scale, _class_row(bias))
        record.set_attention(
            row, call.pop("values"), SoftmaxAttention(queries, keys, scale, bias)
        )

    hooks = [Hook(attention, "pre_kwargs", on_call), Hook(attention.qkv, "forward", on_qkv)]
    if has_qk_norm:
        hooks += [Hook(norms[0], "forward", on_query), Hook(norms[1], "forward", on_keys)]
    output_norm = getattr(attention, "norm", None)
    watched = output_norm if isinstance(output_norm, nn.Module) else attention.proj
    return hooks + [Hook(watched, "pre", watch_first_input(record))]


def _class_row(bias: Optional[Tensor]) -> Optional[Tensor]:
    """The [class] query's row of an additive logit bias (..., N, N), or None."""
    return None if bias is None else bias[..., 0, :]


class TimmAdapter(ViTAdapter):
    """What timm's ViT-like models share, for the timm family adapters to build on.

    A subclass names where the blocks of the flow are (``blocks_name``) and the attention
    types their ``attn`` may be (``attention_types``), and implements :meth:`block_hooks`.
    The [class] token, the prefix tokens, the image channels, the output width and the patch
    grid (timm's ``PatchEmbed``, fixed or ``dynamic_img_size``) are read here.
    """

    blocks_name: ClassVar[str] = "blocks"
    attention_types: ClassVar[Tuple[type, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        blocks = getattr(model, self.blocks_name, None)
        if blocks is None:
            raise TypeError(
                f"DAAM explains the blocks in {name}.{self.blocks_name}, but this model has "
                f"none (its head was pruned, e.g. by prune_intermediate_layers). Use the model "
                f"as created."
            )
        allowed = " or ".join(
            f"{cls.__module__}.{cls.__qualname__}" for cls in self.attention_types
        )
        for index, block in enumerate(blocks):
            for attention in self.block_attention(block):
                if attention is None:
                    raise TypeError(
                        f"Block {index} of {name}.{self.blocks_name} (block type "
                        f"{type(block).__name__}) has no attn module: its attention runs "
                        f"elsewhere, which the {self.family} adapter does not hook; it "
                        f"supports blocks with one {allowed} as .attn. Write an adapter for "
                        f"this block type."
                    )
                if not isinstance(attention, self.attention_types):
                    raise TypeError(
                        f"Block {index} of {name}.{self.blocks_name} uses "
                        f"{type(attention).__name__} (block type {type(block).__name__}); the "
                        f"{self.family} adapter supports {allowed}. Write an adapter for this "
                        f"attention type."
                    )
        self.check_pooling()

    def block_attention(self, block: nn.Module) -> List[Optional[nn.Module]]:
        """The attention modules of one block, in forward order: its ``attn`` (None when it
        has none). Families whose blocks hold several, or compute attention in the block's own
        forward, override it."""
        return [getattr(block, "attn", None)]

    def class_token(self) -> Optional[Tensor]:
        """The model's learned [class] token, or None when it has none."""
        return getattr(self.model, "cls_token", None)

    def check_pooling(self) -> None:
        """Called by the constructor: refuses a pooling the adapter cannot explain. Explained
        here: ``global_pool='token'`` ([class] rows), 'avg', 'max', 'avgmax' (every query
        row, see :attr:`reads_class_token`) and 'map' (timm's ``AttentionPoolLatent``, the
        last block of the flow); refused: another attention-pool head (``'prr'``)."""
        pool = getattr(self.model, "attn_pool", None)
        if pool is not None and not isinstance(pool, AttentionPoolLatent):
            raise TypeError(
                f"This {type(self.model).__name__} pools its tokens with "
                f"{type(pool).__name__} (global_pool={self.model.global_pool!r}), an attention "
                f"pool the {self.family} adapter does not hook; it explains global_pool "
                f"'token', 'avg', 'max', 'avgmax' and 'map' (timm's AttentionPoolLatent). "
                f"Build the model with one of those."
            )

    def attention_pool(self) -> Optional[AttentionPoolLatent]:
        """The model's attention-pool head (``global_pool='map'``), or None."""
        pool = getattr(self.model, "attn_pool", None)
        return pool if isinstance(pool, AttentionPoolLatent) else None

    @property
    def has_class_token(self) -> bool:
        return self.class_token() is not None

    @property
    def reads_class_token(self) -> bool:
        pooling = getattr(self.model, "global_pool", "token")
        return self.has_class_token and pooling == "token" and self.attention_pool() is None

    def attention_modules(self) -> List[nn.Module]:
        blocks = getattr(self.model, self.blocks_name)
        modules = [attention for block in blocks for attention in self.block_attention(block)]
        pool = self.attention_pool()
        return modules + ([pool] if pool is not None else [])

    def latent_query_modules(self) -> List[nn.Module]:
        pool = self.attention_pool()
        return [pool] if pool is not None else []

    def block_layouts(
        self, attention_modules: Sequence[nn.Module], image_size: Tuple[int, int]
    ) -> List[BlockLayout]:
        """Every block reads :meth:`grid_size`'s grid after the prefix tokens, in the branch
        :meth:`branch_of` gives; an attention-pool head reads the same tokens, or (timm's
        ``pool_include_prefix=False``) the patch tokens alone."""
        grid = self.grid_size(image_size)
        pool = self.attention_pool()
        return [
            attention_pool_layout(
                grid, self.num_prefix_tokens, getattr(self.model, "pool_include_prefix", True)
            )
            if module is pool
            else BlockLayout(grid, self.branch_of(module))
            for module in attention_modules
        ]

    def branch_of(self, attention: nn.Module) -> int:
        """The branch of a block's attention module (see :class:`BlockLayout`): 0, one
        branch, unless a family's blocks run attention side by side."""
        return 0

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        """The hooks of an attention-pool head here; a family's blocks in
        :meth:`attention_hooks`."""
        if attention is self.attention_pool():
            return attention_pool_hooks(attention, record)
        return self.attention_hooks(attention, record)

    @abstractmethod
    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        """The hooks that fill ``record`` when one block's ``attention`` runs (see
        :meth:`ViTAdapter.block_hooks`)."""

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def in_channels(self) -> Optional[int]:
        channels = getattr(self.model, "in_chans", None)
        if channels is None:
            projection = getattr(self.model.patch_embed, "proj", None)
            channels = getattr(projection, "in_channels", None)
        return channels

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.num_classes or self.model.num_features

    @property
    def outputs_features(self) -> bool:
        return self.model.num_classes == 0

    def grid_size(self, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        patch_embed = self.model.patch_embed
        height, width = image_size
        if getattr(self.model, "dynamic_img_size", False):
            patch_h, patch_w = patch_embed.patch_size
            if not patch_embed.dynamic_img_pad and (height % patch_h or width % patch_w):
                raise ValueError(
                    f"Expected image height and width divisible by the patch size "
                    f"{patch_h}x{patch_w}, got {height}x{width}. Resize or pad the images."
                )
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        if tuple(patch_embed.img_size) != (height, width):
            expected_h, expected_w = patch_embed.img_size
            remedies = ["resize the images"]
            if hasattr(self.model, "set_input_size"):
                remedies.append(f"call model.set_input_size(img_size=({height}, {width}))")
            if hasattr(self.model, "dynamic_img_size"):
                remedies.append("build the model with dynamic_img_size=True")
            raise ValueError(
                f"This model takes {expected_h}x{expected_w} images (a fixed "
                f"{patch_embed.grid_size[0]}x{patch_embed.grid_size[1]} patch grid), got "
                f"{height}x{width}. To explain other sizes, {', or '.join(remedies)}."
            )
        return tuple(patch_embed.grid_size)


def diff_attention_hooks(attention: DiffAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``DiffAttention`` (differential
    attention): each head's attention is the difference of two softmax maps,
    A = softmax(q1 k1^T * scale + mask) - lambda * softmax(q2 k2^T * scale + mask), over values
    twice the query width, so the output A @ v is linear in the values once A is held fixed.
    q and k come after ``q_norm`` / ``k_norm`` (2 H heads of width d, each head's pair
    consecutive), v from ``qkv`` (H heads of width 2 d), lambda from the module's own
    ``_compute_lambda``; the output A @ v is watched where it enters ``sub_norm`` (the
    per-head RMSNorm before the projection), as (B, N, H * 2 d) rows."""
    heads = attention.num_heads
    scale = attention.scale
    call: dict = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bias = _mask_of_call(args, kwargs)
        call["bias"] = None if bias is None else bias.detach()

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        values = qkv.detach().chunk(3, dim=-1)[2]  # (B, N, C) -> (B, H, N, 2 d)
        call["values"] = values.unflatten(-1, (heads, -1)).transpose(1, 2)

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = queries.detach()

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        # (B, 2 H, N, d) -> the pair (B, H, N, d), (B, H, N, d) of each head.
        (q1, q2), (k1, k2) = (part.unflatten(1, (heads, 2)).unbind(2)
                              for part in (call.pop("queries"), keys.detach()))
        bias, weight = call.pop("bias"), attention._compute_lambda().detach().type_as(q1)
        row = class_attention_row(q1[:, :, 0], k1, scale, _class_row(bias)) - (
            weight * class_attention_row(q2[:, :, 0], k2, scale, _class_row(bias)))

        def full_attention() -> Tensor:
            return attention_probabilities(q1, k1, scale, bias) - weight * (
                attention_probabilities(q2, k2, scale, bias))

        record.set_attention(row, call.pop("values"), full_attention)

    def on_sub_norm(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        output = args[0]  # (B, H, N, 2 d)
        watched = record.watch(output.transpose(1, 2).flatten(2))
        return (watched.unflatten(2, (heads, -1)).transpose(1, 2),) + tuple(args[1:])

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.q_norm, "forward", on_query),
        Hook(attention.k_norm, "forward", on_keys),
        Hook(attention.sub_norm, "pre", on_sub_norm),
    ]


def parallel_scaling_hooks(block: ParallelScalingBlock, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``ParallelScalingBlock`` (ViT-22B
    style: one ``in_proj`` gives the MLP's input and q, k, v; attention runs in the block's
    own forward).

    The values are read from ``in_proj``'s output, the query and keys after ``q_norm`` /
    ``k_norm`` (identities unless qk_norm), the mask from the block's ``attn_mask`` /
    ``is_causal`` arguments. The head-concatenated attention output is watched where it enters
    ``attn_out_proj``, or, with a fused output projection, ``out_proj``, whose input is that
    output followed by the MLP's (the gradient's first C channels are the attention's).
    """
    heads, width = block.num_heads, block.head_dim
    channels = heads * width
    call: dict = {}

    def by_heads(tokens: Tensor) -> Tensor:  # (B, N, H, d) -> (B, H, N, d)
        return tokens.detach().transpose(1, 2)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bias = _mask_of_call(args, kwargs)
        call["bias"] = None if bias is None else bias.detach()

    def on_in_projection(module: nn.Module, args: tuple, projected: Tensor) -> None:
        values = projected.split(block.in_split, dim=-1)[3]
        call["values"] = by_heads(values.unflatten(-1, (heads, width)))

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = by_heads(queries)

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        queries, keys, bias = call.pop("queries"), by_heads(keys), call.pop("bias")
        row = class_attention_row(queries[:, :, 0], keys, block.scale, _class_row(bias))
        record.set_attention(
            row,
            call.pop("values"),
            SoftmaxAttention(queries, keys, block.scale, bias),
        )

    def attention_channels(gradient: Tensor) -> Tensor:  # of out_proj's input [attention, MLP]
        return gradient[..., :channels]

    projection = block.attn_out_proj if block.out_proj is None else block.out_proj
    to_pre_projection = None if block.out_proj is None else attention_channels
    return [
        Hook(block, "pre_kwargs", on_call),
        Hook(block.in_proj, "forward", on_in_projection),
        Hook(block.q_norm, "forward", on_query),
        Hook(block.k_norm, "forward", on_keys),
        Hook(projection, "pre", watch_first_input(record, to_pre_projection)),
    ]


@register_adapter
class TimmVisionTransformerAdapter(TimmAdapter):
    """timm ``VisionTransformer`` with timm ``Attention`` in every block, or parallel blocks:
    ``ParallelThingsBlock`` (several ``Attention`` side by side, each a block of the flow, in
    branches of their own) and ``ParallelScalingBlock`` (attention in the block's own forward;
    the block is the flow's module)."""

    family = "timm VisionTransformer"
    examples = (
        "vit_*, deit_*, deit3_*, deit_*_distilled_*, DINO vit_*.dino, vit_*_reg4_dinov2, "
        "SigLIP / SigLIP2 vit_*_siglip_*, aimv2_*, vit_*_gap_*, qk_norm / scale_norm variants, "
        "dynamic_img_size, parallel blocks (vit_*_18x2_224, vit_*_xp_224), differential "
        "attention (vit_d*_patch16_reg1_gap_256)"
    )
    attention_types = (Attention, ParallelScalingBlock, DiffAttention)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def block_attention(self, block: nn.Module) -> List[Optional[nn.Module]]:
        if isinstance(block, ParallelThingsBlock):
            return [getattr(branch, "attn", None) for branch in block.attns]
        if isinstance(block, ParallelScalingBlock):
            return [block]
        return super().block_attention(block)

    @property
    def head_queries(self) -> Optional[Tuple[int, ...]]:
        if isinstance(self.model, VisionTransformerDistilled):
            return (0, 1)  # in eval mode the output is the mean of the [class] and [dist] heads
        return super().head_queries

    def branch_of(self, attention: nn.Module) -> int:
        # The attentions of a ParallelThingsBlock read the same input side by side, neither
        # feeding the other: the i-th of each block is in branch i.
        for block in getattr(self.model, self.blocks_name):
            if isinstance(block, ParallelThingsBlock):
                for branch, candidate in enumerate(self.block_attention(block)):
                    if candidate is attention:
                        return branch
        return 0

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        if isinstance(attention, ParallelScalingBlock):
            return parallel_scaling_hooks(attention, record)
        if isinstance(attention, DiffAttention):
            return diff_attention_hooks(attention, record)
        return timm_attention_hooks(attention, record)
