"""Pure tensor math of DAAM: no modules, no hooks.

Shapes use B (batch), H (heads), N (tokens), d (head width), C = H * d (channels),
L (blocks in the flow) and (gh, gw) (the patch grid).
"""

from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "class_attention_row",
    "factorized_class_coefficients",
    "attention_probabilities",
    "Mixing",
    "DeferredMixing",
    "SoftmaxAttention",
    "query_rows",
    "class_token_contributions",
    "block_map",
    "all_queries_block_map",
    "tokens_to_grid",
    "place_on_grid",
    "resample_to_grid",
    "accumulate",
    "paper_display_mapping",
    "shared_linear_scaling",
    "per_map_scaling",
    "scale_flow",
]


def class_attention_row(
    class_query: Tensor, keys: Tensor, scale: float, bias_row: Optional[Tensor] = None
) -> Tensor:
    """Attention probabilities of the [class] query over all tokens.

    Args:
        class_query: (B, H, d) the [class] token's query, after any query norm.
        keys: (B, H, N, d) all keys, after any key norm.
        scale: the factor applied to the logits (usually d ** -0.5).
        bias_row: optional additive logit bias for the [class] query, broadcastable
            to (B, H, N) (a mask row, a relative position bias row, ...).

    Returns:
        (B, H, N) softmax(q_cls k^T * scale + bias_row), computed in float32 at least.
    """
    compute_dtype = torch.promote_types(keys.dtype, torch.float32)
    # An elementwise product and sum: faster than a batched matmul for a single query row.
    logits = (keys.to(compute_dtype) * class_query.to(compute_dtype).unsqueeze(2)).sum(-1)
    logits = logits * scale
    if bias_row is not None:
        logits = logits + bias_row.to(compute_dtype)
    return logits.softmax(dim=-1)


def factorized_class_coefficients(class_query: Tensor, keys: Tensor, scale: float) -> Tensor:
    """The coefficients of the [class] row of factorised attention over the tokens.

    Args:
        class_query: (B, H, d) the [class] token's query.
        keys: (B, H, N, d) all keys.
        scale: the factor of the factorised attention (head width ** -0.5).

    Returns:
        (B, H, N) a[b, h, n] = scale * <q_cls[b, h], softmax_n(k)[b, h, n]>, the softmax taken
        over the tokens for each channel, in float32 at least.
    """
    compute_dtype = torch.promote_types(keys.dtype, torch.float32)
    token_softmax = keys.to(compute_dtype).softmax(dim=2)
    return (token_softmax * class_query.to(compute_dtype).unsqueeze(2)).sum(-1) * scale


def attention_probabilities(
    queries: Tensor, keys: Tensor, scale: float, bias: Optional[Tensor] = None
) -> Tensor:
    """Full attention probabilities, softmax(q k^T * scale + bias), in float32 at least.

    Args:
        queries: (B, H, N, d) all queries, after any query norm or rotation.
        keys: (B, H, N, d) all keys, likewise.
        scale: the factor applied to the logits.
        bias: optional additive logit bias broadcastable to (B, H, N, N).

    Returns:
        (B, H, N, N), rows summing to one.
    """
    compute_dtype = torch.promote_types(keys.dtype, torch.float32)
    logits = queries.to(compute_dtype) @ keys.to(compute_dtype).transpose(-2, -1) * scale
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return logits.softmax(dim=-1)


class Mixing(ABC):
    """A block's token mixing held as its factors rather than as a matrix: per head h, the
    (Nq, N) weights with which each query row's output sums the N tokens' values.

    Calling the object gives the full (B, H, Nq, N) matrix, so it stands wherever a function
    forming the full attention is expected (attention rollouts, checks); DAAM needs only
    :meth:`transposed_mix`, which a subclass computes without forming the whole matrix where
    it can.
    """

    @property
    @abstractmethod
    def num_queries(self) -> int:
        """Nq, the query rows."""

    @abstractmethod
    def __call__(self) -> Tensor:
        """The full (B, H, Nq, N) mixing weights, in float32 at least."""

    @abstractmethod
    def transposed_mix(self, weights: Tensor) -> Tensor:
        """A^T w per head: (B, H, Nq, e) weights of the query rows -> (B, H, N, e), in
        float32 at least."""

    def query_rows(self, rows: Sequence[int]) -> "Mixing":
        """The mixing of the query rows ``rows`` only."""
        return _QueryRows(self, rows)


