"""What a dataset's labels mean to a model: the class names a model knows, and a dataset's class
names (image folders, ``datasets.ClassLabel``) matched to them."""

import re
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["LabelMeaning", "model_class_names", "match_class_names"]

_DEFAULT_HF_LABEL = re.compile(r"LABEL_\d+")


def model_class_names(model: Any) -> Optional[List[List[str]]]:
    """The names of each class the model scores, as a list per class index (a class may go by
    several names), or None when the model does not say.

    Read from, in order: a Hugging Face ``config.id2label`` (not its default ``LABEL_0``,
    ...); a timm ``pretrained_cfg`` with ``label_names`` (and ``label_descriptions``); timm's
    ImageNet class information for a model whose ``pretrained_cfg`` and class count name an
    ImageNet subset (``timm.data.infer_imagenet_subset``): the WordNet ids (the folder names
    of ImageNet's train and val folders) and each synonym of the description.
    """
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if isinstance(id2label, dict) and id2label:
        names = [str(id2label[index]) for index in sorted(id2label, key=int)]
        if not all(_DEFAULT_HF_LABEL.fullmatch(name) for name in names):
            return [[name, *_synonyms(name)] for name in names]
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(pretrained_cfg, dict):
        return None
    label_names = pretrained_cfg.get("label_names")
    if label_names:
        descriptions = pretrained_cfg.get("label_descriptions") or {}
        return [[str(name), *_synonyms(descriptions.get(name, ""))] for name in label_names]
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        info = ImageNetInfo(subset)
    except Exception:  # timm without this information, or a config it cannot read
        return None
    if info.num_classes() != getattr(model, "num_classes", info.num_classes()):
        return None
    return [[name, *_synonyms(info.label_name_to_description(name))]
            for name in info.label_names()]


def match_class_names(
    names: Sequence[str], model_classes: Optional[List[List[str]]]
) -> Dict[str, Optional[int]]:
    """Each dataset class name's index among the model's classes: a name matches a class when
    it equals one of the class's names (ignoring case, and ``_`` or ``-`` against spaces) and
    no other class goes by it; None for a name that matches no class, or several."""
    if model_classes is None:
        return {name: None for name in names}
    owners: Dict[str, set] = {}
    for index, aliases in enumerate(model_classes):
        for alias in aliases:
            owners.setdefault(_normalised(alias), set()).add(index)
    matched: Dict[str, Optional[int]] = {}
    for name in names:
        candidates = owners.get(_normalised(name), set())
        matched[name] = next(iter(candidates)) if len(candidates) == 1 else None
    return matched


def _synonyms(description: str) -> List[str]:
    """A description and each of its comma-separated synonyms ("tench, Tinca tinca")."""
    description = description.split(":")[0].strip()
    if not description:
        return []
    parts = [part.strip() for part in description.split(",") if part.strip()]
    return [description, *parts] if len(parts) > 1 else parts


def _normalised(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).casefold().split())


class LabelMeaning:
    """How a dataset's named classes become labels: ``class_to_index`` (each class name's
    label), whether the labels are the model's class indices (``comparable``: accuracy
    against the predictions means something, and ``target="label"`` explains the right
    class), and a sentence saying so (``note``)."""

    def __init__(self, names: Sequence[str], own_indices: Sequence[int],
                 model_classes: Optional[List[List[str]]], what: str, numbering: str) -> None:
        matched = match_class_names(names, model_classes)
        unmatched = [name for name, index in matched.items() if index is None]
        self.model_knows_classes = model_classes is not None
        if self.model_knows_classes and not unmatched:
            self.class_to_index = {name: int(matched[name]) for name in names}
            self.comparable = True
            self.note = f"the model's class indices of the {what}"
        elif names and all(re.fullmatch(r"\d+", str(name)) for name in names):
            self.class_to_index = {name: int(name) for name in names}
            self.comparable = True
            self.note = f"the {what}, which are class indices, read as numbers"
        else:
            self.class_to_index = {name: int(index) for name, index in zip(names, own_indices)}
            self.comparable = not self.model_knows_classes
            if not self.model_knows_classes:
                self.note = f"{numbering} (the model does not name its classes)"
            else:
                self.note = (f"{numbering}: {len(unmatched)} of the {len(names)} {what} are "
                             f"not class names of the model ({_listed(unmatched)}), so the "
                             f"labels are not the model's classes; no accuracy is computed")

    def describe(self) -> Dict[str, Any]:
        return {"meaning": self.note, "model_classes": self.comparable,
                "class_to_index": dict(self.class_to_index)}


def _listed(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
