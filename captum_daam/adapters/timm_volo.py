"""timm ``VOLO`` (Vision Outlooker: volo_d1_224, volo_d3_448, volo_d5_512, ...).

VOLO's outlooker and transformer stages run on a (B, H, W, C) token map without a [class]
token. The [class] token is prepended to the patch tokens (the map flattened row-major) only
before the class-attention blocks, ``model.post_network``: there the [class] token is the only
query (``ClassAttention``: q from the [class] token, k and v from all tokens through one
``kv`` linear layer) and the patch tokens pass through unchanged. The DAAM flow runs over
those blocks.

The default head also adds half the largest token-labelling score of the patch tokens
(``aux_head``). Those patch tokens do not pass through the class-attention blocks, so that
term adds nothing to the gradients there: the maps explain what reaches the score through the
[class] token, ``head(norm(x)[:, 0])``.
"""

from typing import List, Tuple

from timm.models.volo import VOLO, ClassAttention, Downsample
from torch import Tensor, nn

from .._warnings import warn_user
from ..decompose import class_attention_row
from .base import BlockRecord, Hook, output_grid, register_adapter
from .timm_beit import split_heads
from .timm_cait import ClassAttentionAdapter


def volo_class_attention_hooks(attention: ClassAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's VOLO ``ClassAttention``.

    The module takes the normalised tokens [cls, patches...]; its query is the [class] token
    alone, q = q(x[:, :1]) (B, 1, H * d), and one linear layer gives keys and values of every
    token, kv(x) (B, N, 2 * H * d) laid out as (2, H, d). The hooks read those two outputs and
    watch the head-concatenated output, (B, 1, H * d), where it enters ``proj``. The module
    scales the query by ``attention.scale`` before the product, as the recomputed row does.
    """
    heads, width = attention.num_heads, attention.head_dim
    call: dict = {}

    def on_query(module: nn.Module, args: tuple, query: Tensor) -> None:
        call["class_query"] = query.detach()[:, 0].unflatten(-1, (heads, width))  # (B, H, d)

    def on_keys_values(module: nn.Module, args: tuple, keys_values: Tensor) -> None:
        keys, values = keys_values.detach().chunk(2, dim=-1)  # the (2, H, d) layout's halves
        call["keys"], call["values"] = split_heads(keys, heads), split_heads(values, heads)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        # q and kv have both run by the time the output reaches proj.
        row = class_attention_row(call.pop("class_query"), call.pop("keys"), attention.scale)
        record.set_attention(row, call.pop("values"))
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention.q, "forward", on_query),
        Hook(attention.kv, "forward", on_keys_values),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmVoloAdapter(ClassAttentionAdapter):
    """timm ``VOLO``: the flow runs over the class-attention blocks, ``model.post_network``.

    The maps explain the part of the target score that passes through the [class] token; the
    token-labelling term of the head (``aux_head``, from the patch tokens) does not pass through
    these blocks. A VOLO without class-attention blocks (``post_layers=None``, or pruned by
    ``prune_intermediate_layers``) or with ``global_pool=''`` (one output per token) is refused;
    with ``global_pool='avg'`` (the [class] token averaged with the patch tokens) DAAM warns.
    """

    family = "timm VOLO (class-attention blocks)"
    examples = "volo_d1_224, volo_d3_448, volo_d5_512"
    layer_example = "model.post_network[i].attn"
    blocks_name = "post_network"
    attention_types = (ClassAttention,)

    def __init__(self, model: nn.Module) -> None:
        if model.post_network is None or getattr(model, "cls_token", None) is None:
            raise TypeError(
                f"DAAM explains the [class] token of VOLO's class-attention blocks "
                f"(model.post_network), but this {type(model).__name__} has none (built with "
                f"post_layers=None, or its head pruned by prune_intermediate_layers). Use a "
                f"VOLO with class-attention blocks, as every registered volo_* model has."
            )
        super().__init__(model)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, VOLO)

    def check_pooling(self) -> None:
        pooling = self.model.global_pool
        if pooling == "avg":
            warn_user(
                f"This {type(self.model).__name__} pools its output with global_pool='avg', the "
                f"mean of the [class] token and the patch tokens: the maps show only the part "
                f"of the output that passes through the [class] token. With global_pool='token' "
                f"(the default) the pooled features are the [class] token's alone."
            )
        elif pooling != "token":
            raise TypeError(
                f"DAAM explains the [class] token, but this {type(self.model).__name__} uses "
                f"global_pool={pooling!r}, so it returns one output per token rather than one "
                f"score vector per image. Use global_pool='token' (the default)."
            )

    @property
    def reads_class_token(self) -> bool:
        # The head reads the [class] token, alone or (global_pool='avg', warned about by the
        # constructor) averaged with the patch tokens.
        return True

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return volo_class_attention_hooks(attention, record)

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the [class] token, prepended before the class-attention blocks

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """The token map after the convolutional stem, the patch projection and the
        downsampling between stages, flattened row-major before the class-attention blocks;
        it must match the position embedding's fixed (gh, gw)."""
        height, width = image_size
        convolutions = [m for m in self.model.patch_embed.modules() if isinstance(m, nn.Conv2d)]
        for stage in self.model.network:
            if isinstance(stage, Downsample):
                convolutions.append(stage.proj)
        for conv in convolutions:
            height, width = output_grid((height, width), conv)
        if height < 1 or width < 1:
            raise ValueError(
                f"Expected images large enough for at least one token, got "
                f"{image_size[0]}x{image_size[1]}. Use larger images."
            )
        if self.model.pos_embed is not None:
            expected = tuple(self.model.pos_embed.shape[1:3])
            if (height, width) != expected:
                reduction = self.model.feature_info[-1]["reduction"]
                raise ValueError(
                    f"This model's position embedding is built for a {expected[0]}x"
                    f"{expected[1]} token grid ({expected[0] * reduction}x"
                    f"{expected[1] * reduction} images), but {image_size[0]}x{image_size[1]} "
                    f"images give {height}x{width}. Resize the images."
                )
        return height, width
