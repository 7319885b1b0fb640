"""Hugging Face transformers' Swin and Swinv2 (SwinModel, SwinForImageClassification,
Swinv2Model, Swinv2ForImageClassification): DAAM over windowed attention equals an explicit
reference.

The reference runs the model in float64 with every block's attention written out window by
window, in transformers' order: zero padding of the stage grid to whole windows, then the
cyclic shift (torch.roll), each window cut out by slicing, the shift mask built by hand from
the regions of the padded grid, the relative position index built by hand
(tests/test_adapter_swin.py) and softmax(logits + bias) as an explicit (B, H, N, N) matrix per
window. Swin: q k^T * d^-0.5 plus the learned table looked up by that index; its layers drop
the shift on stage grids no wider than the window, as transformers' SwinLayer does at the call.
Swinv2: cosine attention, the per-head logit scale clamped at log(100), the bias
16 * sigmoid(MLP(table)) with the table of log-spaced relative coordinates built here and
passed through the module's own MLP, the shift mask added twice (as Swinv2SelfAttention does),
window and shift fixed from the configured stage grids; post-norm blocks. Gradients at every
window's output before the projection come from plain autograd; every row is split over the
tokens it reads, weighted by its own gradient, summed and relu'd, and put back on its patch by
undoing the shift and the padding by hand (windowed_reference). The stages' maps are brought to
the finest grid by reference.area_resample. The patch embedding and the patch merging are the
model's own modules.
"""

import copy
import math
import sys
import warnings
from typing import Callable, Dict, List, Optional, Set, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters import HFSwinAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_each_cell_in_one_window,
    assert_maps_on_block_grids_match,
    make_images,
    module_hook_count,
)
from test_adapter_swin import region_labels_by_hand, relative_index_by_hand, windowed_reference

NUM_CLASSES = 7
TARGETS = [3, 6, 0]
# 48x48 images, patch 4: a 12x12 grid, then 6x6; windows of 4 (3x3, then 2x2), shifted by 2.
SMALL = dict(image_size=48, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
             window_size=4, num_labels=NUM_CLASSES)
# 30x41: padded to whole patches, an 8x11 grid (windows padded to 8x12), then 4x6 (padded to
# 4x8), where Swin's layers drop the shift (the grid is no wider than the window) and Swinv2's
# keep it.
SIZES = {"whole_windows": (48, 48), "padded_non_square": (30, 41)}
CLASSES = {
    ("v1", "classifier"): "SwinForImageClassification",
    ("v1", "bare"): "SwinModel",
    ("v2", "classifier"): "Swinv2ForImageClassification",
    ("v2", "bare"): "Swinv2Model",
}


def make_model(version: str, head: str = "classifier", seed: int = 1, **config) -> nn.Module:
    """A small random model (no download), its parameters given seeded noise, in eval mode."""
    config_class = transformers.SwinConfig if version == "v1" else transformers.Swinv2Config
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[version, head])(config_class(**{**SMALL, **config}))
    return add_parameter_noise(model, seed=seed)


def backbone_of(model: nn.Module) -> nn.Module:
    return getattr(model, "swinv2", getattr(model, "swin", model))


# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def coordinates_table_by_hand(window: int, pretrained: int) -> Tensor:
    """((2w - 1)^2, 2) Swinv2's relative coordinates (dy, dx), dy major, scaled to [-8, 8] by
    the (pretrained) window and mapped to sign(x) log2(|x| + 1) / 3."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float64)
    divisor = (pretrained - 1) if pretrained > 0 else max(window - 1, 1)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1) / divisor * 8
    return (torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0).reshape(-1, 2)


def swin_window(attention: nn.Module, tokens: Tensor, mask: Tensor, window: int) -> Dict:
    """One window (B, N, C) of SwinAttention by hand; ``mask`` (N, N) is 0 or -100."""
    batch, count, channels = tokens.shape
    heads = attention.num_attention_heads

    def split(projection: nn.Linear) -> Tensor:
        return projection(tokens).reshape(batch, count, heads, -1).transpose(1, 2)

    q, k, v = split(attention.q_proj), split(attention.k_proj), split(attention.v_proj)
    table = attention.relative_position_bias.relative_position_bias_table
    relative = table[relative_index_by_hand((window, window))].permute(2, 0, 1)
    logits = q @ k.transpose(-2, -1) * (channels // heads) ** -0.5
    probabilities = (logits + relative + mask).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, count, channels)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection,
                out=attention.o_proj(pre_projection))


def swinv2_window(
    attention: nn.Module, tokens: Tensor, mask: Tensor, window: int, pretrained: int
) -> Dict:
    """One window (B, N, C) of Swinv2Attention by hand: cosine attention, the clamped logit
    scale, the continuous position bias; the shift mask added twice, as the module does."""
    batch, count, channels = tokens.shape
    inner = attention.self
    heads = inner.num_attention_heads

    def split(projection: nn.Linear) -> Tensor:
        return projection(tokens).reshape(batch, count, heads, -1).transpose(1, 2)

    q, k, v = split(inner.query), split(inner.key), split(inner.value)
    scale = torch.clamp(inner.logit_scale, max=math.log(100.0)).exp()  # (H, 1, 1)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
    coordinates = coordinates_table_by_hand(window, pretrained)
    table = inner.continuous_position_bias_mlp(coordinates).reshape(-1, heads)
    relative = 16 * torch.sigmoid(table[relative_index_by_hand((window, window))].permute(2, 0, 1))
    probabilities = (logits + relative + 2 * mask).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, count, channels)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection,
                out=attention.output.dense(pre_projection))


def windowed_attention(
    x: Tensor, window: int, shift: int, attend: Callable[[Tensor, Tensor], Dict]
) -> Tuple[Tensor, List[Dict]]:
    """A block's windowed attention on (B, h, w, C) by hand: zero padding to whole windows,
    then the cyclic shift. Returns the output (B, h, w, C) and, per window, its record with
    ``cells``: the (row, column) of each of its tokens on the grid, None for padding."""
    batch, height, width, channels = x.shape
    padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = x
    shifted = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2))
    labels = region_labels_by_hand((padded_h, padded_w), (window, window), (shift, shift))
    output = torch.zeros_like(padded)
    windows = []
    for top in range(0, padded_h, window):
        for left in range(0, padded_w, window):
            tokens = shifted[:, top : top + window, left : left + window].reshape(
                batch, -1, channels)
            mask = torch.zeros(window * window, window * window, dtype=x.dtype)
            if shift:
                region = labels[top : top + window, left : left + window].reshape(-1)
                mask = mask.masked_fill(region[:, None] != region[None, :], -100.0)
            record = attend(tokens, mask)
            output[:, top : top + window, left : left + window] = record["out"].reshape(
                batch, window, window, channels)
            cells = []
            for r in range(top, top + window):
                for c in range(left, left + window):
                    row, column = (r + shift) % padded_h, (c + shift) % padded_w  # unshifted
                    cells.append((row, column) if row < height and column < width else None)
            record["cells"] = cells
            windows.append(record)
    output = torch.roll(output, shifts=(shift, shift), dims=(1, 2))[:, :height, :width]
    return output, windows


def window_and_shift_by_hand(
    config, version: str, stage: int, block: int, grid: Tuple[int, int]
) -> Tuple[int, int]:
    """Swin: the configured window, shifted by half in odd blocks, the shift dropped on a grid
    no wider than the window (at the call). Swinv2: the window clipped to the configured stage
    grid's height, the shift dropped where that grid is no taller than the window (when built)."""
    window, shift = config.window_size, (config.window_size // 2 if block % 2 else 0)
    if version == "v1":
        return (min(grid), 0) if min(grid) <= window else (window, shift)
    configured = config.image_size // config.patch_size // 2 ** stage
    window = min(configured, window)
    return window, (0 if configured <= window else shift)


def explicit_forward(
    model: nn.Module, images: Tensor, dropped_shifts: Set[Tuple[int, int]] = frozenset(),
    interpolate_pos_encoding: bool = False,
) -> Tuple[Tensor, List[Dict]]:
    """The model's output by hand (logits, or the pooled features of a bare model) and its
    blocks' windows; the blocks (stage, block) of ``dropped_shifts`` run unshifted."""
    backbone = backbone_of(model)
    version = "v2" if isinstance(backbone, transformers.Swinv2Model) else "v1"
    config = backbone.config
    x, (height, width) = backbone.embeddings(
        images, interpolate_pos_encoding=interpolate_pos_encoding)
    blocks = []
    for stage_index, stage in enumerate(backbone.encoder.layers):
        pretrained = config.pretrained_window_sizes[stage_index] if version == "v2" else 0
        for block_index, layer in enumerate(stage.blocks):
            window, shift = window_and_shift_by_hand(
                config, version, stage_index, block_index, (height, width))
            if (stage_index, block_index) in dropped_shifts:
                shift = 0
            batch, _, channels = x.shape
            if version == "v2":
                def attend(tokens, mask, attention=layer.attention, window=window):
                    return swinv2_window(attention, tokens, mask, window, pretrained)

                attended, windows = windowed_attention(
                    x.reshape(batch, height, width, channels), window, shift, attend)
                x = x + layer.layernorm_before(attended.reshape(batch, -1, channels))
                x = x + layer.layernorm_after(layer.output(layer.intermediate(x)))
            else:
                def attend(tokens, mask, attention=layer.attention, window=window):
                    return swin_window(attention, tokens, mask, window)

                normed = layer.layernorm_before(x).reshape(batch, height, width, channels)
                attended, windows = windowed_attention(normed, window, shift, attend)
                x = x + attended.reshape(batch, -1, channels)
                x = x + layer.mlp(layer.layernorm_after(x))
            blocks.append(dict(windows=windows, grid=(height, width)))
        if stage.downsample is not None:
            x = stage.downsample(x, (height, width))
            height, width = (height + 1) // 2, (width + 1) // 2
    features = backbone.layernorm(x).mean(dim=1)  # the pooler: the tokens averaged
    classifier = getattr(model, "classifier", None)
    return (features if classifier is None else classifier(features)), blocks


def explicit_daam(model: nn.Module, images: Tensor, target, **options) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        output, blocks = explicit_forward(model, images.double(), **options)
        return windowed_reference(blocks, output, target)


def model_output(model: nn.Module, images: Tensor, **kwargs) -> Tensor:
    with torch.no_grad():
        output = model(images, **kwargs)
    return getattr(output, "logits", None) if hasattr(model, "classifier") else (
        output.pooler_output)


def assert_daam_matches(daam: DAAM, model: nn.Module, images: Tensor, target, expected,
                        warning: Optional[str] = None) -> None:
    """DAAM's block maps on their own grids and its flow equal the reference's, each block
    map positive somewhere; ``warning``: the one warning expected; no hook left."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blocks = daam.attribute(images, target=target, block_grids=True, accumulate=False)
        flow = daam.attribute(images, target=target, return_flow=True)
    messages = [str(warning_.message) for warning_ in caught]
    assert all(warning and warning in message for message in messages), messages
    assert len(messages) == (2 if warning else 0)
    assert len(blocks) == len(expected["block_maps"])
    for block, reference_map in zip(blocks, expected["block_maps"]):
        assert_close_relative(block[:, 0], reference_map)
        assert float(reference_map.amax()) > 0
    assert_close_relative(flow, expected["flow"])
    assert module_hook_count(model) == 0


# --------------------------------------------------------------------------- #
# Exactness
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("head", ["classifier", "bare"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_flow_and_block_maps_equal_explicit_reference(version, head, target, size):
    model = make_model(version, head)
    images = make_images(3, *SIZES[size])
    expected = explicit_daam(model, images, target)  # on a copy: the model is still fresh
    assert len(expected["block_maps"]) == 4
    if head == "classifier":
        assert_maps_on_block_grids_match(model, images, target, expected)
    else:  # target=None on features: each example's largest feature, with a warning
        warning = "features, not class scores" if target is None else None
        assert_daam_matches(DAAM(model), model, images, target, expected, warning)
    assert_close_relative(expected["logits"], model_output(model, images).double(), 1e-5)


def test_eager_attention_gives_the_same_maps_as_sdpa():
    model = make_model("v1", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    images = make_images(2, *SIZES["padded_non_square"])
    expected = explicit_daam(model, images, [5, 2])
    assert_maps_on_block_grids_match(model, images, [5, 2], expected)
    assert_close_relative(expected["logits"], model_output(model, images).double(), 1e-5)


def test_swinv2_takes_images_smaller_than_its_windows():
    """16x20: a 4x5 grid, then 2x3, each padded to whole windows and shifted (Swinv2 fixes its
    windows when built; Swin refuses such images)."""
    model = make_model("v2")
    images = make_images(2, 16, 20)
    expected = explicit_daam(model, images, [1, 4])
    assert_close_relative(expected["logits"], model_output(model, images).double(), 1e-5)
    assert_maps_on_block_grids_match(model, images, [1, 4], expected)


def test_a_swin_left_unshifted_by_an_earlier_call_is_laid_out_as_it_now_runs():
    """transformers' SwinLayer drops its shift in place on a grid no wider than its window:
    after a 30x41 call, the second block of the last stage runs unshifted on 48x48 images too."""
    model = make_model("v1")
    images = make_images(2, 48, 48)
    before = explicit_daam(model, images, [2, 5])
    model_output(model, make_images(1, 30, 41))
    assert model.swin.encoder.layers[1].blocks[1].shift_size == 0
    expected = explicit_daam(model, images, [2, 5], dropped_shifts={(1, 1)})
    logits = model_output(model, images).double()
    assert_close_relative(expected["logits"], logits, 1e-5)
    with pytest.raises(AssertionError, match="max abs error"):  # the shift matters here
        assert_close_relative(before["logits"], logits, 1e-5)
    assert_maps_on_block_grids_match(model, images, [2, 5], expected)


def test_interpolated_absolute_position_embeddings_take_other_sizes():
    model = make_model("v1", use_absolute_embeddings=True)
    images = make_images(2, 40, 56)
    expected = explicit_daam(model, images, [0, 6], interpolate_pos_encoding=True)
    logits = model_output(model, images, interpolate_pos_encoding=True).double()
    assert_close_relative(expected["logits"], logits, 1e-5)
    daam = DAAM(lambda x: model(x, interpolate_pos_encoding=True).logits,
                adapter=HFSwinAdapter(model, interpolate_pos_encoding=True))
    assert_daam_matches(daam, model, images, [0, 6], expected)


# --------------------------------------------------------------------------- #
# The adapter
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_adapter_is_picked_for_the_four_classes_and_says_what_it_reads(version):
    classifier, bare = make_model(version), make_model(version, "bare")
    for model, outputs, features in ((classifier, NUM_CLASSES, False), (bare, 64, True)):
        adapter = adapter_for(model)
        assert isinstance(adapter, HFSwinAdapter)
        assert not adapter.has_class_token and adapter.num_prefix_tokens == 0
        assert adapter.head_queries is None
        assert (adapter.num_outputs, adapter.outputs_features) == (outputs, features)
        assert adapter.in_channels == 3
        assert adapter.grid_size((30, 41)) == (8, 11)
        assert adapter.stage_grids((30, 41)) == [(8, 11), (4, 6)]
        stages = backbone_of(model).encoder.layers
        assert adapter.attention_modules() == [
            block.attention for stage in stages for block in stage.blocks]
    layouts = adapter.block_layouts(adapter.attention_modules(), (48, 48))
    assert [tuple(layout.positions.shape) for layout in layouts] == [(9, 16)] * 2 + [(4, 16)] * 2


def test_supports_only_the_four_classes_and_only_once_transformers_loaded_them(monkeypatch):
    models = [make_model(version, head) for version, head in CLASSES]
    assert all(HFSwinAdapter.supports(model) for model in models)
    assert not HFSwinAdapter.supports(nn.Linear(2, 2))
    timm_swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=48, window_size=4,
                                  embed_dim=32, depths=(2, 2), num_heads=(2, 4))
    assert not HFSwinAdapter.supports(timm_swin)
    with pytest.raises(TypeError, match="Expected a transformers SwinModel.*got a SwinTrans"):
        HFSwinAdapter(timm_swin)
    monkeypatch.delitem(sys.modules, "transformers.models.swin.modeling_swin")
    monkeypatch.delitem(sys.modules, "transformers.models.swinv2.modeling_swinv2")
    assert not any(HFSwinAdapter.supports(model) for model in models)


CHECKPOINT_CONFIGS = {
    # transformers' defaults: microsoft/swin-tiny-patch4-window7-224's architecture.
    "swin_tiny_224": ("v1", {}),
    "swin_base_384": ("v1", dict(image_size=384, embed_dim=128, depths=[2, 2, 18, 2],
                                 num_heads=[4, 8, 16, 32], window_size=12)),
    "swinv2_tiny_224": ("v2", {}),
    "swinv2_tiny_256": ("v2", dict(image_size=256, window_size=8)),
    # Windows of 16 (12 when pretrained), clipped to 8 on the last stage's 8x8 grid.
    "swinv2_base_192to256": ("v2", dict(
        image_size=256, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
        window_size=16, pretrained_window_sizes=[12, 12, 12, 6])),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CONFIGS))
def test_registered_layouts_cover_every_patch_cell_once_per_block(name):
    version, config = CHECKPOINT_CONFIGS[name]
    config_class = transformers.SwinConfig if version == "v1" else transformers.Swinv2Config
    with torch.device("meta"):
        model = getattr(transformers, CLASSES[version, "classifier"])(config_class(**config))
    adapter = adapter_for(model)
    assert isinstance(adapter, HFSwinAdapter) and not adapter.has_class_token
    configured = model.config.image_size
    for size in [(configured, configured), (configured + 37, configured - 11),
                 (configured - 13, configured + 70)]:
        layouts = adapter.block_layouts(adapter.attention_modules(), size)
        assert len(layouts) == sum(model.config.depths)
        for layout in layouts:
            assert_each_cell_in_one_window(layout, f"{name} {size}")


# --------------------------------------------------------------------------- #
# Refusals
# --------------------------------------------------------------------------- #


def test_images_too_small_for_swins_windows_are_refused_before_any_work():
    model = make_model("v1")
    calls = []

    def forward(images):
        calls.append(images)
        return model(images).logits

    shifts = [block.shift_size for stage in model.swin.encoder.layers for block in stage.blocks]
    with pytest.raises(ValueError, match="at least 4 tokens a side .* got 24x40, a 3x5 grid in "
                                         "stage 1. Use images of at least 25 pixels a side"):
        DAAM(forward, adapter=HFSwinAdapter(model)).attribute(make_images(1, 24, 40), target=0)
    assert calls == [] and module_hook_count(model) == 0
    assert shifts == [block.shift_size for stage in model.swin.encoder.layers
                      for block in stage.blocks]
    DAAM(model).attribute(make_images(1, 25, 25), target=0)  # the smallest size it names
    with pytest.raises(RuntimeError):  # the model itself cannot run them
        copy.deepcopy(model)(make_images(1, 24, 40))


def test_other_sizes_of_absolute_position_embeddings_are_refused_before_any_work():
    calls = []
    for version in ("v1", "v2"):
        model = make_model(version, use_absolute_embeddings=True)
        daam = DAAM(lambda x: calls.append(x), adapter=HFSwinAdapter(model))
        with pytest.raises(ValueError, match="takes 48x48 images .*got 40x48"):
            daam.attribute(make_images(1, 40, 48), target=0)
    interpolating = DAAM(lambda x: calls.append(x),
                         adapter=HFSwinAdapter(make_model("v1", use_absolute_embeddings=True),
                                               interpolate_pos_encoding=True))
    with pytest.raises(ValueError, match="divisible by the patch size 4x4 .*got 42x48"):
        interpolating.attribute(make_images(1, 42, 48), target=0)
    assert calls == []
    with pytest.raises(TypeError, match="cannot interpolate its absolute position embeddings"):
        HFSwinAdapter(make_model("v2", use_absolute_embeddings=True),
                      interpolate_pos_encoding=True)


def test_a_bare_model_without_its_pooler_is_refused():
    config = transformers.SwinConfig(**SMALL)
    with pytest.raises(TypeError, match="add_pooling_layer=False"):
        adapter_for(transformers.SwinModel(config, add_pooling_layer=False))


def test_a_call_with_always_partition_is_refused_and_leaves_no_hook():
    model = make_model("v1")
    daam = DAAM(lambda x: model(x, always_partition=True).logits, adapter=HFSwinAdapter(model))
    with pytest.raises(ValueError, match="without always_partition"):
        daam.attribute(make_images(1, 48, 48), target=0)
    assert module_hook_count(model) == 0


def test_daam_for_a_swin_can_be_pickled():
    """The adapter looks transformers' modeling module up when it uses it: a DAAM object of a
    Swin pickles (for multiprocessing and checkpoints) like any other."""
    import pickle

    model = transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
        window_size=4, num_labels=3)).eval()
    restored = pickle.loads(pickle.dumps(DAAM(model)))
    assert restored.adapter.modeling is DAAM(model).adapter.modeling
