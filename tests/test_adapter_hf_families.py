"""DAAM on the Hugging Face transformers vision encoders beyond ViT equals an explicit float64
reference: DeiT (and WithTeacher), BEiT (relative position bias), DINOv2 (with and without
registers), DINOv3 (RoPE, registers), ViT-MSN, ViT-MAE, I-JEPA, CLIP and MetaCLIP 2 vision
towers, SigLIP (attention-pool head) and AIMv2 (attention-pool head); classifiers, bare and
embedding models.

The reference runs a float64 copy of the model with every attention layer's forward replaced
by attention written out here: q, k, v from the layer's projections, DINOv3's rotation applied
by hand to the patch tokens, BEiT's relative position bias looked up from its table with an
index built here, an explicit softmax (B, H, Q, N); heads pooled with nn.MultiheadAttention
(SigLIP) or their own latent query (AIMv2) written out the same way. Plain autograd gives the
gradient at each block's pre-projection output, and the formulas of DESIGN.md are applied with
the full contributions (tests/reference.py). No package code is used in the reference.
"""

import copy
import importlib
from typing import Callable, Dict, List, Optional

import pytest
import torch
from torch import Tensor, nn

import transformers

from captum_daam import DAAM
from captum_daam.adapters import HFVisionAdapter, adapter_for
from captum_daam.adapters.base import TokenRows
from helpers import add_parameter_noise, assert_close_relative, make_images, module_hook_count
from reference import maps_from_every_query_row, resolve_targets

SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    image_size=32, patch_size=8,
)


# --------------------------------------------------------------------------- #
# The explicit reference
# --------------------------------------------------------------------------- #


