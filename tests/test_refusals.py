"""Refusals that help: a model no adapter takes is refused in at most three lines (why, the
nearest route, where the supported families are listed), video and detection models are named
as such, `captum-daam check --list` lists the families, and an image-text model given whole is
refused at construction with the routes to explain it."""

import re

import pytest
import timm
import torch
import transformers
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

import captum_daam.attr.base as attribution_base
from captum_daam import DAAM, AttentionRollout, GradientRollout
from captum_daam.adapters import supported_families
from captum_daam.cli import main
from helpers import module_hook_count
from test_adapter_generic import make_t2t

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


class Mixer(nn.Module):
    """Tokens mixed by nn.MultiheadAttention: attention, but not timm-style."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mix(tokens, tokens, tokens)[0].mean(1)


def resnest() -> nn.Module:
    with torch.device("meta"):
        return timm.create_model("resnest14d", pretrained=False)


def videomae() -> nn.Module:
    config = transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, num_labels=3, **SMALL
    )
    return transformers.VideoMAEForVideoClassification(config)


def timesformer() -> nn.Module:
    config = transformers.TimesformerConfig(
        image_size=32, patch_size=8, num_frames=2, num_labels=3, **SMALL
    )
    return transformers.TimesformerForVideoClassification(config)


def vivit() -> nn.Module:
    config = transformers.VivitConfig(
        image_size=32, num_frames=4, tubelet_size=[2, 8, 8], num_labels=3, **SMALL
    )
    return transformers.VivitForVideoClassification(config)


def detr() -> nn.Module:
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]
    )
    config = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
    )
    return transformers.DetrForObjectDetection(config)


def yolos() -> nn.Module:
    config = transformers.YolosConfig(
        image_size=[32, 32], patch_size=8, num_detection_tokens=3, **SMALL
    )
    return transformers.YolosForObjectDetection(config)


# name: (model, what the first line says, what the route says)
UNSUPPORTED = {
    "cnn": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        "It has no attention module .*: a convolutional or MLP model",
        "LayerGradCam .*subclass captum_daam.adapters.ViTAdapter",
    ),
    "channel_attention": (
        resnest,
        "Its attention modules mix no tokens \\(SplitAttn: .*\\): in DAAM's terms a "
        "convolutional model",
        "LayerGradCam",
    ),
    "timm_style_attention": (
        make_t2t,
        "Its attention modules \\(Attention\\) are of no supported family",
        "timm-style .*GenericAdapter\\(attention_modules=\\[...\\], num_prefix_tokens=1, "
        "head_queries='class'\\)",
    ),
    "other_attention": (
        Mixer,
        "Its attention modules \\(MultiheadAttention\\) are of no supported family",
        "subclass captum_daam.adapters.ViTAdapter for this attention .*register_adapter",
    ),
    "videomae": (videomae, "a video model \\(model_type 'videomae'\\)", "frames .*image model"),
    "timesformer": (timesformer, "a video model \\(model_type 'timesformer'\\)", "frames"),
    "vivit": (vivit, "a video model \\(model_type 'vivit'\\)", "frames .*image model"),
    "wrapped_video": (
        lambda: nn.Sequential(nn.Identity(), videomae()),
        "a video model \\(model_type 'videomae'\\)",
        "frames .*image model",
    ),
    "detr": (detr, "a detection model \\(model_type 'detr'\\): it outputs boxes", "classifier"),
    "yolos": (yolos, "a detection model \\(model_type 'yolos'\\): it outputs boxes", "ViTAdapter"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_an_unsupported_model_is_refused_in_three_lines(name):
    """Why (naming the attention classes, or the kind of model), the nearest route, and where
    the families are listed, instead of the list itself; nothing left on the model."""
    make_model, reason, route = UNSUPPORTED[name]
    model = make_model()
    for method in (DAAM, AttentionRollout):
        with pytest.raises(TypeError) as raised:
            method(model)
        lines = str(raised.value).splitlines()
        assert len(lines) == 3, lines
        first = f"DAAM has no adapter for a model of type {type(model).__name__}. "
        assert lines[0].startswith(first) and re.search(reason, lines[0]), lines[0]
        assert lines[1].startswith("Nearest route: ") and re.search(route, lines[1]), lines[1]
        assert "`captum-daam check --list`" in lines[2]
        assert not any(family in str(raised.value) for family in supported_families())
    assert module_hook_count(model) == 0


def test_check_list_prints_the_supported_families_one_per_line(capsys):
    assert main(["check", "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == supported_families()


# ----------------------------------------------------------------------------- image-text models


def clip() -> nn.Module:
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=1, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL),
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


def siglip() -> nn.Module:
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=99, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL),
    )
    return transformers.SiglipModel(config)


def dual_encoder() -> nn.Module:
    """A ViT and a BERT: its vision model is a ViTModel, which an adapter takes, so without
    the refusal DAAM would be built and the forward would fail in transformers."""
    config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
        transformers.ViTConfig(image_size=32, patch_size=8, **SMALL),
        transformers.BertConfig(vocab_size=99, **SMALL),
        projection_dim=16,
    )
    return transformers.VisionTextDualEncoderModel(config)


def open_clip_model() -> nn.Module:
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    return CLIP(16, vision, text)


IMAGE_TEXT = {  # name: (model, the image tower the message points to)
    "clip": (clip, "model.vision_model"),
    "siglip": (siglip, "model.vision_model"),
    "vision_text_dual_encoder": (dual_encoder, "model.vision_model"),
    "open_clip": (open_clip_model, "model.visual"),
}


@pytest.mark.parametrize("name", sorted(IMAGE_TEXT))
def test_an_image_text_model_given_whole_is_refused_at_construction(name, monkeypatch):
    make_model, tower = IMAGE_TEXT[name]
    model = make_model().eval()

    def no_work(*args, **kwargs):
        raise AssertionError("the adapter was looked up before the refusal")

    monkeypatch.setattr(attribution_base, "adapter_for", no_work)
    for method in (DAAM, AttentionRollout, GradientRollout):
        for given in (model, nn.DataParallel(model)):
            with pytest.raises(TypeError) as raised:
                method(given)
            message = str(raised.value)
            assert "\n" not in message
            assert message.startswith(f"Expected an image model, got a {type(model).__name__}, ")
            assert "texts" in message
            assert "captum_daam.ImageTextSimilarity(model, input_ids=...)" in message
            assert f"{method.__name__}({tower})" in message
    assert module_hook_count(model) == 0


def test_a_vision_language_model_is_refused_naming_its_vision_tower():
    """A vision-language model (LLaVA: a CLIP tower and a language model) takes token ids
    first: it is refused before any work, naming the tower DAAM explains."""
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=64, num_key_value_heads=2),
        projector_hidden_act="gelu",
    )
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with pytest.raises(TypeError, match=r"token ids first .*DAAM\(model\.model\.vision_tower"):
        DAAM(model)
    assert module_hook_count(model) == 0
