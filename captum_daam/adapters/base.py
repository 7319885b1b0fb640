"""The adapter interface: the only code that knows where a model family keeps its attention.

An adapter answers, for one model: which modules are the attention of its blocks, how many
prefix tokens precede the patches, what patch grid an image size gives, and, during one
forward pass, what each attention block computed for the [class] query. It records that
through module hooks that :meth:`ViTAdapter.record` always removes.

A new family is one subclass of :class:`ViTAdapter`, decorated with :func:`register_adapter`.
"""

import math
import sys
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import (
    Any,
    Callable,
    ClassVar,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import torch
from timm.layers import to_2tuple
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._outputs import scores_in_output

__all__ = [
    "BlockLayout",
    "TokenRows",
    "BlockRecord",
    "Hook",
    "ViTAdapter",
    "register_adapter",
    "adapter_for",
    "explained_model",
    "forward_module",
    "output_grid",
    "supported_families",
]


class BlockRecord:
    """What one attention block computed for the [class] query in one forward pass.

    Attributes:
        class_attention: (B, H, N) the [class] attention row, detached.
        values: (B, H, N, d) the values, detached.
        class_gradient: (B, C) gradient of the objective with respect to the [class] row of
            the attention output before the output projection; set during the backward pass.
        anchor: the tensor in the autograd graph whose gradient gives ``class_gradient``.
        on_gradient: called with the record as soon as ``class_gradient`` is set, during the
            backward pass, so that a caller can reduce the record and free the values early.
        full: whether the caller needs full attention matrices (attention rollouts): then
            ``attention`` is kept and the whole gradient (B, N, C) is kept in ``gradient``.
        attention: with ``full``, a function giving the block's full attention probabilities
            (B, H, N, N), formed only when called, so a caller can form one block's at a time;
            usually a :class:`~captum_daam.decompose.Mixing` (e.g.
            :class:`~captum_daam.decompose.SoftmaxAttention`), whose A^T w DAAM takes without
            forming the matrix.
        gradient: with ``full``, (B, N, C) the gradient at the pre-projection output.
        on_attention: called with the record as soon as the attention is set, during the
            forward pass.
        to_pre_projection: the function given to :meth:`watch` that takes a gradient at the
            watched tensor to the pre-projection rows of the records' layout, or None.
        residual: None, or (B, H, Nq, d) the part of the attention output before the output
            projection that is no token's contribution, in the heads layout of ``values``
            (MViTv2's residual pooling adds the pooled query): the output is then
            ``attention @ values + residual``. Not split over the grid.
    """

    def __init__(
        self,
        on_gradient: Optional[Callable[["BlockRecord"], None]] = None,
        full: bool = False,
        on_attention: Optional[Callable[["BlockRecord"], None]] = None,
    ) -> None:
        self.class_attention: Optional[Tensor] = None
        self.values: Optional[Tensor] = None
        self.class_gradient: Optional[Tensor] = None
        self.anchor: Optional[Tensor] = None
        self.on_gradient = on_gradient
        self.closed = False
        self.full = full
        self.attention: Optional[Callable[[], Tensor]] = None
        self.gradient: Optional[Tensor] = None
        self.on_attention = on_attention
        self.residual: Optional[Tensor] = None
        self.to_pre_projection: Optional[Callable[[Tensor], Tensor]] = None

    def close(self) -> None:
        """Record nothing more: a checkpointed backward pass re-runs the forward."""
        self.closed = True

    def set_attention(
        self,
        class_attention: Tensor,
        values: Tensor,
        attention: Optional[Callable[[], Tensor]] = None,
    ) -> None:
        """Store the [class] attention row and the values (both detached here), and, for a
        caller that asked for ``full`` records, ``attention``: a function forming the full
        (B, H, N, N) attention probabilities, best a :class:`~captum_daam.decompose.Mixing`."""
        if self.class_attention is not None:
            raise RuntimeError(
                "An attention module ran twice in one forward pass; DAAM expects each "
                "block's attention to run once per forward."
            )
        self.class_attention = class_attention.detach()
        self.values = values.detach()
        if self.full:
            if attention is None:
                raise RuntimeError(
                    "This adapter records only the [class] attention row, not full attention "
                    "matrices."
                )
            self.attention = attention
        if self.on_attention is not None:
            self.on_attention(self)

    def watch(
        self, tensor: Tensor, to_pre_projection: Optional[Callable[[Tensor], Tensor]] = None
    ) -> Tensor:
        """Take the [class] row of the gradient at ``tensor`` (B, N, ...) during backward.

        Args:
            tensor: the pre-projection attention output, or any tensor from which the
                gradient at the pre-projection [class] row follows.
            to_pre_projection: maps the gradient at ``tensor`` (..., C') to the gradient at
                the pre-projection output (..., C), row by row; identity when None. For a
                ``full`` record it is given the whole gradient at ``tensor``, which may be laid
                out otherwise (a windowed block's output grid), and returns the whole
                (B', N, C) gradient at the pre-projection output.

        Returns:
            The tensor the forward pass must go on with: ``tensor`` itself, or, when nothing
            upstream requires grad (a frozen model), a detached view of it that does. Under
            disabled gradients nothing is watched.
        """
        if not torch.is_grad_enabled():
            return tensor  # a forward without gradients: nothing to watch, ``anchor`` stays None
        if not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_()

        def keep_class_row(gradient: Tensor) -> None:
            if self.full:
                mapped = gradient if to_pre_projection is None else to_pre_projection(gradient)
                self.gradient = mapped
                row = mapped[:, 0]
            else:
                row = gradient[:, 0].clone()  # a copy, so the (B, N, C) gradient can be freed
                if to_pre_projection is not None:
                    row = to_pre_projection(row)
            self.class_gradient = row
            if self.on_gradient is not None:
                self.on_gradient(self)

        tensor.register_hook(keep_class_row)
        self.anchor, self.to_pre_projection = tensor, to_pre_projection
        return tensor


def loaded_classes(module_name: str, names: Sequence[str]) -> Tuple[type, ...]:
    """The classes ``names`` of the module ``module_name`` if it has been imported, else ():
    how the adapters of other libraries' models (transformers, open_clip) recognise them
    without importing those libraries, which a model of theirs has done already."""
    module = sys.modules.get(module_name)
    if module is None:
        return ()
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


def tokens_first(maps: Tensor) -> Tensor:
    """(B, C, h, w) NCHW maps -> (B, h * w, C) tokens, row by row: from the gradient at an
    NCHW attention output to its rows (a ``to_pre_projection`` for :meth:`BlockRecord.watch`)."""
    return maps.flatten(2).transpose(1, 2)


def watch_first_input(
    record: BlockRecord, to_pre_projection: Optional[Callable[[Tensor], Tensor]] = None
) -> Callable:
    """A forward pre-hook (for :class:`Hook` kind ``"pre"``) that watches its module's first
    input in ``record`` (:meth:`BlockRecord.watch`): put on the module the attention output
    enters (usually ``proj``)."""

    def watch(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        return (record.watch(args[0], to_pre_projection),) + tuple(args[1:])

    return watch


class TokenRows(NamedTuple):
    """Query rows that depend on the token count: the rows ``first``, then every row from
    ``start`` on (the patches after the prefix tokens). ``TokenRows((0,), 1 + registers)``:
    the [class] token and the patches, not the registers."""

    first: Tuple[int, ...]
    start: int

    def rows(self, num_tokens: int) -> Tuple[int, ...]:
        """The rows, for a block of ``num_tokens`` query tokens."""
        return tuple(self.first) + tuple(range(self.start, num_tokens))


class BlockLayout(NamedTuple):
    """Where one block's queries read their patch tokens.

    Attributes:
        grid: (gh, gw) the patch grid of the tokens the block's queries attend to (its keys
            and values), row-major after the prefix tokens unless ``positions`` says
            otherwise; None when only the forward pass tells (the token count then gives
            it, see :meth:`ViTAdapter.grid_from_tokens`).
        branch: which branch of the model the block is in. Blocks of one branch run one after
            another; blocks of different branches (CrossViT's two) may run side by side,
            neither feeding the other before the branches are fused.
        positions: None, or (W, N) long: for a module called on W windows of N tokens per
            image (its batch is B * W, an image's windows consecutive), the cell of ``grid``
            (row-major) each token lies on, -1 for a token that is no patch (a prefix token,
            window padding). None: one window of the adapter's ``num_prefix_tokens`` prefix
            tokens, then the grid row by row. (W, N, S): a token made from S patches (NextViT's
            keys, each averaged over a run of tokens) lies on those S cells, sharing its value
            equally. See :func:`~captum_daam.decompose.place_on_grid`.
    """

    grid: Optional[Tuple[int, int]]
    branch: int = 0
    positions: Optional[Tensor] = None


class Hook(NamedTuple):
    """One module hook an adapter asks for.

    ``kind`` is ``"forward"`` (fn(module, args, output)), ``"pre"`` (fn(module, args), may
    return new args) or ``"pre_kwargs"`` (fn(module, args, kwargs)).
    """

    module: nn.Module
    kind: str
    fn: Callable


def _install(hook: Hook, record: BlockRecord, owner_thread: int) -> RemovableHandle:
    # Hooks live on shared modules: a forward in another thread must not feed this call's records.
    def guarded(*args):
        if threading.get_ident() == owner_thread and not record.closed:
            return hook.fn(*args)
        return None

    if hook.kind == "forward":
        return hook.module.register_forward_hook(guarded)
    if hook.kind == "pre":
        return hook.module.register_forward_pre_hook(guarded)
    if hook.kind == "pre_kwargs":
        return hook.module.register_forward_pre_hook(guarded, with_kwargs=True)
    raise ValueError(f"Expected hook kind 'forward', 'pre' or 'pre_kwargs', got {hook.kind!r}.")


class ViTAdapter(ABC):
    """Base class of model-family adapters.

    Subclasses set ``family`` (a name for messages), ``examples`` (model names) and
    ``layer_example`` (how a user reaches one block's attention module), and implement
    :meth:`supports`, :meth:`attention_modules`, :attr:`num_prefix_tokens`,
    :meth:`grid_size` and :meth:`block_hooks`. They may override :meth:`block_layouts` (for
    models whose grid changes between blocks, or whose attention reads windows),
    :attr:`has_class_token`, :attr:`reads_class_token` and :attr:`head_queries` (for models
    without a [class] token or whose head pools the tokens), :meth:`latent_query_modules`
    (for attention-pool heads), :meth:`block_modules` (for blocks kept elsewhere than in a
    list of blocks), :attr:`in_channels`,
    :attr:`num_outputs` (for checks before the forward pass), :attr:`outputs_features` (for
    backbones without a classifier head), :meth:`grid_from_tokens` (for a grid known only from
    the token count) and :meth:`output_scores` (for models that return an output object rather
    than a tensor).
    """

    family: ClassVar[str] = ""
    examples: ClassVar[str] = ""
    layer_example: ClassVar[str] = "model.blocks[i].attn"
    #: Whether the flow's blocks have full attention matrices, every token a query with
    #: softmax weights over the tokens (attention rollouts, ``queries='all'``); False for
    #: class-attention blocks (CaiT, XCiT, VOLO) and factorised attention (CoaT).
    self_attention: ClassVar[bool] = True

    def __init__(self, model: Optional[nn.Module]) -> None:
        """``model``: the model explained, or None for an adapter given its modules directly."""
        self.model = model

    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter knows ``model``'s family."""

    @abstractmethod
    def attention_modules(self) -> List[nn.Module]:
        """The attention module of every block that has a [class] query, in forward order."""

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [class], distillation, register tokens."""

    @abstractmethod
    def grid_size(self, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """The patch grid (gh, gw) for images of ``image_size`` (H, W), checked before the
        forward pass; None when only the forward pass tells (see :meth:`grid_from_tokens`).
        For a model whose grid changes between blocks, the finest grid of its blocks: the
        grid of the flow.

        Raises:
            ValueError: when the model cannot take images of that size.
        """

    def block_layouts(
        self, attention_modules: Sequence[nn.Module], image_size: Tuple[int, int]
    ) -> List[BlockLayout]:
        """The grid and branch of each block of ``attention_modules`` (some or all of
        :meth:`attention_modules`, in block order) for images of ``image_size``, checked
        before the forward pass.

        The default is one branch whose blocks all read :meth:`grid_size`'s grid. Models
        that pool tokens between blocks (PiT, MViTv2) or run branches on two grids (CrossViT)
        override it.

        Raises:
            ValueError: when the model cannot take images of that size.
        """
        grid = self.grid_size(image_size)
        return [BlockLayout(grid) for _ in attention_modules]

    @property
    def has_class_token(self) -> bool:
        """Whether the first token is a [class] token, whose query rows the paper's DAAM
        explains (``queries='class'``). False for models without one (e.g. timm's
        ``class_token=False``, whose first tokens may be registers or patches)."""
        return True

    @property
    def reads_class_token(self) -> bool:
        """Whether the model's output is read from the [class] token (the head takes its
        last state), so that the [class] query rows explain the decision in full. False for
        a head that pools the tokens (e.g. timm's ``global_pool='avg'``) and for a model
        without a [class] token; DAAM then explains every query row by default
        (``queries='all'``)."""
        return self.has_class_token

    @property
    def head_queries(self) -> Optional[Union[Tuple[int, ...], "TokenRows"]]:
        """The tokens whose last state the model's head reads, as query rows: (0,) for a head
        on the [class] token, (0, 1) for DeiT's distilled head (the mean of its [class] and
        [dist] heads); a :class:`TokenRows` for a head that reads some tokens and all the
        patches (DINOv2's classifier: the [class] token and the mean of the patches, not the
        registers); None for a head that pools every token. DAAM's ``queries='head'``
        explains these rows in every block, and is the default where the head does not read
        the [class] token alone (``reads_class_token`` False)."""
        return (0,) if self.reads_class_token else None

    def latent_query_modules(self) -> List[nn.Module]:
        """The attention modules of the flow whose queries are no tokens: an attention-pool
        head's learned latent queries (timm's ``AttentionPoolLatent``), a class-attention
        block at the end of the flow. Every query row of theirs is explained, whatever
        ``queries``; attention rollouts leave them out (their attention is not square).
        The default is none."""
        return []

    def every_row_modules(self) -> List[nn.Module]:
        """The attention modules of the flow that DAAM explains from every query row whatever
        ``queries``: the latent-query modules (:meth:`latent_query_modules`), and blocks with
        no [class] query in a model that has one in later blocks (PVT v1's stages before its
        [class] token joins). The default is the latent-query modules."""
        return self.latent_query_modules()

    def block_modules(self, attention_modules: Sequence[nn.Module]) -> List[nn.Module]:
        """The block of each of ``attention_modules`` (some or all of
        :meth:`attention_modules`), in the same order: the module that takes the tokens
        entering the block and returns the tokens leaving it (LeGrad reads a score from each
        block's output).

        The default is the nearest module, from the attention module itself up, that is an
        element of an ``nn.ModuleList`` or ``nn.Sequential`` inside the model: timm's
        ``blocks[i]``, transformers' ``layers[i]`` (``encoder.layer[i]``), torchvision's
        ``encoder.layers[i]``, open_clip's ``transformer.resblocks[i]``. Families that keep
        their blocks otherwise override it.

        Raises:
            TypeError: for an adapter given no model, or an attention module that is in no
                such list inside the model.
        """
        if self.model is None:
            raise TypeError(
                f"Expected an adapter that knows its model, to find the blocks around its "
                f"attention modules, got a {type(self).__name__} given only the attention "
                f"modules. Use the adapter of the model's family (adapter_for(model))."
            )
        parents = {
            id(child): module for module in self.model.modules() for child in module.children()
        }
        blocks = []
        for index, attention in enumerate(attention_modules):
            module = attention
            while module is not None and not isinstance(
                parents.get(id(module)), (nn.ModuleList, nn.Sequential)
            ):
                module = parents.get(id(module))
            if module is None:
                raise TypeError(
                    f"Expected attention module {index} ({type(attention).__name__}) inside an "
                    f"element of an nn.ModuleList or nn.Sequential of {type(self.model).__name__}"
                    f" (its list of blocks), found none. Override block_modules in the "
                    f"{self.family} adapter."
                )
            blocks.append(module)
        return blocks

    def grid_from_tokens(self, num_patches: int) -> Tuple[int, int]:
        """The patch grid of a forward pass that left ``num_patches`` patch tokens, used when
        :meth:`grid_size` returned None. The default is the square grid.

        Raises:
            ValueError: when ``num_patches`` is not a square number.
        """
        grid = square_grid(num_patches)
        if grid is None:
            raise ValueError(
                f"The model produced {num_patches} patch tokens, which is not a square grid, and "
                f"the adapter was not told the grid. Give it as grid_size=(rows, columns)."
            )
        return grid

    def output_scores(self, output: Any) -> Tensor:
        """The (B, K) tensor of class scores or features in what the forward pass returned.

        The default takes a tensor as it is and, from an output object (transformers'
        ``ModelOutput``), ``logits``, else ``image_embeds``, else ``pooler_output``, else the
        [class] token of ``last_hidden_state`` (:mod:`captum_daam._outputs`); adapters of
        models whose pooler is no part of their design override this.
        """
        scores = scores_in_output(output)
        return output if scores is None else scores

    @property
    def in_channels(self) -> Optional[int]:
        """Image channels the model expects, or None when unknown."""
        return None

    @property
    def num_outputs(self) -> Optional[int]:
        """Width of the model's output (classes), or None when unknown."""
        return None

    @property
    def image_dtype(self) -> Optional[torch.dtype]:
        """The floating dtype the model needs its images in, checked before the forward pass.

        The default is the one dtype of the model's floating parameters; None, and no check,
        when there is no model, when its parameters have several dtypes, or (in an override)
        when the model converts its images itself.
        """
        if self.model is None:
            return None
        dtypes = {parameter.dtype for parameter in self.model.parameters()
                  if parameter.is_floating_point()}
        return dtypes.pop() if len(dtypes) == 1 else None

    @property
    def outputs_features(self) -> bool:
        """Whether the model is a backbone without a classifier head, whose output is
        features rather than class scores (so that no class is predicted)."""
        return False

    def model_hooks(self) -> List[Hook]:
        """Hooks on the model itself, installed with every :meth:`record` whatever blocks it
        records: input conversions the explained forward pass needs (ViT-MAE's patch order,
        SigLIP 2's images as patches). They receive no record. The default is none."""
        return []

    @abstractmethod
    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        """The hooks that fill ``record`` when ``attention`` runs.

        Together they must call ``record.set_attention(...)`` once, and hand the tensor given
        by ``record.watch(...)`` on to the forward pass in place of the pre-projection output
        (or of a tensor from which its gradient follows).
        """

    @contextmanager
    def record(
        self,
        attention_modules: Sequence[nn.Module],
        on_gradient: Optional[Callable[[BlockRecord], None]] = None,
        full: Union[bool, Sequence[bool]] = False,
        on_attention: Optional[Callable[[BlockRecord], None]] = None,
    ) -> Iterator[List[BlockRecord]]:
        """Hooks on ``attention_modules`` for the duration of the block; always removed.

        ``on_gradient`` and ``on_attention`` are given to every record, ``full`` to every
        record or, as a sequence, one per module (see :class:`BlockRecord`).
        """
        fulls = [full] * len(attention_modules) if isinstance(full, bool) else list(full)
        records = [BlockRecord(on_gradient, each, on_attention) for each in fulls]
        owner_thread = threading.get_ident()
        handles: List[RemovableHandle] = []
        try:
            for hook in self.model_hooks():  # guarded by the thread only: never closed
                handles.append(_install(hook, BlockRecord(), owner_thread))
            for attention, block_record in zip(attention_modules, records):
                for hook in self.block_hooks(attention, block_record):
                    handles.append(_install(hook, block_record, owner_thread))
            yield records
        finally:
            for handle in handles:
                handle.remove()
            for block_record in records:
                # The anchor's gradient hook holds the record. Left in place, the cycle
                # record -> anchor -> autograd graph -> hook -> record runs through C++ that
                # Python's garbage collector cannot see, and every call would leak its graph.
                block_record.anchor = None


def square_grid(num_patches: int) -> Optional[Tuple[int, int]]:
    """(side, side) when ``num_patches`` patch tokens fill a square grid, else None."""
    side = math.isqrt(num_patches) if num_patches > 0 else 0
    return (side, side) if side > 0 and side * side == num_patches else None


def output_grid(grid: Tuple[int, int], layer: nn.Module) -> Tuple[int, int]:
    """The (rows, columns) a ``Conv2d``, ``MaxPool2d`` or ``AvgPool2d`` makes of a ``grid``
    input, as torch computes it (padding given as numbers; ``ceil_mode`` of the poolings)."""
    kernel, stride = to_2tuple(layer.kernel_size), to_2tuple(layer.stride or layer.kernel_size)
    padding = to_2tuple(layer.padding)
    dilation = to_2tuple(getattr(layer, "dilation", 1))
    ceil_mode = getattr(layer, "ceil_mode", False)
    sizes = []
    for axis, size in enumerate(grid):
        span = size + 2 * padding[axis] - dilation[axis] * (kernel[axis] - 1) - 1
        steps = -(-span // stride[axis]) if ceil_mode else span // stride[axis]
        if ceil_mode and steps * stride[axis] >= size + padding[axis]:
            steps -= 1  # torch's rule: the last window must start inside the input or left pad
        sizes.append(steps + 1)
    return tuple(sizes)


def check_grid_size(grid_size: Any) -> Tuple[int, int]:
    """A user's ``grid_size=`` as (rows, columns), two positive ints, or a ValueError."""
    grid = tuple(grid_size) if isinstance(grid_size, (tuple, list, torch.Size)) else ()
    if len(grid) != 2 or not all(
        isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in grid
    ):
        raise ValueError(
            f"Expected grid_size to be (rows, columns), two positive ints, got {grid_size!r}."
        )
    return grid


_ADAPTERS: List[Type[ViTAdapter]] = []


def register_adapter(adapter_class: Type[ViTAdapter]) -> Type[ViTAdapter]:
    """Class decorator: make ``adapter_class`` one of the families :func:`adapter_for` knows.

    Adapters registered later are asked first, so a more specific family can be added after
    a general one.
    """
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, ViTAdapter)):
        raise TypeError(f"Expected a subclass of ViTAdapter, got {adapter_class!r}.")
    if adapter_class not in _ADAPTERS:
        _ADAPTERS.insert(0, adapter_class)
    return adapter_class


