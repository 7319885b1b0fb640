"""The pure tensor math on hand-made tensors, against numbers worked out by hand."""

import math

import pytest
import torch

from captum_daam.decompose import (
    DeferredMixing,
    SoftmaxAttention,
    accumulate,
    block_map,
    class_attention_row,
    class_token_contributions,
    paper_display_mapping,
    per_map_scaling,
    place_on_grid,
    query_rows,
    scale_flow,
    resample_to_grid,
    shared_linear_scaling,
    tokens_to_grid,
)


def test_class_attention_row_is_the_softmax_of_the_class_query_logits():
    query = torch.tensor([[[1.0, 0.0]]])  # (B=1, H=1, d=2)
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]]])  # (1, 1, N=3, 2)
    row = class_attention_row(query, keys, scale=0.5)
    logits = torch.tensor([0.5, 0.0, 1.0])
    expected = logits.exp() / logits.exp().sum()
    assert torch.allclose(row[0, 0], expected, atol=1e-7)
    masked = class_attention_row(query, keys, 0.5, bias_row=torch.tensor([0.0, float("-inf"), 0.0]))
    expected_masked = torch.tensor([math.exp(0.5), 0.0, math.exp(1.0)])
    assert torch.allclose(masked[0, 0], expected_masked / expected_masked.sum(), atol=1e-7)


def test_contributions_order_channels_head_by_head():
    attention = torch.tensor([[[0.5, 0.25], [1.0, 0.0]]])  # (B=1, H=2, N=2)
    values = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])  # (1, 2, 2, 2)
    contributions = class_token_contributions(attention, values)
    expected = torch.tensor([[[0.5, 1.0, 5.0, 6.0], [0.75, 1.0, 0.0, 0.0]]])
    assert torch.equal(contributions, expected)
    # summing over tokens gives the [class] row of A @ v, heads concatenated
    assert torch.equal(contributions.sum(1), torch.tensor([[1.25, 2.0, 5.0, 6.0]]))


def test_block_map_relu_on_gradients_and_on_the_map():
    attention = torch.tensor([[[0.5, 0.25], [1.0, 0.0]]])
    values = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    gradient = torch.tensor([[1.0, -1.0, -2.0, 0.5]])
    # token 0: 0.5*1 (channel 1 dropped by relu) + 1.0*(6*0.5) = 3.5; token 1: 0.25*3 = 0.75
    assert torch.equal(block_map(attention, values, gradient), torch.tensor([[3.5, 0.75]]))
    # without relu on g: token 0: 0.5*(1-2) + 1.0*(-10+3) = -7.5 -> 0; token 1: 0.25*(3-4) -> 0
    assert torch.equal(
        block_map(attention, values, gradient, relu_gradients=False), torch.tensor([[0.0, 0.0]])
    )
    weights = torch.tensor([[1.0, 1.0, 0.1, 0.1]])
    # token 0: 0.5*3 + 1.0*1.1 = 2.6; token 1: 0.25*7 = 1.75
    assert torch.allclose(
        block_map(attention, values, weights, relu_gradients=False), torch.tensor([[2.6, 1.75]])
    )


def test_block_map_equals_the_contraction_of_the_full_contributions():
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 3, 5, generator=generator).softmax(-1)
    values = torch.randn(2, 3, 5, 4, generator=generator)
    gradient = torch.randn(2, 12, generator=generator)
    full = class_token_contributions(attention, values)
    expected = (full * gradient.relu().unsqueeze(1)).sum(-1).relu()
    assert torch.allclose(block_map(attention, values, gradient), expected, atol=1e-6)


def test_tokens_to_grid_drops_prefix_tokens_row_major():
    maps = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8)
    grid = tokens_to_grid(maps, num_prefix_tokens=2, grid_size=(2, 3))
    assert torch.equal(grid[0], torch.tensor([[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]))
    with pytest.raises(ValueError, match="2 x 2 = 4 patch tokens after 2 prefix tokens, got 6"):
        tokens_to_grid(maps, num_prefix_tokens=2, grid_size=(2, 2))


def test_place_on_grid_lays_window_tokens_on_their_cells_and_drops_padding():
    # Two images, two windows of three tokens on a 1 x 4 grid: window 0 holds cells 2, 3 and
    # a padding token; window 1 holds cells 1, 0 and a prefix token.
    positions = torch.tensor([[2, 3, -1], [1, 0, -1]])
    maps = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0], [5.0, 6.0, 9.0], [7.0, 8.0, 9.0]])
    grid = place_on_grid(maps, positions, (1, 4))
    assert grid.tolist() == [[[4.0, 3.0, 1.0, 2.0]], [[8.0, 7.0, 5.0, 6.0]]]
    with pytest.raises(ValueError, match="3 tokens in a multiple of 2 windows, got shape"):
        place_on_grid(maps[:3], positions, (1, 4))


