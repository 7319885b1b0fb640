"""timm ``Cait`` (CaiT: cait_xxs24_224, cait_s24_224, cait_m36_384, ...).

CaiT decides in its class-attention blocks (``model.blocks_token_only``): only the [class]
token is a query there, and it reads itself and the patch tokens left by the self-attention
blocks. The DAAM flow runs over those blocks; the self-attention blocks before them (talking
heads attention, every token a query) are not part of it.
"""

from typing import List, Tuple

from timm.models.cait import Cait, ClassAttn
from torch import Tensor, nn

from ..decompose import class_attention_row
from .base import BlockRecord, Hook, register_adapter
from .timm_vit import TimmAdapter


def class_attention_hooks(attention: ClassAttn, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``ClassAttn`` (CaiT, XCiT).

    ``ClassAttn`` takes the normalised tokens [cls, patches...] and has the [class] token as
    its only query: q = q(x[:, 0]), k = k(x), v = v(x). The hooks read those three linear
    outputs and watch the head-concatenated output, (B, 1, C), where it enters ``proj``.
    Fused or not, the module scales the logits by ``attention.scale`` (SDPA's default,
    head_dim ** -0.5), so the recomputed row is the one the module used.
    """
    heads = attention.num_heads
    call: dict = {}

    def on_query(module: nn.Module, args: tuple, query: Tensor) -> None:
        call["class_query"] = query.detach().unflatten(-1, (heads, -1))  # (B, H, d)

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        call["keys"] = keys.detach().unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, d)

    def on_values(module: nn.Module, args: tuple, values: Tensor) -> None:
        call["values"] = values.detach().unflatten(-1, (heads, -1)).transpose(1, 2)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        # q, k and v have all run by the time the output reaches proj, whatever their order.
        row = class_attention_row(call.pop("class_query"), call.pop("keys"), attention.scale)
        record.set_attention(row, call.pop("values"))
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention.q, "forward", on_query),
        Hook(attention.k, "forward", on_keys),
        Hook(attention.v, "forward", on_values),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


class ClassAttentionAdapter(TimmAdapter):
    """CaiT and XCiT: the flow runs over class-attention blocks (``ClassAttn``), which change
    only the [class] token. A model whose head does not read that token is refused: its
    class-attention blocks would not affect the output at all."""

    attention_types = (ClassAttn,)
    self_attention = False  # only the [class] token queries: no full attention matrices

    def check_pooling(self) -> None:
        pooling = getattr(self.model, "global_pool", "token")
        if pooling != "token":
            raise TypeError(
                f"DAAM explains the [class] token, but this {type(self.model).__name__} uses "
                f"global_pool={pooling!r}, so its output does not come from the [class] token "
                f"and its class-attention blocks do not affect it. Use global_pool='token' "
                f"(the default)."
            )

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return class_attention_hooks(attention, record)


@register_adapter
class TimmCaitAdapter(ClassAttentionAdapter):
    """timm ``Cait``: the flow runs over the class-attention blocks, ``model.blocks_token_only``."""

    family = "timm CaiT (class-attention blocks)"
    examples = "cait_xxs24_224, cait_s24_224, cait_m36_384"
    layer_example = "model.blocks_token_only[i].attn"
    blocks_name = "blocks_token_only"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Cait)
