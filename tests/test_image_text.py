"""ImageTextSimilarity: an image-text model's logits for fixed texts as a module, and DAAM
explaining why an image matches a text.

The module's logits are checked against each model's own forward pass (``logits_per_image``
of transformers' CLIPModel, SiglipModel, MetaClip2Model, Aimv2Model and
VisionTextDualEncoderModel; open_clip's CLIP features, scale and bias). DAAM's maps for a text
are checked against the float64 reference of tests/test_adapter_hf_families.py run through the
model's own image-text forward pass: every attention layer of the image tower written out,
autograd from the text's logit.
"""

import copy
import json

import open_clip
import pytest
import torch
from torch import nn

import transformers

from captum_daam import DAAM, ImageTextSimilarity
from helpers import add_parameter_noise, assert_close_relative, make_images, module_hook_count
from reference import maps_from_every_query_row
from test_adapter_hf_families import (
    SMALL,
    explicit_aimv2_head,
    explicit_layer_forward,
    explicit_siglip_head,
)

VISION = dict(SMALL)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=99, max_position_embeddings=16)
TEXTS = 3


def hf_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
        model = transformers.CLIPModel(config)
    elif kind == "siglip":
        config = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)
        model = transformers.SiglipModel(config)
    elif kind == "metaclip_2":
        config = transformers.MetaClip2Config(
            vision_config=VISION, text_config=TEXT, projection_dim=16
        )
        model = transformers.MetaClip2Model(config)
    elif kind == "aimv2":
        config = transformers.Aimv2Config(
            vision_config=dict(VISION, use_head=True), text_config=TEXT, projection_dim=16
        )
        model = transformers.Aimv2Model(config)
    elif kind in CLIP_LIKE:
        text = dict(TEXT, project_dim=16, pad_token_id=1, max_position_embeddings=20) if (
            kind == "altclip") else TEXT
        config_class, model_class = CLIP_LIKE[kind]
        config = getattr(transformers, config_class)(
            vision_config=VISION, text_config=text, projection_dim=16
        )
        model = getattr(transformers, model_class)(config)
    else:  # a dual encoder: a CLIP vision tower and a BERT text tower
        config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
            transformers.CLIPVisionConfig(**VISION),
            transformers.BertConfig(**TEXT),
            projection_dim=16,
        )
        model = transformers.VisionTextDualEncoderModel(config)
    return add_parameter_noise(model.eval(), 0.2, 3)


def text_tokens(model: nn.Module):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 90, (TEXTS, 7), generator=generator)
    input_ids[:, -1] = 98 if "siglip" in model.config.model_type else input_ids[:, -1]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    if "siglip" in model.config.model_type:
        return input_ids, None  # SigLIP's text tower takes no mask: its texts are padded
    return input_ids, attention_mask


#: Image-text families built like CLIP: (config class, model class).
CLIP_LIKE = {
    "altclip": ("AltCLIPConfig", "AltCLIPModel"),
    "chinese_clip": ("ChineseCLIPConfig", "ChineseCLIPModel"),
    "clipseg": ("CLIPSegConfig", "CLIPSegModel"),
    "owlvit": ("OwlViTConfig", "OwlViTModel"),
    "owlv2": ("Owlv2Config", "Owlv2Model"),
}
HF_KINDS = ["clip", "siglip", "metaclip_2", "aimv2", "dual_encoder", *CLIP_LIKE]


@pytest.fixture(scope="module")
def images():
    return make_images(2, 32, 32, seed=7)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_the_logits_are_the_models_own(kind, images):
    model = hf_model(kind)
    input_ids, attention_mask = text_tokens(model)
    similarity = ImageTextSimilarity(model, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        expected = model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=images
        ).logits_per_image
        assert_close_relative(similarity(images), expected, 1e-5)
    assert similarity.num_outputs == TEXTS