def test_place_on_grid_shares_a_token_equally_among_the_cells_it_covers():
    # One window of three tokens on a 2 x 3 grid: token 0 covers cells 0, 1, 2 (a run that is
    # one row), token 1 cells 3 and 4 (one slot unused), token 2 cell 5 and nothing else.
    positions = torch.tensor([[[0, 1, 2], [3, 4, -1], [5, -1, -1]]])
    maps = torch.tensor([[3.0, 4.0, 5.0], [6.0, 2.0, 1.0]])
    grid = place_on_grid(maps, positions, (2, 3))
    assert grid.tolist() == [[[1.0, 1.0, 1.0], [2.0, 2.0, 5.0]], [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]]
    assert torch.allclose(grid.sum(dim=(1, 2)), maps.sum(1))


def test_accumulate_is_the_running_sum_over_blocks():
    maps = torch.tensor([[[[1.0]], [[2.0]], [[0.5]]]])  # (B=1, L=3, 1, 1)
    assert accumulate(maps).flatten().tolist() == [1.0, 3.0, 3.5]


def _hand_flow():
    # one example, two blocks, a 1 x 3 grid; the last map's maximum is 4
    return torch.tensor([[[[0.0, 1.0, 2.0]], [[0.0, 2.0, 4.0]]]])


def test_paper_display_mapping_by_hand():
    mapped = paper_display_mapping(_hand_flow())
    # divide by 4, then sigmoid(5x) - 0.5, then min-max per map
    squash = lambda x: 1 / (1 + math.exp(-5 * x)) - 0.5  # noqa: E731
    first = [squash(0.0), squash(0.25), squash(0.5)]
    first = [(value - first[0]) / (first[2] - first[0]) for value in first]
    assert mapped.shape == (1, 2, 1, 3)
    assert torch.allclose(mapped[0, 0, 0], torch.tensor(first), atol=1e-6)
    second = [squash(0.0), squash(0.5), squash(1.0)]
    second = [(value - second[0]) / (second[2] - second[0]) for value in second]
    assert torch.allclose(mapped[0, 1, 0], torch.tensor(second), atol=1e-6)


def test_paper_display_mapping_uses_each_examples_own_last_maximum():
    flow = torch.cat([_hand_flow(), 10 * _hand_flow()])
    mapped = paper_display_mapping(flow)
    assert torch.allclose(mapped[0], mapped[1], atol=1e-6)


