"""Why does this image match this text? Image-text models as classifiers over fixed texts.

:class:`ImageTextSimilarity` wraps an image-text model (Hugging Face ``CLIPModel``,
``SiglipModel``, ``MetaClip2Model``, ``Aimv2Model``, ``VisionTextDualEncoderModel``, or an
open_clip ``CLIP`` / ``CustomTextCLIP``) and a set of texts into a module whose forward maps
images (B, C, H, W) to the model's image-text logits (B, T), one column per text. DAAM then
explains an image's match with text ``t`` as it explains a class score::

    similarity = ImageTextSimilarity(model, input_ids=tokens.input_ids)
    maps = DAAM(similarity).attribute(images, target=t)

The texts are encoded once, when the module is built; each forward pass encodes the images
only and forms the logits as the model does: the cosine similarity of the normalised image and
text embeddings, times the model's ``logit_scale.exp()`` (clamped as AIMv2 clamps it), plus its
``logit_bias`` where it has one (SigLIP's sigmoid logits, before the sigmoid).
"""

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._patches import images_as_patches

__all__ = ["ImageTextSimilarity"]


def _is_open_clip(model: nn.Module) -> bool:
    return type(model).__module__.startswith("open_clip.") and hasattr(model, "encode_image")


def _features(output: Any) -> Tensor:
    """transformers 5's get_*_features return an output object with the projected
    ``pooler_output``; earlier versions, a tensor."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(
        f"Expected the model's feature method to return a tensor or an output with "
        f"pooler_output, got a {type(output).__name__}."
    )


class ImageTextSimilarity(nn.Module):
    r"""
    An image-text model's logits for fixed texts: images (B, C, H, W) -> (B, T).

    Give the texts one way: ``input_ids`` (and ``attention_mask``) as the model's tokenizer
    makes them; ``texts`` as strings with ``tokenizer`` (a transformers tokenizer or
    processor, or open_clip's tokenizer; open_clip models need none for the CLIP vocabulary,
    whose tokenizer ships with open_clip); or ``text_embeddings`` (T, D), the model's text
    features already computed.

    The module's ``num_outputs`` is T, so DAAM checks targets against the texts.

    Args:
        model (torch.nn.Module): the image-text model. A DAAM adapter explains its image
                    tower (found inside it).
        input_ids (Tensor, optional): (T, S) token ids of the texts.
        attention_mask (Tensor, optional): (T, S) their attention mask.
        texts (sequence of str, optional): the texts, with ``tokenizer``.
        tokenizer (callable, optional): turns ``texts`` into token ids.
        text_embeddings (Tensor, optional): (T, D) the model's text features.

    Examples::

        >>> from transformers import CLIPModel, CLIPProcessor
        >>> model = CLIPModel.from_pretrained("openai/clip-vit-base-patch32").eval()
        >>> processor = CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32")
        >>> prompts = ["a photo of a dog", "a photo of a cat"]
        >>> similarity = ImageTextSimilarity(model, texts=prompts, tokenizer=processor)
        >>> images = processor(images=pil_images, return_tensors="pt").pixel_values
        >>> maps = DAAM(similarity).attribute(images, target=0)  # why "a photo of a dog"
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        texts: Optional[Sequence[str]] = None,
        tokenizer: Optional[Callable] = None,
        text_embeddings: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        self.open_clip = _is_open_clip(model)
        if not self.open_clip and not (
            hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
        ):
            raise TypeError(
                f"Expected an image-text model (transformers CLIPModel, SiglipModel, "
                f"MetaClip2Model, Aimv2Model, VisionTextDualEncoderModel, or an open_clip "
                f"CLIP), got a {type(model).__name__} without image and text features."
            )
        given = [
            name for name, value in (
                ("input_ids", input_ids), ("texts", texts), ("text_embeddings", text_embeddings)
            ) if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"Expected the texts one way: input_ids=, texts= (with tokenizer=) or "
                f"text_embeddings=, got {', '.join(given) or 'none'}."
            )
        self.model = model
        if texts is not None:
            input_ids, attention_mask = self._tokenize(texts, tokenizer)
        if input_ids is not None:
            text_embeddings = self._encode_texts(input_ids, attention_mask)
        if not isinstance(text_embeddings, Tensor) or text_embeddings.dim() != 2:
            given = (
                f"shape {tuple(text_embeddings.shape)}" if isinstance(text_embeddings, Tensor)
                else f"a {type(text_embeddings).__name__}"
            )
            raise ValueError(f"Expected text embeddings shaped (T, D), got {given}.")
        if not bool(torch.isfinite(text_embeddings).all()):
            raise ValueError("Expected finite text embeddings, got NaN or infinite values.")
        self.register_buffer(
            "text_embeddings", F.normalize(text_embeddings.detach(), dim=-1), persistent=False
        )

    @property
    def num_outputs(self) -> int:
        """T, the number of texts: the width of the logits."""
        return self.text_embeddings.shape[0]

    def _tokenize(self, texts: Sequence[str], tokenizer: Optional[Callable]):
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise ValueError(
                f"Expected texts as a list of strings, got {type(texts).__name__}."
            )
        if not texts:
            raise ValueError("Expected at least one text, got none.")
        if tokenizer is None:
            if not self.open_clip:
                raise ValueError(
                    "Expected tokenizer= with texts= for a transformers model: its tokenizer "
                    "or processor, e.g. AutoProcessor.from_pretrained(model_folder)."
                )
            from open_clip import tokenize  # the CLIP vocabulary, bundled with open_clip

            return tokenize(list(texts), context_length=self.model.context_length), None
        if self.open_clip:
            return tokenizer(list(texts)), None
        padding = "max_length" if "siglip" in self._model_type() else True
        tokens = tokenizer(text=list(texts), padding=padding, return_tensors="pt")
        return tokens["input_ids"], tokens.get("attention_mask")

    def _model_type(self) -> str:
        return str(getattr(getattr(self.model, "config", None), "model_type", ""))

    @torch.no_grad()
    def _encode_texts(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        if self.open_clip:
            return self.model.encode_text(input_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        return _features(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )

    def logit_scale_and_bias(self):
        """The model's logit scale (as a factor) and bias (or None)."""
        log_scale = self.model.logit_scale
        ceiling = getattr(self.model, "max_log_logit_scale", None)
        if ceiling is not None:  # AIMv2
            log_scale = log_scale.clamp(0.0, ceiling)
        return log_scale.exp(), getattr(self.model, "logit_bias", None)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, D) the model's image features, not normalised. SigLIP 2's images are cut into
        the patches its processor makes (its sides must be multiples of the patch size)."""
        if self.open_clip:
            return self.model.encode_image(images)
        if self._model_type() == "siglip2" and images.dim() == 4:
            patch = self.model.config.vision_config.patch_size
            return _features(self.model.get_image_features(**images_as_patches(images, patch)))
        return _features(self.model.get_image_features(pixel_values=images))

    def forward(self, images: Tensor) -> Tensor:
        """(B, T) the logits of every image with every text."""
        image_embeddings = F.normalize(self.image_embeddings(images), dim=-1)
        scale, bias = self.logit_scale_and_bias()
        texts = self.text_embeddings.to(image_embeddings)
        logits = scale * image_embeddings @ texts.T
        return logits if bias is None else logits + bias