def explicit_image_text_maps(model, images, input_ids, attention_mask, target):
    """Reference flow of the image-text logit ``target`` (per image): a float64 copy of the
    model whose image tower's attention is written out, run through its own forward pass."""
    model = copy.deepcopy(model).double()
    blocks = []
    for module in model.vision_model.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.forward = explicit_siglip_head(module, blocks)
        elif hasattr(module, "output_proj") and hasattr(module, "cls_token"):
            module.forward = explicit_aimv2_head(module, blocks)
        elif hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            module.forward = explicit_layer_forward(module, blocks)
    with torch.enable_grad():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=images.double()
        ).logits_per_image
        score = logits[torch.arange(len(target)), torch.tensor(target)].sum()
        gradients = torch.autograd.grad(score, [block["pre_projection"] for block in blocks])
    latent = model.vision_model.config.model_type.startswith(("siglip", "aimv2"))
    prefix = 0 if latent else 1
    maps = []
    for index, (block, gradient) in enumerate(zip(blocks, gradients)):
        if not latent:  # CLIP's image embedding is its [class] token: the [class] rows
            block, gradient = dict(block, attn=block["attn"][:, :, :1]), gradient[:, :1]
        maps.append(maps_from_every_query_row([block], [gradient], prefix, (4, 4))["block_maps"])
    return logits, torch.cat(maps, dim=1)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_daam_explains_why_an_image_matches_a_text(kind, images):
    model = hf_model(kind)
    input_ids, attention_mask = text_tokens(model)
    target = [2, 0]
    logits, expected = explicit_image_text_maps(model, images, input_ids, attention_mask, target)
    similarity = ImageTextSimilarity(model, input_ids=input_ids, attention_mask=attention_mask)
    daam = DAAM(similarity)
    maps = daam.attribute(images, target=target, return_flow=True, accumulate=False)
    assert maps.shape == expected.shape
    assert_close_relative(maps, expected, 1e-4)
    assert bool((expected.flatten(2).amax(2) > 0).all())
    assert module_hook_count(model) == 0


def test_zero_shot_over_many_prompts_takes_a_target_among_the_prompts(images):
    model = hf_model("clip")
    prompts = torch.randn(1000, 16, generator=torch.Generator().manual_seed(2))
    similarity = ImageTextSimilarity(model, text_embeddings=prompts)
    maps = DAAM(similarity).attribute(images, target=900)
    assert maps.shape == (2, 1, 4, 4) and bool(torch.isfinite(maps).all())
    with pytest.raises(ValueError, match="1000"):
        DAAM(similarity).attribute(images, target=1000)
    assert module_hook_count(model) == 0


def test_texts_are_given_one_way():
    model = hf_model("clip")
    input_ids, _ = text_tokens(model)
    with pytest.raises(ValueError, match="one way"):
        ImageTextSimilarity(model, input_ids=input_ids, text_embeddings=torch.ones(2, 16))
    with pytest.raises(ValueError, match="one way.*none"):
        ImageTextSimilarity(model)
    with pytest.raises(ValueError, match="tokenizer="):
        ImageTextSimilarity(model, texts=["a dog"])
    with pytest.raises(TypeError, match="image-text model"):
        ImageTextSimilarity(nn.Linear(2, 2), text_embeddings=torch.ones(2, 16))
    with pytest.raises(ValueError, match=r"\(T, D\)"):
        ImageTextSimilarity(model, text_embeddings=torch.ones(16))