class _QueryRows(Mixing):
    """Some query rows of a mixing: the other rows weighted by zero."""

    def __init__(self, mixing: Mixing, rows: Sequence[int]) -> None:
        self.mixing, self.rows = mixing, list(rows)

    @property
    def num_queries(self) -> int:
        return len(self.rows)

    def __call__(self) -> Tensor:
        return self.mixing()[:, :, self.rows]

    def transposed_mix(self, weights: Tensor) -> Tensor:
        every_row = weights.new_zeros(
            (*weights.shape[:-2], self.mixing.num_queries, weights.shape[-1])
        )
        every_row[..., self.rows, :] = weights
        return self.mixing.transposed_mix(every_row)


class DeferredMixing(Mixing):
    """A mixing formed only when first used, by ``make`` (e.g. one whose queries must first
    be rotated or projected), so that nothing is computed or kept for it in the forward pass
    beyond what ``make`` captures."""

    def __init__(self, make: Callable[[], Mixing]) -> None:
        self.make, self._mixing = make, None

    def _formed(self) -> Mixing:
        if self._mixing is None:
            with torch.no_grad():
                self._mixing = self.make()
        return self._mixing

    @property
    def num_queries(self) -> int:
        return self._formed().num_queries

    def __call__(self) -> Tensor:
        return self._formed()()

    def transposed_mix(self, weights: Tensor) -> Tensor:
        return self._formed().transposed_mix(weights)

    def query_rows(self, rows: Sequence[int]) -> Mixing:
        return self._formed().query_rows(rows)