def test_linear_scalings_by_hand():
    flow = _hand_flow()
    shared = shared_linear_scaling(flow)
    assert torch.allclose(shared[0, 0, 0], torch.tensor([0.0, 0.25, 0.5]))
    assert torch.allclose(shared[0, 1, 0], torch.tensor([0.0, 0.5, 1.0]))
    per_map = per_map_scaling(flow)
    assert torch.allclose(per_map[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(per_map[0, 1, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_scalings_of_an_all_zero_flow_stay_finite():
    flow = torch.zeros(1, 2, 2, 2)
    for name in ("paper", "shared", "per_map"):
        scaled = scale_flow(flow, name)
        assert torch.isfinite(scaled).all() and (scaled == 0).all()


def test_scale_flow_rejects_unknown_names_and_shapes():
    with pytest.raises(ValueError, match="'paper', 'per_map', 'shared'.*'log'"):
        scale_flow(_hand_flow(), "log")
    with pytest.raises(ValueError, match=r"\(B, L, gh, gw\)"):
        paper_display_mapping(torch.zeros(3, 3))


def explicit_area_resampling(maps: torch.Tensor, grid) -> torch.Tensor:
    """Each cell split into (new_h * new_w) equal sub-cells of a common grid, each holding its
    share of the value; every new cell the sum of the sub-cells it covers, one by one."""
    old_h, old_w = maps.shape[-2:]
    new_h, new_w = grid
    common_h, common_w = old_h * new_h, old_w * new_w
    out = torch.zeros(*maps.shape[:-2], new_h, new_w, dtype=torch.float64)
    for row in range(common_h):
        for column in range(common_w):
            share = maps[..., row // new_h, column // new_w].double() / (new_h * new_w)
            out[..., row // old_h, column // old_w] += share
    return out


@pytest.mark.parametrize(
    "old, new", [((7, 7), (27, 27)), ((2, 2), (4, 4)), ((15, 15), (20, 20)), ((3, 5), (4, 2))]
)
def test_resampling_shares_each_cell_by_overlap_and_keeps_the_sum(old, new):
    maps = torch.rand(2, 3, *old, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    resampled = resample_to_grid(maps, new)
    assert resampled.shape == (2, 3, *new)
    torch.testing.assert_close(resampled, explicit_area_resampling(maps, new))
    torch.testing.assert_close(resampled.sum((-2, -1)), maps.sum((-2, -1)))


def test_resampling_a_coarse_map_to_twice_its_grid_gives_each_quarter_cell_a_quarter():
    maps = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]) / 4
    torch.testing.assert_close(resample_to_grid(maps, (4, 4)), expected)
    assert resample_to_grid(maps, (2, 2)) is maps


def _explicit_probabilities(queries, keys, scale, bias):
    """softmax(q k^T scale + bias) in float64, one row at a time."""
    rows = []
    for i in range(queries.shape[2]):
        logits = (queries[:, :, i : i + 1].double() * keys.double()).sum(-1) * scale
        if bias is not None:
            row_bias = bias if bias.shape[-2] == 1 else bias[..., i : i + 1, :]
            logits = logits + row_bias.double().squeeze(-2)
        rows.append(logits.softmax(-1))
    return torch.stack(rows, dim=2)


BIASES = {
    "none": None,
    "one bias row": (2, 3, 1, 7),
    "every row": (2, 3, 5, 7),
    "shared by the batch": (1, 3, 5, 7),
    "shared by batch and heads": (5, 7),
}


@pytest.mark.parametrize("bias_shape", BIASES.values(), ids=BIASES.keys())
@pytest.mark.parametrize("chunk_rows", [1, 2, 5])
def test_softmax_attention_transposed_mix_is_a_transposed_times_w(
    monkeypatch, bias_shape, chunk_rows
):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 3, 5, 4, generator=generator)  # 5 queries over 7 keys
    keys = torch.randn(2, 3, 7, 4, generator=generator)
    weights = torch.randn(2, 3, 5, 6, generator=generator)
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=generator)
    if bias is not None and bias.dim() == 4:
        bias[..., -1] = float("-inf")  # a masked key
    monkeypatch.setattr(SoftmaxAttention, "chunk_elements", chunk_rows * 2 * 3 * 7)
    attention = SoftmaxAttention(queries, keys, 0.5, bias)
    explicit = _explicit_probabilities(queries, keys, 0.5, bias)
    expected = explicit.transpose(-2, -1) @ weights.double()
    assert torch.allclose(attention.transposed_mix(weights).double(), expected, atol=1e-5)
    assert torch.allclose(attention().double(), explicit, atol=1e-6)
    rows = [4, 1]
    selected = query_rows(attention, rows)
    expected_rows = explicit[:, :, rows].transpose(-2, -1) @ weights[:, :, rows].double()
    mixed_rows = selected.transposed_mix(weights[:, :, rows]).double()
    assert torch.allclose(mixed_rows, expected_rows, atol=1e-5)
    assert torch.equal(query_rows(explicit, rows), explicit[:, :, rows])


def test_a_deferred_mixing_is_formed_once_when_first_used_and_then_acts_as_formed():
    generator = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(1, 2, 3, 4, generator=generator), torch.randn(1, 2, 5, 4)
    weights = torch.randn(1, 2, 3, 2, generator=generator)
    made = []

    def make():
        made.append(torch.is_grad_enabled())
        return SoftmaxAttention(queries, keys, 0.5)

    deferred = DeferredMixing(make)
    assert made == []  # nothing formed in the forward pass
    formed = SoftmaxAttention(queries, keys, 0.5)
    assert torch.equal(deferred.transposed_mix(weights), formed.transposed_mix(weights))
    assert torch.equal(deferred(), formed()) and deferred.num_queries == 3
    assert torch.equal(deferred.query_rows([2]).transposed_mix(weights[:, :, [2]]),
                       formed.query_rows([2]).transposed_mix(weights[:, :, [2]]))
    assert made == [False]  # formed once, without gradients