def tiny_clip_tokenizer(folder) -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer over a handful of words, written to ``folder`` (no download)."""
    words = ["a</w>", "dog</w>", "cat</w>", "photo</w>", "of</w>"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({word: index for index, word in enumerate(words, start=2)})
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_texts_as_strings_with_the_models_tokenizer(tmp_path, images):
    model = hf_model("clip")
    tokenizer = tiny_clip_tokenizer(tmp_path)
    texts = ["a photo of a dog", "a cat"]
    similarity = ImageTextSimilarity(model, texts=texts, tokenizer=tokenizer)
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(pixel_values=images, **tokens).logits_per_image
        assert_close_relative(similarity(images), expected, 1e-5)


def open_clip_model() -> nn.Module:
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(width=32, layers=2, head_width=16, image_size=32, patch_size=8),
        text_cfg=dict(width=32, layers=1, heads=2, context_length=77, vocab_size=49408),
        init_logit_bias=-2.0,
    )
    return add_parameter_noise(model.eval(), 0.05, 3)


def test_open_clip_logits_and_texts_with_its_bundled_tokenizer(images):
    model = open_clip_model()
    texts = ["a photo of a dog", "a photo of a cat", "a diagram"]
    similarity = ImageTextSimilarity(model, texts=texts)
    tokens = open_clip.tokenize(texts)
    with torch.no_grad():
        image_features, text_features, scale, bias = model(images, tokens)
        expected = scale * image_features @ text_features.T + bias
        assert_close_relative(similarity(images), expected, 1e-5)
    maps = DAAM(similarity).attribute(images, target=[0, 2], return_flow=True)
    assert maps.shape == (2, 2, 4, 4) and bool(torch.isfinite(maps).all())
    assert bool((maps[:, -1].flatten(1).amax(1) > 0).all())
    assert module_hook_count(model) == 0


def test_open_clip_with_a_timm_trunk(images):
    """An open_clip CLIP whose image tower is a timm model (TimmModel: the trunk, then a
    projection): the timm adapter is found for the trunk, and the logits are the model's."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(timm_model_name="test_vit", timm_model_pretrained=False,
                        timm_pool="", timm_proj="linear", image_size=160),
        text_cfg=dict(width=32, layers=1, heads=2, context_length=77, vocab_size=49408),
    )
    model = add_parameter_noise(model.eval(), 0.05, 3)
    pictures = make_images(2, 160, 160, seed=9)
    texts = ["a photo of a dog", "a diagram"]
    similarity = ImageTextSimilarity(model, texts=texts)
    with torch.no_grad():
        image_features, text_features, scale = model(pictures, open_clip.tokenize(texts))
        assert_close_relative(similarity(pictures), scale * image_features @ text_features.T,
                              1e-5)
    daam = DAAM(similarity)
    assert daam.adapter.model is model.visual.trunk
    maps = daam.attribute(pictures, target=[1, 0], return_flow=True)
    assert maps.shape == (2, len(model.visual.trunk.blocks), 10, 10)
    assert bool((maps[:, -1].flatten(1).amax(1) > 0).all())
    assert module_hook_count(model) == 0


def test_siglip2_logits_from_images():
    """SigLIP 2 takes patches: ImageTextSimilarity cuts images into the patches its processor
    makes, outside DAAM as inside, and its logits are the model's own on those patches."""
    import importlib

    torch.manual_seed(0)
    config = transformers.Siglip2Config(vision_config=dict(VISION, num_patches=16),
                                        text_config=TEXT)
    model = add_parameter_noise(transformers.Siglip2Model(config).eval(), 0.2, 3)
    pictures = make_images(2, 32, 32, seed=7)
    input_ids, _ = text_tokens(model)
    similarity = ImageTextSimilarity(model, input_ids=input_ids)
    modeling = importlib.import_module("transformers.models.siglip2.image_processing_siglip2")
    patches = torch.stack([modeling.convert_image_to_patches(image, 8) for image in pictures])
    with torch.no_grad():
        expected = model(
            input_ids=input_ids, pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
        ).logits_per_image
        assert_close_relative(similarity(pictures), expected, 1e-5)
    maps = DAAM(similarity).attribute(pictures, target=[2, 0], return_flow=True)
    assert maps.shape == (2, 3, 4, 4) and bool((maps[:, -1].flatten(1).amax(1) > 0).all())
    assert module_hook_count(model) == 0