class SoftmaxAttention(Mixing):
    """Softmax attention held as its factors: the probabilities are formed only when called,
    and :meth:`transposed_mix` gives A^T w a chunk of query rows at a time.

    Calling the object gives the full (B, H, Nq, N) probabilities, as
    :func:`attention_probabilities` does.

    Args:
        queries: (B, H, Nq, d) the queries, after any query norm or rotation.
        keys: (B, H, N, d) the keys, likewise.
        scale: the factor applied to the logits.
        bias: optional additive logit bias broadcastable to (B, H, Nq, N).
    """

    #: Elements of one chunk of probabilities (6 MiB of float32), so that a chunk formed by
    #: one matrix product is still in cache when the next product reads it.
    chunk_elements: int = 3 << 19

    def __init__(
        self, queries: Tensor, keys: Tensor, scale: float, bias: Optional[Tensor] = None
    ) -> None:
        self.queries, self.keys, self.scale, self.bias = queries, keys, scale, bias

    @property
    def num_queries(self) -> int:
        return self.queries.shape[-2]

    def __call__(self) -> Tensor:
        with torch.no_grad():
            return attention_probabilities(self.queries, self.keys, self.scale, self.bias)

    def query_rows(self, rows: Sequence[int]) -> "SoftmaxAttention":
        """The attention of the query rows ``rows`` only."""
        rows = list(rows)
        bias = self.bias
        if bias is not None and bias.dim() >= 2 and bias.shape[-2] != 1:
            bias = bias[..., rows, :]
        return SoftmaxAttention(self.queries[:, :, rows], self.keys, self.scale, bias)

    def transposed_mix(self, weights: Tensor) -> Tensor:
        """A^T w per head: (B, H, Nq, e) weights of the query rows -> (B, H, N, e), in
        float32 at least.

        The rows are taken a chunk at a time (logits, softmax, product), so the full
        (B, H, Nq, N) probabilities never exist; each chunk's softmax is over all keys, so
        the result equals ``attention().transpose(-2, -1) @ weights``.
        """
        with torch.no_grad():
            return self._transposed_mix(weights)

    def _transposed_mix(self, weights: Tensor) -> Tensor:
        compute_dtype = torch.promote_types(self.keys.dtype, torch.float32)
        *leading, rows, _ = self.queries.shape
        tokens, width = self.keys.shape[-2], weights.shape[-1]
        # Heads of all examples as one batch of matrices, for bmm and baddbmm.
        queries = self.queries.to(compute_dtype) * self.scale
        queries = queries.reshape(-1, *queries.shape[-2:])
        keys_t = self.keys.to(compute_dtype).reshape(-1, tokens, self.keys.shape[-1]).mT
        weights_t = weights.to(compute_dtype).reshape(-1, rows, width).mT  # (B * H, e, Nq)
        bias = self.bias
        row_bias = bias is not None and bias.dim() >= 2 and bias.shape[-2] != 1
        step = max(1, self.chunk_elements // max(1, queries.shape[0] * tokens))
        mixed = queries.new_zeros(queries.shape[0], width, tokens)
        for start in range(0, rows, step):
            logits = torch.bmm(queries[:, start:start + step], keys_t)
            if bias is not None:
                chunk_bias = bias[..., start:start + step, :] if row_bias else bias
                logits.view(*leading, -1, tokens).add_(chunk_bias.to(compute_dtype))
            mixed.baddbmm_(weights_t[..., start:start + step], logits.softmax(dim=-1))
        return mixed.view(*leading, width, tokens).transpose(-2, -1)


def query_rows(attention: Union[Tensor, Mixing], rows: Sequence[int]) -> Union[Tensor, Mixing]:
    """The mixing of the query rows ``rows`` only, of a (B, H, Nq, N) matrix or a
    :class:`Mixing`."""
    if isinstance(attention, Mixing):
        return attention.query_rows(rows)
    return attention[:, :, list(rows)]


def class_token_contributions(class_attention: Tensor, values: Tensor) -> Tensor:
    """The decomposition module: the [class] attention output split over source tokens.

    F[b, n, (h, e)] = A[b, h, 0, n] * v[b, h, n, e]. Summing over n gives the [class] row
    of the attention output before the output projection.

    Args:
        class_attention: (B, H, N) the [class] attention row.
        values: (B, H, N, d) the values.

    Returns:
        (B, N, C) per-token contributions, channels ordered head by head (h, e) as in the
        usual ``transpose(1, 2).reshape(B, N, C)`` of multi-head attention.
    """
    batch, heads, tokens, width = values.shape
    contributions = class_attention.unsqueeze(-1) * values
    return contributions.transpose(1, 2).reshape(batch, tokens, heads * width)


def block_map(
    class_attention: Tensor, values: Tensor, class_gradient: Tensor, relu_gradients: bool = True
) -> Tensor:
    """One block's DAAM map over all tokens, without forming the (B, N, C) contributions.

    cam[b, n] = relu( sum_h A[b, h, n] * <v[b, h, n, :], w[b, h, :]> ) with w = relu(g) for
    supervised models (``relu_gradients=True``) and w = g otherwise.

    Args:
        class_attention: (B, H, N) the [class] attention row.
        values: (B, H, N, d) the values.
        class_gradient: (B, C) gradient of the objective with respect to the [class] row of
            the attention output before the output projection.
        relu_gradients: keep only positive channel weights, as for supervised models.

    Returns:
        (B, N) non-negative map over all tokens (prefix tokens included).
    """
    batch, heads, tokens, width = values.shape
    weights = class_gradient.relu() if relu_gradients else class_gradient
    weights = weights.reshape(batch, heads, width).to(values.dtype)
    per_token = (values * weights.unsqueeze(2)).sum(-1)
    return (class_attention.to(per_token.dtype) * per_token).sum(dim=1).relu()


def all_queries_block_map(
    attention: Union[Tensor, Mixing],
    values: Tensor,
    gradient: Tensor,
    relu_gradients: bool = True,
) -> Tensor:
    """One block's map over all tokens from every query row, each weighted by its own gradient,
    for models whose head pools the tokens rather than reading the [class] token.

    cam[b, n] = relu( sum_h sum_i A[b, h, i, n] * <v[b, h, n, :], w[b, h, i, :]> ) with w the
    gradient at query row i of the attention output before the output projection, relu'd for
    supervised models (``relu_gradients=True``). Query i's output is sum_n A[h, i, n] v[h, n]:
    the map splits every row of the attention output over the tokens it reads, as the [class]
    row is split in :func:`block_map`, and sums the rows. Computed as A^T w per head, so the
    (B, N, N, C) contributions are never formed.

    Args:
        attention: (B, H, Nq, N) the attention probabilities (Nq queries over N tokens), or
            a :class:`Mixing` giving them (e.g. :class:`SoftmaxAttention`, whose A^T w is
            formed chunk by chunk).
        values: (B, H, N, d) the values.
        gradient: (B, Nq, C) gradient of the objective with respect to the attention output
            before the output projection, every query row.
        relu_gradients: keep only positive channel weights, as for supervised models.

    Returns:
        (B, N) non-negative map over all tokens (prefix tokens included).
    """
    batch, heads, tokens, width = values.shape
    weights = gradient.relu() if relu_gradients else gradient
    weights = weights.unflatten(-1, (heads, width)).transpose(1, 2)
    if isinstance(attention, Mixing):
        reaching = attention.transposed_mix(weights)  # (B, H, N, d)
    else:
        compute_dtype = torch.promote_types(attention.dtype, torch.float32)
        reaching = attention.to(compute_dtype).transpose(-2, -1) @ weights.to(compute_dtype)
    return (values.to(reaching.dtype) * reaching).sum(-1).sum(dim=1).relu()


def tokens_to_grid(
    token_maps: Tensor, num_prefix_tokens: int, grid_size: Tuple[int, int]
) -> Tensor:
    """Drop the prefix tokens ([class], distillation, registers) and lay patches on the grid.

    Args:
        token_maps: (..., N) maps over all tokens.
        num_prefix_tokens: how many leading tokens are not patches.
        grid_size: (gh, gw) with gh * gw == N - num_prefix_tokens.

    Returns:
        (..., gh, gw)
    """
    patches = token_maps[..., num_prefix_tokens:]
    gh, gw = grid_size
    if patches.shape[-1] != gh * gw:
        raise ValueError(
            f"Expected {gh} x {gw} = {gh * gw} patch tokens after {num_prefix_tokens} prefix "
            f"tokens, got {patches.shape[-1]}."
        )
    return patches.reshape(*patches.shape[:-1], gh, gw)


def place_on_grid(token_maps: Tensor, positions: Tensor, grid_size: Tuple[int, int]) -> Tensor:
    """Lay maps over the tokens of an attention call on the patch grid, token by token.

    A module may read its tokens in another order than the grid's, or in windows: Swin's
    windows (after a cyclic shift, with padding) come as a batch of B * W windows of N tokens
    each. ``positions`` says where each token lies; tokens that are no patch (prefix tokens,
    window padding) are dropped. A token made from several patches (NextViT's keys, each the
    average of a run of tokens) lies on several cells and shares its value equally among them.

    Args:
        token_maps: (B * W, N) maps over the tokens of each of the W windows of every
            example, windows of one example consecutive (one window: W = 1).
        positions: (W, N) long, the grid cell (row-major index below gh * gw) of each token
            of each window, or -1 for a token that is no patch; or (W, N, S), the S cells
            each token covers (-1 for none), its value shared equally among those it has.
        grid_size: (gh, gw).

    Returns:
        (B, gh, gw), each cell the sum of the tokens (or tokens' shares) placed on it.
    """
    windows, tokens = positions.shape[:2]
    if token_maps.dim() != 2 or token_maps.shape[1] != tokens or token_maps.shape[0] % windows:
        raise ValueError(
            f"Expected maps over {tokens} tokens in a multiple of {windows} windows, got "
            f"shape {tuple(token_maps.shape)}."
        )
    rows, columns = grid_size
    flat_maps = token_maps.reshape(token_maps.shape[0] // windows, windows * tokens)
    positions = positions.to(token_maps.device)
    if positions.dim() == 3:  # each token's value shared among the cells it covers
        covered = positions >= 0
        shares = covered / covered.sum(-1, keepdim=True).clamp(min=1)  # (W, N, S)
        flat_maps = (flat_maps.unsqueeze(-1) * shares.reshape(1, windows * tokens, -1).to(
            flat_maps.dtype)).flatten(1)
    flat_positions = positions.reshape(-1)
    patches = flat_positions >= 0
    grid = token_maps.new_zeros(flat_maps.shape[0], rows * columns)
    grid.index_add_(1, flat_positions[patches], flat_maps[:, patches])
    return grid.reshape(-1, rows, columns)


def resample_to_grid(maps: Tensor, grid_size: Tuple[int, int]) -> Tensor:
    """Bring maps to another grid covering the same image, keeping each map's sum.

    Every cell's value is shared among the cells of the new grid it overlaps, in proportion to
    the overlap (area-weighted resampling): a coarse cell over four fine cells gives each a
    quarter of its value. Block maps are contributions of tokens, so a map keeps its total
    contribution on any grid, and maps read from grids of different fineness (a model that
    pools tokens between blocks) add up cell by cell.

    Args:
        maps: (..., h, w) maps on an h x w grid.
        grid_size: (gh, gw) the grid to bring them to.

    Returns:
        (..., gh, gw), in the dtype of ``maps``; ``maps`` itself when the grids are equal.
    """
    rows, columns = grid_size
    if tuple(maps.shape[-2:]) == (rows, columns):
        return maps
    row_shares = _overlap_shares(rows, maps.shape[-2], maps.dtype, maps.device)
    column_shares = _overlap_shares(columns, maps.shape[-1], maps.dtype, maps.device)
    return row_shares @ maps @ column_shares.transpose(0, 1)


def _overlap_shares(new: int, old: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(new, old) share of each old cell that falls in each new cell, along one axis of unit
    length (columns sum to one). Cell edges are counted in units of 1 / (new * old), so the
    overlaps are exact integers."""
    new_edges = torch.arange(new + 1, dtype=torch.float64, device=device) * old
    old_edges = torch.arange(old + 1, dtype=torch.float64, device=device) * new
    low = torch.maximum(new_edges[:-1, None], old_edges[None, :-1])
    high = torch.minimum(new_edges[1:, None], old_edges[None, 1:])
    return ((high - low).clamp(min=0) / new).to(dtype)


def accumulate(block_maps: Tensor, dim: int = 1) -> Tensor:
    """The dynamic flow: D_l = cam_1 + ... + cam_l along ``dim`` (the block axis)."""
    return block_maps.cumsum(dim=dim)


def _min_max(maps: Tensor, start_dim: int) -> Tensor:
    flat = maps.flatten(start_dim)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    span = (high - low).clamp_min(torch.finfo(flat.dtype).tiny)
    return ((flat - low) / span).reshape(maps.shape)


def paper_display_mapping(flow: Tensor, steepness: float = 5.0) -> Tensor:
    """The display mapping of the DAAM paper's figures (a visualisation, not the attribution).

    Every map D_l is divided by the global maximum of the last map D_L of its example, passed
    through sigmoid(steepness * x) - 0.5, and each map is then min-max scaled to [0, 1].

    Args:
        flow: (B, L, gh, gw) accumulated maps D_1..D_L (raw attributions).
        steepness: the factor inside the sigmoid; the paper uses 5.

    Returns:
        (B, L, gh, gw) in [0, 1]; multiply by 255 for 8-bit images.
    """
    _check_flow(flow)
    last_max = flow[:, -1].flatten(1).amax(dim=1).clamp_min(torch.finfo(flow.dtype).tiny)
    relative = flow / last_max.reshape(-1, 1, 1, 1)
    squashed = torch.sigmoid(steepness * relative) - 0.5
    return _min_max(squashed, start_dim=2)


def shared_linear_scaling(flow: Tensor) -> Tensor:
    """Scale every map of an example linearly by one range: the min and max over its whole flow."""
    _check_flow(flow)
    return _min_max(flow, start_dim=1)


def per_map_scaling(flow: Tensor) -> Tensor:
    """Min-max scale each map of the flow to [0, 1] on its own."""
    _check_flow(flow)
    return _min_max(flow, start_dim=2)


_SCALINGS = {
    "paper": paper_display_mapping,
    "shared": shared_linear_scaling,
    "per_map": per_map_scaling,
}


def scale_flow(flow: Tensor, scaling: str = "paper") -> Tensor:
    """Apply one of the display scalings by name: ``"paper"``, ``"shared"`` or ``"per_map"``."""
    if scaling not in _SCALINGS:
        raise ValueError(f"Expected scaling to be one of {sorted(_SCALINGS)}, got {scaling!r}.")
    return _SCALINGS[scaling](flow)


def _check_flow(flow: Tensor) -> None:
    if flow.dim() != 4:
        raise ValueError(f"Expected a flow shaped (B, L, gh, gw), got shape {tuple(flow.shape)}.")