def rotate_half_by_hand(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def beit_bias_by_hand(table: Tensor, window: tuple) -> Tensor:
    """BEiT's (H, N, N) relative position bias for a ``window`` of patches after one [class]
    token, from its table: relative offsets (dy, dx) shifted to be non-negative and flattened,
    and three extra entries for [class]-to-patch, patch-to-[class] and [class]-to-[class]."""
    rows, columns = window
    distances = (2 * rows - 1) * (2 * columns - 1) + 3
    cells = [(y, x) for y in range(rows) for x in range(columns)]
    tokens = len(cells) + 1
    index = torch.empty(tokens, tokens, dtype=torch.long)
    for i, (yi, xi) in enumerate(cells, start=1):
        for j, (yj, xj) in enumerate(cells, start=1):
            index[i, j] = (yi - yj + rows - 1) * (2 * columns - 1) + (xi - xj + columns - 1)
    index[0, :] = distances - 3
    index[:, 0] = distances - 2
    index[0, 0] = distances - 1
    return table[index.reshape(-1)].reshape(tokens, tokens, -1).permute(2, 0, 1)


def explicit_softmax_attention(
    queries: Tensor, keys: Tensor, values: Tensor, scale: float, bias: Optional[Tensor]
) -> Dict[str, Tensor]:
    """(B, H, Q, d), (B, H, N, d) x2 -> the block record of the reference."""
    logits = (queries @ keys.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias
    attention = logits.softmax(dim=-1)
    batch, heads, rows, width = queries.shape
    pre_projection = (attention @ values).transpose(1, 2).reshape(batch, rows, heads * width)
    pre_projection.requires_grad_(True) if not pre_projection.requires_grad else None
    return {"attn": attention, "v": values, "pre_projection": pre_projection}


def explicit_layer_forward(attention: nn.Module, blocks: List[Dict], beit_window=None):
    """The layer's forward with its attention written out (replaces ``attention.forward``)."""
    heads = getattr(attention, "num_attention_heads", None) or attention.num_heads
    width = attention.head_dim
    output_projection = getattr(attention, "o_proj", None) or attention.out_proj

    def forward(hidden_states, *args, **kwargs):
        batch, tokens, _ = hidden_states.shape

        def split(projected):
            return projected.reshape(batch, tokens, heads, width).transpose(1, 2)

        q = split(attention.q_proj(hidden_states))
        k = split(attention.k_proj(hidden_states))
        v = split(attention.v_proj(hidden_states))
        rotary = kwargs.get("position_embeddings")
        if rotary is not None:  # DINOv3 rotates the patch tokens only, MLCD every token
            cos, sin = rotary
            prefix = tokens - cos.shape[-2]

            def rotate(t):
                patches = t[:, :, prefix:]
                rotated = patches * cos + rotate_half_by_hand(patches) * sin
                return torch.cat([t[:, :, :prefix], rotated], dim=2)

            q, k = rotate(q), rotate(k)
        bias = None
        if beit_window is not None:
            bias = beit_bias_by_hand(beit_window[0], beit_window[1]).unsqueeze(0)
        record = explicit_softmax_attention(q, k, v, width**-0.5, bias)
        blocks.append(record)
        return output_projection(record["pre_projection"]), None

    return forward


def explicit_bert_style_attention(attention: nn.Module, blocks: List[Dict], biases):
    """Data2Vec-Vision's self-attention written out: query / key / value, its own and the
    shared relative position bias from their tables (``biases``: the tables and the grid)."""
    heads, width = attention.num_attention_heads, attention.attention_head_size

    def forward(hidden_states, *args, **kwargs):
        batch, tokens, _ = hidden_states.shape

        def split(projected):
            return projected.reshape(batch, tokens, heads, width).transpose(1, 2)

        q, k = split(attention.query(hidden_states)), split(attention.key(hidden_states))
        v = split(attention.value(hidden_states))
        tables, grid = biases
        bias = sum(beit_bias_by_hand(table, grid) for table in tables).unsqueeze(0)
        record = explicit_softmax_attention(q, k, v, width**-0.5, bias)
        blocks.append(record)
        return (record["pre_projection"],)

    return forward


def explicit_siglip_head(attention: nn.MultiheadAttention, blocks: List[Dict]):
    """nn.MultiheadAttention's forward for SigLIP's probe, written out from its weights."""
    heads, width = attention.num_heads, attention.head_dim

    def forward(query, key, value, *args, **kwargs):
        wq, wk, wv = attention.in_proj_weight.chunk(3)
        bq, bk, bv = attention.in_proj_bias.chunk(3)

        def split(x):
            return x.reshape(x.shape[0], x.shape[1], heads, width).transpose(1, 2)

        q, k, v = split(query @ wq.T + bq), split(key @ wk.T + bk), split(value @ wv.T + bv)
        record = explicit_softmax_attention(q, k, v, width**-0.5, None)
        blocks.append(record)
        return attention.out_proj(record["pre_projection"]), None

    return forward


def explicit_aimv2_head(head: nn.Module, blocks: List[Dict]):
    """AIMv2's attention-pool head written out: its cls_token the one query."""
    heads = head.num_heads
    width = head.hidden_size // heads

    def forward(hidden_states):
        batch, tokens, _ = hidden_states.shape
        k = head.k_proj(hidden_states).reshape(batch, tokens, heads, width).transpose(1, 2)
        v = head.v_proj(hidden_states).reshape(batch, tokens, heads, width).transpose(1, 2)
        q = head.cls_token.reshape(1, heads, 1, width).expand(batch, -1, -1, -1)
        record = explicit_softmax_attention(q, k, v, width**-0.5, None)
        blocks.append(record)
        return head.output_proj(record["pre_projection"][:, 0])

    return forward


def explicit_run(model: nn.Module, images: Tensor, pick: Callable, kind: str):
    """A float64 copy of ``model`` run with its attention written out: (scores, blocks)."""
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            module.forward = explicit_siglip_head(module, blocks)
        elif hasattr(module, "output_proj") and hasattr(module, "cls_token"):
            module.forward = explicit_aimv2_head(module, blocks)
        elif hasattr(module, "query") and hasattr(module, "key"):  # Data2Vec-Vision
            grid = tuple(side // model.config.patch_size for side in images.shape[-2:])
            tables = [
                bias.relative_position_bias_table
                for bias in (
                    getattr(module, "relative_position_bias", None),
                    getattr(getattr(model, "data2vec_vision", model).encoder,
                            "relative_position_bias", None),
                )
                if bias is not None
            ]
            module.forward = explicit_bert_style_attention(module, blocks, (tables, grid))
        elif hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            beit_window = None
            if kind == "beit":
                config = model.config
                grid = tuple(s // config.patch_size for s in images.shape[-2:])
                table = module_bias_table(model, name)
                beit_window = (table, grid)
            module.forward = explicit_layer_forward(module, blocks, beit_window)
    with torch.enable_grad():
        scores = pick(call(model, images.double(), kind))
    return scores, blocks


def call(model: nn.Module, images: Tensor, kind: str):
    """The model's forward; ViT-MAE with increasing noise, which keeps the patches in order
    (its default noise is random, and shuffles them)."""
    if kind == "siglip2":  # patches as its processor makes them, every patch real
        module = importlib.import_module(
            "transformers.models.siglip2.image_processing_siglip2"
        )
        patch = getattr(model.config, "vision_config", model.config).patch_size
        patches = torch.stack([module.convert_image_to_patches(image, patch) for image in images])
        rows, columns = images.shape[-2] // patch, images.shape[-1] // patch
        return model(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(len(images), rows * columns, dtype=torch.long),
            spatial_shapes=torch.tensor([[rows, columns]] * len(images)),
        )
    if kind == "interpolate":
        return model(images, interpolate_pos_encoding=True)
    if kind == "mae":
        noise = torch.arange(16, dtype=images.dtype).expand(images.shape[0], -1)
        return model(images, noise=noise)
    return model(images)


def module_bias_table(model: nn.Module, attention_name: str) -> Tensor:
    """BEiT's relative position bias table of the layer that holds ``attention_name``."""
    layer = model.get_submodule(attention_name.rsplit(".", 1)[0])
    return layer.relative_position_bias.relative_position_bias_table


def reference_maps(model, images, pick, kind, target, rows, prefix, grid, latent=0):
    """Reference block maps (B, L, gh, gw) and the scores: ``rows`` the query rows of the
    blocks (None: all), the last ``latent`` blocks explained from all their rows."""
    scores, blocks = explicit_run(model, images, pick, kind)
    targets = resolve_targets(target, scores)
    score = scores[torch.arange(scores.shape[0]), targets].sum()
    gradients = torch.autograd.grad(
        score, [block["pre_projection"] for block in blocks], allow_unused=True
    )
    # A pooling head the score does not read (SigLIP's, under a classifier over the token
    # mean) runs but is no block of the flow.
    blocks, gradients = zip(*[(b, g) for b, g in zip(blocks, gradients) if g is not None])
    maps = []
    for index, (block, gradient) in enumerate(zip(blocks, gradients)):
        block_rows = None if index >= len(blocks) - latent else rows
        if block_rows is not None:
            block = dict(block, attn=block["attn"][:, :, list(block_rows)])
            gradient = gradient[:, list(block_rows)]
        maps.append(maps_from_every_query_row([block], [gradient], prefix, grid)["block_maps"])
    return scores, torch.cat(maps, dim=1), targets


# --------------------------------------------------------------------------- #
# The cases: small models built from the libraries' configs, random weights
# --------------------------------------------------------------------------- #


#: The attention implementation the models are built with (transformers' default: sdpa).
IMPLEMENTATION = {"name": None}


def build(model_class: str, config_class: str, seed: int = 3, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SMALL, **extra})
    if IMPLEMENTATION["name"] is not None:
        config._attn_implementation = IMPLEMENTATION["name"]
    model = getattr(transformers, model_class)(config)
    return add_parameter_noise(model.eval(), 0.2, seed)


def build_classifier(model_class: str, config_class: str, seed: int = 3, **vision) -> nn.Module:
    """An image-text family's classifier (its vision tower and a linear head), from the
    family's config with a small vision and text config."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64)
    config = getattr(transformers, config_class)(
        vision_config={**SMALL, **vision}, text_config=text, num_labels=5
    )
    model = getattr(transformers, model_class)(config)
    return add_parameter_noise(model.eval(), 0.2, seed)


def logits(output):
    return output.logits


def pooled(output):
    return output.pooler_output


def class_token(output):
    return output.last_hidden_state[:, 0]


def image_embeds(output):
    return output.image_embeds


def mean_token(output):
    return output.last_hidden_state.mean(dim=1)


PATCHES = tuple(range(1, 17))  # the 4 x 4 patches after one [class] token

# name: (builder, pick, rows (None = all), prefix tokens, latent head blocks, kind)
CASES = {
    "deit_classifier": (lambda: build("DeiTForImageClassification", "DeiTConfig", num_labels=5),
                        logits, (0,), 2, 0, ""),
    "deit_teacher": (lambda: build("DeiTForImageClassificationWithTeacher", "DeiTConfig",
                                   num_labels=5), logits, (0, 1), 2, 0, ""),
    "beit_mean_pool": (lambda: build("BeitForImageClassification", "BeitConfig", num_labels=5,
                                     use_relative_position_bias=True), logits, PATCHES, 1, 0,
                       "beit"),
    "beit_class_token": (lambda: build("BeitForImageClassification", "BeitConfig", num_labels=5,
                                       use_relative_position_bias=True, use_mean_pooling=False),
                         logits, (0,), 1, 0, "beit"),
    "data2vec_own_bias": (lambda: build("Data2VecVisionForImageClassification",
                                        "Data2VecVisionConfig", num_labels=5,
                                        use_relative_position_bias=True), logits, PATCHES, 1, 0,
                          ""),
    "data2vec_shared_bias": (lambda: build("Data2VecVisionForImageClassification",
                                           "Data2VecVisionConfig", num_labels=5,
                                           use_shared_relative_position_bias=True,
                                           use_mean_pooling=False), logits, (0,), 1, 0, ""),
    "dinov2_classifier": (lambda: build("Dinov2ForImageClassification", "Dinov2Config",
                                        num_labels=5), logits, None, 1, 0, ""),
    "dinov2_model": (lambda: build("Dinov2Model", "Dinov2Config"), pooled, (0,), 1, 0, ""),
    "dinov2_registers": (lambda: build("Dinov2WithRegistersForImageClassification",
                                       "Dinov2WithRegistersConfig", num_labels=5,
                                       num_register_tokens=2), logits, (0,) + tuple(range(3, 19)),
                         3, 0, ""),
    "dinov3": (lambda: build("DINOv3ViTModel", "DINOv3ViTConfig", num_register_tokens=2),
               pooled, (0,), 3, 0, ""),
    "vit_msn": (lambda: build("ViTMSNForImageClassification", "ViTMSNConfig", num_labels=5),
                logits, (0,), 1, 0, ""),
    "vit_mae": (lambda: build("ViTMAEModel", "ViTMAEConfig", mask_ratio=0.0), class_token,
                (0,), 1, 0, "mae"),
    "ijepa_classifier": (lambda: build("IJepaForImageClassification", "IJepaConfig",
                                       num_labels=5), logits, None, 0, 0, ""),
    "ijepa_model": (lambda: build("IJepaModel", "IJepaConfig"), mean_token, None, 0, 0, ""),
    "clip_vision_projection": (lambda: build("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                                             projection_dim=16), image_embeds, (0,), 1, 0, ""),
    "metaclip2_vision": (lambda: build("MetaClip2VisionModel", "MetaClip2VisionConfig"), pooled,
                         (0,), 1, 0, ""),
    "mlcd_vision": (lambda: build("MLCDVisionModel", "MLCDVisionConfig"), pooled, (0,), 1, 0, ""),
    "deit_model": (lambda: build("DeiTModel", "DeiTConfig"), class_token, (0,), 2, 0, ""),
    "beit_model": (lambda: build("BeitModel", "BeitConfig", use_relative_position_bias=True),
                   pooled, PATCHES, 1, 0, "beit"),
    # built without a pooler by default: the [class] token of last_hidden_state
    "data2vec_model": (lambda: build("Data2VecVisionModel", "Data2VecVisionConfig",
                                     use_relative_position_bias=True), class_token, (0,), 1, 0,
                       ""),
    "dinov2_registers_model": (lambda: build("Dinov2WithRegistersModel",
                                             "Dinov2WithRegistersConfig",
                                             num_register_tokens=2), pooled, (0,), 3, 0, ""),
    "vit_msn_model": (lambda: build("ViTMSNModel", "ViTMSNConfig"), class_token, (0,), 1, 0, ""),
    "clip_classifier": (lambda: build_classifier("CLIPForImageClassification", "CLIPConfig"),
                        logits, PATCHES, 1, 0, ""),
    "metaclip2_classifier": (lambda: build_classifier("MetaClip2ForImageClassification",
                                                      "MetaClip2Config"), logits, PATCHES, 1, 0,
                             ""),
    "siglip_classifier": (lambda: build_classifier("SiglipForImageClassification",
                                                   "SiglipConfig"), logits, None, 0, 0, ""),
    "siglip2_classifier": (lambda: build_classifier("Siglip2ForImageClassification",
                                                    "Siglip2Config", num_patches=16), logits,
                           None, 0, 0, "siglip2"),
    "altclip_vision": (lambda: build("AltCLIPVisionModel", "AltCLIPVisionConfig"), pooled, (0,),
                       1, 0, ""),
    "chinese_clip_vision": (lambda: build("ChineseCLIPVisionModel", "ChineseCLIPVisionConfig"),
                            pooled, (0,), 1, 0, ""),
    "clipseg_vision": (lambda: build("CLIPSegVisionModel", "CLIPSegVisionConfig"), pooled, (0,),
                       1, 0, ""),
    "owlvit_vision": (lambda: build("OwlViTVisionModel", "OwlViTVisionConfig"), pooled, (0,), 1,
                      0, ""),
    "owlv2_vision": (lambda: build("Owlv2VisionModel", "Owlv2VisionConfig"), pooled, (0,), 1, 0,
                     ""),
    # the SigLIP towers of vision-language models: no head, the mean of the tokens
    "idefics3_vision": (lambda: build("Idefics3VisionTransformer", "Idefics3VisionConfig"),
                        mean_token, None, 0, 0, ""),
    "smolvlm_vision": (lambda: build("SmolVLMVisionTransformer", "SmolVLMVisionConfig"),
                       mean_token, None, 0, 0, ""),
    "siglip_vision": (lambda: build("SiglipVisionModel", "SiglipVisionConfig"), pooled, None, 0,
                      1, ""),
    "siglip2_vision": (lambda: build("Siglip2VisionModel", "Siglip2VisionConfig", num_patches=16),
                       pooled, None, 0, 1, "siglip2"),
    "siglip_without_head": (lambda: build("SiglipVisionModel", "SiglipVisionConfig",
                                          vision_use_head=False), mean_token, None, 0, 0, ""),
    "aimv2_vision": (lambda: build("Aimv2VisionModel", "Aimv2VisionConfig", use_head=True),
                     pooled, None, 0, 1, ""),
}


@pytest.fixture(scope="module")
def images():
    return make_images(2, 32, 32, seed=5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target", [[1, 3], None], ids=["targets", "predicted"])
def test_every_family_equals_the_explicit_reference(case, target, images):
    builder, pick, rows, prefix, latent, kind = CASES[case]
    model = builder()
    scores, expected, targets = reference_maps(
        model, images, pick, kind, target, rows, prefix, (4, 4), latent
    )
    with torch.no_grad():
        assert_close_relative(scores, pick(call(model, images, kind)).double(), 1e-5)
    # The default: the rows the head reads ('head' for DeiT's WithTeacher, whose default is
    # the paper's [class] row).
    queries = "head" if case == "deit_teacher" else None
    maps = DAAM(model).attribute(
        images, target=target, return_flow=True, accumulate=False, queries=queries
    )
    assert maps.shape == expected.shape
    assert_close_relative(maps, expected, 1e-4)
    # every block contributes somewhere, so the comparison is not one of zeros
    assert bool((expected.flatten(2).amax(2) > 0).all())
    if target is None:
        assert torch.equal(targets, pick(call(model, images, kind)).argmax(1))
    assert module_hook_count(model) == 0


EAGER_CASES = ["beit_mean_pool", "data2vec_shared_bias", "dinov3", "mlcd_vision",
               "clip_vision_projection", "siglip_vision", "aimv2_vision", "deit_teacher"]


@pytest.mark.parametrize("case", EAGER_CASES)
def test_eager_attention_gives_the_reference_too(case, images, monkeypatch):
    """Eager attention gets the mask or bias as an additive float tensor, sdpa as it is."""
    monkeypatch.setitem(IMPLEMENTATION, "name", "eager")
    builder, pick, rows, prefix, latent, kind = CASES[case]
    model = builder()
    assert model.config._attn_implementation == "eager"
    _, expected, _ = reference_maps(model, images, pick, kind, [1, 3], rows, prefix, (4, 4),
                                    latent)
    queries = "head" if case == "deit_teacher" else None
    maps = DAAM(model).attribute(
        images, target=[1, 3], return_flow=True, accumulate=False, queries=queries
    )
    assert_close_relative(maps, expected, 1e-4)


# case, image size, whether the model is called with interpolate_pos_encoding=True
OTHER_SIZES = [
    ("dinov2_registers", (32, 48), False),  # DINOv2 interpolates its positions itself
    ("dinov3", (40, 24), False),  # RoPE on any grid
    ("mlcd_vision", (24, 40), False),
    ("siglip2_vision", (24, 48), False),
    ("idefics3_vision", (48, 40), False),  # positions bucketed for any size
    ("clip_vision_projection", (48, 32), True),
    ("vit_msn", (32, 56), True),
    ("siglip_vision", (40, 40), True),
]


@pytest.mark.parametrize("case,size,interpolate", OTHER_SIZES, ids=[c[0] for c in OTHER_SIZES])
def test_other_image_sizes_where_the_model_takes_them(case, size, interpolate):
    builder, pick, rows, prefix, latent, kind = CASES[case]
    model = builder()
    images = make_images(2, *size, seed=6)
    grid = (size[0] // 8, size[1] // 8)
    if rows is not None and rows != (0,):  # the patch rows move with the grid
        rows = (0,) + tuple(range(prefix, prefix + grid[0] * grid[1]))
    kind = "interpolate" if interpolate else kind
    scores, expected, _ = reference_maps(model, images, pick, kind, [1, 3], rows, prefix, grid,
                                         latent)
    with torch.no_grad():
        assert_close_relative(scores, pick(call(model, images, kind)).double(), 1e-5)
    if interpolate:
        adapter = HFVisionAdapter(model, interpolate_pos_encoding=True)
        daam = DAAM(lambda x: pick(model(x, interpolate_pos_encoding=True)), adapter=adapter)
        with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
            DAAM(model).attribute(images, target=[1, 3])  # the fixed size is refused
    else:
        daam = DAAM(model)
    maps = daam.attribute(images, target=[1, 3], return_flow=True, accumulate=False)
    assert maps.shape == expected.shape == (2, expected.shape[1], *grid)
    assert_close_relative(maps, expected, 1e-4)
    assert bool((expected.flatten(2).amax(2) > 0).all())
    assert module_hook_count(model) == 0


def test_the_default_rows_are_the_rows_the_head_reads():
    expected = {
        "deit_classifier": (0,), "deit_teacher": (0, 1), "beit_mean_pool": TokenRows((), 1),
        "data2vec_own_bias": TokenRows((), 1), "data2vec_shared_bias": (0,),
        "beit_class_token": (0,), "dinov2_classifier": TokenRows((0,), 1),
        "dinov2_registers": TokenRows((0,), 3), "dinov2_model": (0,),
        "dinov3": (0,), "ijepa_classifier": None, "clip_vision_projection": (0,),
        "mlcd_vision": (0,),
        "siglip_vision": None, "aimv2_vision": None,
    }
    for case, rows in expected.items():
        adapter = adapter_for(CASES[case][0]())
        assert isinstance(adapter, HFVisionAdapter), case
        assert adapter.head_queries == rows, case
    assert adapter_for(CASES["siglip_vision"][0]()).latent_query_modules()
    assert adapter_for(CASES["dinov3"][0]()).num_prefix_tokens == 3


def test_the_bias_and_the_rotation_change_the_maps(images):
    """BEiT's bias and DINOv3's rotation reach the maps: without them the reference differs."""
    for case in ("beit_class_token", "dinov3"):
        builder, pick, rows, prefix, latent, kind = CASES[case]
        model = builder()
        with_them = reference_maps(model, images, pick, kind, [1, 3], rows, prefix, (4, 4))[1]
        plain = copy.deepcopy(model)
        for module in plain.modules():
            if hasattr(module, "relative_position_bias_table"):
                nn.init.zeros_(module.relative_position_bias_table)
        if case == "dinov3":  # a model whose rotation is the identity: no rope periods
            plain.rope_embeddings.forward = lambda pixel_values: tuple(
                torch.ones_like(t) if i == 0 else torch.zeros_like(t)
                for i, t in enumerate(model.rope_embeddings(pixel_values))
            )
        without = reference_maps(plain, images, pick, kind, [1, 3], rows, prefix, (4, 4))[1]
        assert (with_them - without).abs().max() > 1e-3 * with_them.abs().max(), case


def test_vit_mae_that_masks_patches_is_refused_before_any_work(images):
    model = build("ViTMAEModel", "ViTMAEConfig")  # mask_ratio 0.75
    with pytest.raises(ValueError, match="mask_ratio = 0.0"):
        DAAM(model).attribute(images, importance=torch.ones(32))
    assert module_hook_count(model) == 0


def test_the_encoder_is_found_inside_image_text_models():
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=dict(SMALL), text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64),
        projection_dim=16,
    ))
    adapter = adapter_for(clip)
    assert isinstance(adapter, HFVisionAdapter)
    assert adapter.encoder is clip.vision_model
    layers = clip.vision_model.encoder.layers
    assert adapter.attention_modules() == [layer.self_attn for layer in layers]


@pytest.mark.parametrize("head", ["classifier", "features"])
def test_timm_models_wrapped_by_transformers_are_explained_directly(head):
    """Hub timm checkpoints load through transformers as TimmWrapperForImageClassification /
    TimmWrapperModel: DAAM finds the timm model inside and reads the output object (logits,
    or the pooled features), giving the maps of the timm model itself."""
    config = transformers.TimmWrapperConfig(architecture="test_vit", num_labels=7)
    torch.manual_seed(0)
    if head == "classifier":
        wrapper = transformers.TimmWrapperForImageClassification(config)
    else:
        wrapper = transformers.TimmWrapperModel(config)
    wrapper = add_parameter_noise(wrapper.eval(), 0.05, 2)
    images = make_images(2, 160, 160, seed=8)
    inner = wrapper.timm_model
    with torch.no_grad():  # the same scores as the timm model's own forward pass
        output = wrapper(images)
        scores = output.logits if head == "classifier" else output.pooler_output
        assert_close_relative(scores, inner(images) if head == "classifier"
                              else inner.forward_head(inner.forward_features(images),
                                                      pre_logits=True), 1e-6)
    maps = DAAM(wrapper).attribute(images, target=[3, 5], return_flow=True)
    if head == "classifier":
        expected = DAAM(inner).attribute(images, target=[3, 5], return_flow=True)
    else:  # the timm model without a classifier returns the pooled features
        expected = DAAM(lambda x: inner.forward_head(inner.forward_features(x), pre_logits=True),
                        adapter=adapter_for(inner)).attribute(images, target=[3, 5],
                                                              return_flow=True)
    assert maps.shape == (2, len(inner.blocks), 10, 10)
    assert torch.equal(maps, expected) and bool((maps[:, -1].flatten(1).amax(1) > 0).all())
    assert module_hook_count(wrapper) == 0


def test_a_detector_holding_a_supported_encoder_is_refused_as_a_detector():
    """OWL-ViT's detector holds an OWL-ViT image-text model: it is refused as a detection
    model before any work, not explained through its encoder."""
    config = transformers.OwlViTConfig(
        vision_config=dict(SMALL),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64),
        projection_dim=16,
    )
    detector = transformers.OwlViTForObjectDetection(config).eval()
    with pytest.raises(TypeError, match="detection model"):
        DAAM(detector)
    assert adapter_for(detector.owlvit).encoder is detector.owlvit.vision_model
    assert module_hook_count(detector) == 0


@pytest.mark.parametrize("case", ["vit_mae", "siglip2_vision"])
def test_the_models_input_hooks_hold_whatever_blocks_are_explained(case, images):
    """ViT-MAE's patch order and SigLIP 2's images-as-patches are model hooks: a flow that
    leaves out the first block gets them too (its map equals the reference's second block)."""
    builder, pick, rows, prefix, latent, kind = CASES[case]
    model = builder()
    _, expected, _ = reference_maps(model, images, pick, kind, [1, 3], rows, prefix, (4, 4),
                                    latent)
    adapter = adapter_for(model)
    second = adapter.attention_modules()[1]
    for _ in range(2):  # the same maps every call: no random patch order
        maps = DAAM(model, layer=second).attribute(images, target=[1, 3], accumulate=False)
        assert_close_relative(maps, expected[:, 1:2], 1e-4)
    assert module_hook_count(model) == 0


def test_siglip2_processor_patches_are_taken_as_the_images_they_make(images):
    """A SigLIP 2 processor's output (patches, their mask and grid) is explained as the images
    its patches make: the same maps as the images themselves."""
    model = CASES["siglip2_vision"][0]()
    modeling = importlib.import_module("transformers.models.siglip2.image_processing_siglip2")
    patches = torch.stack([modeling.convert_image_to_patches(image, 8) for image in images])
    features = transformers.BatchFeature({
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(2, 16, dtype=torch.long),
        "spatial_shapes": torch.tensor([[4, 4], [4, 4]]),
    })
    daam = DAAM(model)
    assert torch.equal(daam.attribute(features, target=[1, 3]),
                       daam.attribute(images, target=[1, 3]))
    features["spatial_shapes"] = torch.tensor([[4, 4], [2, 8]])
    with pytest.raises(ValueError, match="one patch grid for the whole batch"):
        daam.attribute(features, target=[1, 3])


def test_a_classifier_built_without_classes_is_checked_against_its_output():
    """DINOv2's classifier with num_labels=0 returns its [class] token and patch mean side
    by side (2 x 32 features): targets and importance are checked after the forward pass."""
    model = build("Dinov2ForImageClassification", "Dinov2Config", num_labels=0)
    pictures = make_images(2, 32, 32, seed=5)
    assert DAAM(model).attribute(pictures, target=40).shape == (2, 1, 4, 4)
    assert DAAM(model).attribute(pictures, importance=torch.ones(64)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="64 outputs"):
        DAAM(model).attribute(pictures, target=64)
    assert module_hook_count(model) == 0
