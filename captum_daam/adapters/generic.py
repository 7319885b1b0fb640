"""Any model built from timm-style attention modules: T2T-ViT's backbone, older timm models,
research code. The user names the attention modules; the hooks are the timm adapter's."""

from typing import List, Optional, Sequence, Tuple, Union

from torch import nn

from .base import BlockRecord, Hook, ViTAdapter, check_grid_size
from .timm_vit import timm_attention_hooks


class GenericAdapter(ViTAdapter):
    """An adapter for a model whose blocks run timm-style attention, given explicitly.

    Each attention module must have ``qkv``, a linear layer giving [q, k, v] for every token
    (heads inside each, as ``reshape(B, N, 3, num_heads, head_dim)`` splits them), ``proj``,
    the output projection, and ``num_heads``; ``scale`` (default head_dim ** -0.5),
    ``q_norm`` / ``k_norm`` and ``norm`` are used when present. The module's input must be
    the tokens [prefix tokens..., patch tokens...].

    Which tokens the model's head reads is not visible in the attention modules, so it is
    never assumed: say it with ``head_queries`` unless there are no prefix tokens.

    Use it with ``DAAM(model, adapter=GenericAdapter(...))``; it is not picked automatically.

    Args:
        attention_modules: the attention module of every block of the flow, in forward order.
        num_prefix_tokens: tokens before the patches ([class], distillation, registers).
            Default: 1.
        head_queries: which tokens the model's head reads, and so which query rows DAAM
            explains by default: "class", the first token is a [class] token and the head
            reads it (T2T-ViT); "all", the head pools the tokens (or the model has no
            [class] token; the prefix tokens are then, e.g., registers): every row is
            explained; or a tuple of token indices the head reads (e.g. (0, 1) for a
            [class] and a [dist] token; the first, 0, must be a [class] token).
            Default: None, which is "all" when ``num_prefix_tokens`` is 0 and otherwise
            an error asking for it.
        grid_size: the patch grid (rows, columns). Default: None, the square grid of the
            patch tokens, found from their number in the forward pass; give it for
            non-square grids.
        in_channels: image channels the model takes, checked before the forward pass when
            given. Default: None.
        num_outputs: width of the model's output, for checking targets before the forward
            pass when given. Default: None.

    Examples::

        >>> adapter = GenericAdapter([block.attn for block in model.blocks], head_queries="class")
        >>> daam = DAAM(model, adapter=adapter)
    """

    family = "GenericAdapter (timm-style attention modules given explicitly)"
    examples = "T2T-ViT, research ViTs"
    layer_example = "one of the attention modules given to GenericAdapter"

    def __init__(
        self,
        attention_modules: Sequence[nn.Module],
        num_prefix_tokens: int = 1,
        grid_size: Optional[Tuple[int, int]] = None,
        in_channels: Optional[int] = None,
        num_outputs: Optional[int] = None,
        head_queries: Optional[Union[str, Sequence[int]]] = None,
    ) -> None:
        super().__init__(None)
        single = isinstance(attention_modules, nn.Module) and not isinstance(
            attention_modules, (nn.ModuleList, nn.Sequential)
        )
        modules = [attention_modules] if single else list(attention_modules)
        if not modules:
            raise ValueError("Expected at least one attention module, got none.")
        for index, attention in enumerate(modules):
            _check_timm_style(index, attention)
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
            raise TypeError(f"Expected num_prefix_tokens to be an int, got {num_prefix_tokens!r}.")
        if num_prefix_tokens < 0:
            raise ValueError(f"Expected num_prefix_tokens >= 0, got {num_prefix_tokens}.")
        self._head_queries = _check_head_queries(head_queries, num_prefix_tokens)
        if grid_size is not None:
            grid_size = check_grid_size(grid_size)
        self._modules = modules
        self._num_prefix_tokens = num_prefix_tokens
        self._grid_size = grid_size
        self._in_channels = in_channels
        self._num_outputs = num_outputs

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return False  # given explicitly, never picked by adapter_for

    def attention_modules(self) -> List[nn.Module]:
        return list(self._modules)

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return timm_attention_hooks(attention, record)

    @property
    def num_prefix_tokens(self) -> int:
        return self._num_prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return self._head_queries is not None and 0 in self._head_queries

    @property
    def reads_class_token(self) -> bool:
        return self.has_class_token

    @property
    def head_queries(self) -> Optional[Tuple[int, ...]]:
        return self._head_queries

    @property
    def in_channels(self) -> Optional[int]:
        return self._in_channels

    @property
    def num_outputs(self) -> Optional[int]:
        return self._num_outputs

    def grid_size(self, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        return self._grid_size

    def grid_from_tokens(self, num_patches: int) -> Tuple[int, int]:
        if self._grid_size is not None:
            return self._grid_size
        return super().grid_from_tokens(num_patches)


def _check_timm_style(index: int, attention: nn.Module) -> None:
    if not isinstance(attention, nn.Module):
        raise TypeError(
            f"Expected attention modules, got {type(attention).__name__} at position {index}."
        )
    qkv, projection = getattr(attention, "qkv", None), getattr(attention, "proj", None)
    heads = getattr(attention, "num_heads", None)
    missing = [
        what
        for what, present in (
            ("a qkv linear layer", isinstance(qkv, nn.Linear)),
            ("a proj module", isinstance(projection, nn.Module)),
            ("an int num_heads", isinstance(heads, int)),
        )
        if not present
    ]
    if missing:
        raise TypeError(
            f"GenericAdapter expects timm-style attention modules, with a qkv linear layer, a "
            f"proj module and num_heads; the module at position {index} "
            f"({type(attention).__name__}) lacks {', '.join(missing)}. Write a ViTAdapter "
            f"subclass for this attention."
        )
    if qkv.out_features % (3 * heads):
        raise TypeError(
            f"The qkv layer of the attention module at position {index} gives "
            f"{qkv.out_features} features, not three equal parts split over {heads} heads."
        )


def _check_head_queries(
    head_queries: Optional[Union[str, Sequence[int]]], num_prefix_tokens: int
) -> Optional[Tuple[int, ...]]:
    """A user's ``head_queries`` as the head's rows (None: every row), or an error."""
    if head_queries is None:
        if num_prefix_tokens == 0:
            return None
        raise ValueError(
            f"GenericAdapter cannot tell which tokens the model's head reads, and the first of "
            f"the {num_prefix_tokens} prefix token(s) may be a [class] token or a register. "
            f"Say it: head_queries='class' when the first token is a [class] token the head "
            f"reads (T2T-ViT), head_queries='all' when the head pools the tokens, or a tuple "
            f"of the token indices the head reads."
        )
    if head_queries == "class":
        rows: Tuple[int, ...] = (0,)
    elif head_queries == "all":
        return None
    elif isinstance(head_queries, (tuple, list)) and head_queries and all(
        isinstance(row, int) and not isinstance(row, bool) for row in head_queries
    ):
        rows = tuple(head_queries)
    else:
        raise ValueError(
            f"Expected head_queries to be 'class', 'all' or a tuple of token indices, got "
            f"{head_queries!r}."
        )
    if rows[0] != 0 or len(set(rows)) != len(rows) or max(rows) >= num_prefix_tokens:
        raise ValueError(
            f"Expected head_queries to start with the [class] token, 0, and name distinct "
            f"prefix tokens below num_prefix_tokens={num_prefix_tokens}, got {head_queries!r}."
        )
    return rows