def supported_families() -> List[str]:
    """Human-readable names of the registered families, with example models."""
    return [f"{cls.family} ({cls.examples})" if cls.examples else cls.family for cls in _ADAPTERS]


def adapter_for(model: nn.Module) -> ViTAdapter:
    """The adapter of ``model``'s family, or of the one model of a known family inside it.

    ``model`` may be a wrapper or a container: ``nn.DataParallel``, ``DistributedDataParallel``,
    ``torch.compile``'s module, or e.g. ``nn.Sequential(normalize, vit)``. The adapter is that
    of the known model nearest the top of the module tree (:func:`explained_model`).

    Raises:
        TypeError: when no registered adapter supports the model or any module inside it,
            when several modules inside it are supported models (pass the one to explain),
            or when the model is a TorchScript (``torch.jit``) module.
    """
    inner = explained_model(model)
    return _adapter_class(inner)(inner)


def _adapter_class(model: nn.Module) -> Optional[Type[ViTAdapter]]:
    for adapter_class in _ADAPTERS:
        if adapter_class.supports(model):
            return adapter_class
    return None


def explained_model(model: nn.Module) -> nn.Module:
    """The model a registered adapter knows: ``model`` itself, or the one module inside it that
    is such a model and is not inside another one (one search over the module tree serves every
    wrapper and container).

    Raises:
        TypeError: as :func:`adapter_for`.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise _jit_error(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, got {type(model).__name__}.")
    if _adapter_class(model) is not None:
        return model
    if _video_or_detection(model, inside=False) is not None:
        # A detector or video model holding a ViT encoder (OWL-ViT, DETR's backbones) is
        # refused as such, not explained through the encoder with a forward pass DAAM
        # cannot score.
        raise TypeError(_refusal(model))
    found: List[Tuple[str, nn.Module]] = []
    scripted: List[str] = []
    pending = list(model.named_children())
    while pending:
        name, module = pending.pop(0)
        if any(module is seen for _, seen in found):
            continue
        if isinstance(module, torch.jit.ScriptModule):
            scripted.append(name)
        elif _adapter_class(module) is not None:
            found.append((name, module))
        else:
            pending += [(f"{name}.{child}", sub) for child, sub in module.named_children()]
    if len(found) == 1:
        return found[0][1]
    if len(found) > 1:
        names = ", ".join(f"{name!r} ({type(module).__name__})" for name, module in found)
        first = f"model.get_submodule({found[0][0]!r})"
        raise TypeError(
            f"Expected one Vision Transformer inside the {type(model).__name__} given, found "
            f"{len(found)}: {names}. Pass the one to explain, e.g. DAAM({first}), or keep "
            f"the whole forward pass and name the model it explains: "
            f"DAAM(model, adapter=adapter_for({first}))."
        )
    if scripted:
        raise _jit_error(model)
    raise TypeError(_refusal(model))


def _refusal(model: nn.Module) -> str:
    """Why no adapter takes ``model``, in three lines: the reason, the nearest route, and
    where the supported families are listed."""
    name = type(model).__name__
    kind = _video_or_detection(model)
    # An image-text model's text tower has attention of its own: the image tower's counts.
    tower = getattr(model, "visual", None) or getattr(model, "vision_model", None)
    attention_types = _attention_module_types(tower if isinstance(tower, nn.Module) else model)
    if kind is None and name.endswith("Backbone"):
        reason = (
            "It is the backbone of a dense-prediction model: it returns feature maps for a "
            "detection or segmentation head, not one (B, K) score per image."
        )
        route = (
            "Nearest route: explain the family's classifier or bare model (e.g. SwinModel, "
            "Dinov2Model for Dinov2Backbone), whose pooled output is one score per image."
        )
    elif kind is not None:
        what, model_type = kind
        shown = f"model_type {model_type!r}" if model_type else name
        if what == "video":
            reason = (
                f"It is a video model ({shown}): its tokens are space-time patches of a clip, "
                f"not the patch grid of one image that DAAM explains."
            )
            route = (
                "Nearest route: explain the frames one at a time with an image model, "
                "e.g. DAAM(image_vit).attribute(frame)."
            )
        else:
            reason = (
                f"It is a detection model ({shown}): it outputs boxes and per-query class "
                f"scores, not one (B, K) score per image."
            )
            route = (
                "Nearest route: explain an image classifier, or pass a forward function that "
                "returns one (B, K) score per image with adapter= a subclass of "
                "captum_daam.adapters.ViTAdapter for its encoder."
            )
    elif attention_types and all(type_ in _CHANNEL_ATTENTION for type_ in attention_types):
        reason = (
            "Its attention modules mix no tokens ("
            + "; ".join(f"{type_}: {_CHANNEL_ATTENTION[type_]}" for type_ in attention_types)
            + "): in DAAM's terms a convolutional model, with no token mixing to split over "
            "the patches."
        )
        route = "Nearest route: Captum's LayerGradCam, as for any convolutional model."
    elif attention_types:
        reason = f"Its attention modules ({', '.join(attention_types)}) are of no supported family."
        if _timm_style_attention(model):
            route = (
                "Nearest route: for its timm-style attention (a qkv and a proj linear layer) "
                "pass adapter=captum_daam.adapters.GenericAdapter(attention_modules=[...], "
                "num_prefix_tokens=1, head_queries='class') to DAAM."
            )
        else:
            route = (
                "Nearest route: subclass captum_daam.adapters.ViTAdapter for this attention "
                "and register it with @captum_daam.adapters.register_adapter (GenericAdapter "
                "takes timm-style attention only: a qkv and a proj linear layer)."
            )
    else:
        reason = (
            "It has no attention module (no module named for attention, no "
            "nn.MultiheadAttention): a convolutional or MLP model, whose decision DAAM, an "
            "explanation of attention, does not follow."
        )
        route = _NO_ATTENTION_ROUTE
    return (
        f"DAAM has no adapter for a model of type {name}. {reason}\n{route}\n"
        f"The supported families are listed by `captum-daam check --list` "
        f"(captum_daam.adapters.supported_families())."
    )


_NO_ATTENTION_ROUTE = (
    "Nearest route: Captum's LayerGradCam for a convolutional model; if it does mix tokens "
    "with attention, subclass captum_daam.adapters.ViTAdapter and register it with "
    "@captum_daam.adapters.register_adapter."
)

#: What marks a transformers video or detection model: words in its config.model_type, or
#: in the name of its class (VideoMAE, TimeSformer, ViViT, V-JEPA 2; DETR's family, YOLOS).
_VIDEO_TYPES = ("video", "timesformer", "vivit", "vjepa")
_VIDEO_CLASSES = ("Video", "Timesformer", "TimeSformer", "Vivit", "ViViT", "VJEPA")
_DETECTION_TYPES = ("detr", "yolos")
_DETECTION_CLASSES = ("Detr", "DETR", "Yolos", "YOLOS", "ObjectDetection")


def _video_or_detection(
    model: nn.Module, inside: bool = True
) -> Optional[Tuple[str, Optional[str]]]:
    """("video" or "detection", its config.model_type) for a transformers video or detection
    model, or (``inside``) one inside ``model``, read from names only (transformers is not
    imported)."""
    for module in model.modules() if inside else [model]:
        config = getattr(module, "config", None)
        if module is not model and config is None:
            continue
        model_type = getattr(config, "model_type", None)
        model_type = model_type if isinstance(model_type, str) else None
        words, name = (model_type or "").lower(), type(module).__name__
        if any(word in words for word in _VIDEO_TYPES) or any(
            word in name for word in _VIDEO_CLASSES
        ):
            return "video", model_type
        if any(word in words for word in _DETECTION_TYPES) or any(
            word in name for word in _DETECTION_CLASSES
        ):
            return "detection", model_type
    return None


def _timm_style_attention(model: nn.Module) -> bool:
    """Whether ``model`` has attention modules that GenericAdapter takes (timm-style)."""
    from .generic import _check_timm_style  # generic.py builds on this module

    for module in model.modules():
        try:
            _check_timm_style(0, module)
        except TypeError:
            continue
        return True
    return False


#: Modules named for attention that weigh channels or kernel branches and mix no tokens.
_CHANNEL_ATTENTION = {
    "SplitAttn": "ResNeSt's split attention weighs channel groups from pooled features",
    "SelectiveKernelAttn": "SKNet's selective kernels weigh convolution branches per channel",
    "CrossCovarianceAttn": "EdgeNeXt's cross-covariance attention mixes channels",
}


def _attention_module_types(model: nn.Module) -> List[str]:
    """The class names of the modules in ``model`` that are attention by their name (e.g.
    ``WindowAttention``, ``BottleneckAttn``) or by their type (``nn.MultiheadAttention``)."""
    names = {
        type(module).__name__
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        or any(word in type(module).__name__.lower() for word in ("attention", "attn"))
    }
    return sorted(names)


def _jit_error(model: nn.Module) -> TypeError:
    return TypeError(
        f"TorchScript (torch.jit) models are not supported, got a {type(model).__name__}: DAAM "
        f"hooks into the attention modules, which a scripted or traced model does not run as "
        f"Python modules. Pass the original nn.Module, before torch.jit.script or trace."
    )


def forward_module(model: nn.Module) -> nn.Module:
    """The module whose forward pass is explained: ``model`` without the wrappers that only
    distribute or compile it (DataParallel, DistributedDataParallel, ``torch.compile``).

    Their forward computes what the model inside computes; running that model directly keeps
    the hooks in this thread (DataParallel runs replicas in others), leaves
    DistributedDataParallel's gradient reducer untouched (DAAM's backward pass computes no
    weight gradient for it to reduce) and needs no recompilation for the hooks.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(
            model
        ).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model
