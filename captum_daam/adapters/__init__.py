"""Model-family adapters and the registry that picks one for a model.

Importing this package registers every family below; transformers is not imported (the
Hugging Face adapter recognises its models only once the user has loaded transformers).
"""

from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    ViTAdapter,
    adapter_for,
    explained_model,
    forward_module,
    register_adapter,
    supported_families,
)
from .generic import GenericAdapter
from .hf import HFViTAdapter, HFVisionAdapter
from .hf_hiera import HFHieraAdapter
from .hf_pvt import HFPvtAdapter, HFPvtV2Adapter
from .hf_swin import HFSwinAdapter
from .open_clip import OpenClipVisionTransformerAdapter
from .pooled import PooledAdapter
from .timm_beit import TimmBeitAdapter
from .timm_cait import TimmCaitAdapter
from .timm_coat import TimmCoatAdapter
from .timm_convit import TimmConvitAdapter
from .timm_crossvit import TimmCrossVitAdapter
from .timm_davit import TimmDaVitAdapter
from .timm_efficientformer import TimmEfficientFormerAdapter
from .timm_efficientformer_v2 import TimmEfficientFormerV2Adapter
from .timm_efficientvit_msra import TimmEfficientVitMsraAdapter
from .timm_eva import TimmEvaAdapter
from .timm_fastvit import TimmFastVitAdapter
from .timm_gcvit import TimmGcVitAdapter
from .timm_gemma4 import TimmGemma4VitAdapter
from .timm_hiera import TimmHieraAdapter
from .timm_hieradet import TimmHieraDetAdapter
from .timm_levit import TimmLevitAdapter
from .timm_maxxvit import TimmMaxxVitAdapter
from .timm_metaformer import TimmMetaFormerAdapter
from .timm_mobilenetv4 import TimmMobileNetV4HybridAdapter
from .timm_mobilevit import TimmMobileVitAdapter
from .timm_mvitv2 import TimmMvitv2Adapter
from .timm_naflexvit import TimmNaFlexVitAdapter
from .timm_nest import TimmNestAdapter
from .timm_nextvit import TimmNextVitAdapter
from .timm_pit import TimmPitAdapter
from .timm_pvt_v2 import TimmPvtV2Adapter
from .timm_relpos import TimmRelPosAdapter
from .timm_sam import TimmSamAdapter
from .timm_swin import TimmSwinAdapter
from .timm_tiny_vit import TimmTinyVitAdapter
from .timm_tnt import TimmTntAdapter
from .timm_twins import TimmTwinsAdapter
from .timm_visformer import TimmVisformerAdapter
from .timm_vlm_towers import TimmDeepseekVitAdapter, TimmQwen3VitAdapter
from .timm_vit import TimmAdapter, TimmVisionTransformerAdapter
from .timm_volo import TimmVoloAdapter
from .timm_xcit import TimmXcitAdapter
from .torchvision_maxvit import TorchvisionMaxVitAdapter
from .torchvision_swin import TorchvisionSwinAdapter
from .torchvision_vit import TorchvisionVisionTransformerAdapter

__all__ = [
    "BlockLayout",
    "BlockRecord",
    "Hook",
    "ViTAdapter",
    "adapter_for",
    "explained_model",
    "forward_module",
    "register_adapter",
    "supported_families",
    "GenericAdapter",
    "HFSwinAdapter",
    "HFHieraAdapter",
    "HFPvtAdapter",
    "HFPvtV2Adapter",
    "HFViTAdapter",
    "HFVisionAdapter",
    "OpenClipVisionTransformerAdapter",
    "PooledAdapter",
    "TimmAdapter",
    "TimmBeitAdapter",
    "TimmCaitAdapter",
    "TimmCoatAdapter",
    "TimmConvitAdapter",
    "TimmCrossVitAdapter",
    "TimmDaVitAdapter",
    "TimmEfficientFormerAdapter",
    "TimmEfficientFormerV2Adapter",
    "TimmEfficientVitMsraAdapter",
    "TimmEvaAdapter",
    "TimmFastVitAdapter",
    "TimmGcVitAdapter",
    "TimmGemma4VitAdapter",
    "TimmHieraAdapter",
    "TimmHieraDetAdapter",
    "TimmLevitAdapter",
    "TimmMaxxVitAdapter",
    "TimmMetaFormerAdapter",
    "TimmMobileNetV4HybridAdapter",
    "TimmMobileVitAdapter",
    "TimmMvitv2Adapter",
    "TimmNaFlexVitAdapter",
    "TimmNestAdapter",
    "TimmNextVitAdapter",
    "TimmPitAdapter",
    "TimmPvtV2Adapter",
    "TimmRelPosAdapter",
    "TimmSamAdapter",
    "TimmSwinAdapter",
    "TimmTinyVitAdapter",
    "TimmTntAdapter",
    "TimmTwinsAdapter",
    "TimmVisionTransformerAdapter",
    "TimmVisformerAdapter",
    "TimmQwen3VitAdapter",
    "TimmDeepseekVitAdapter",
    "TimmVoloAdapter",
    "TimmXcitAdapter",
    "TorchvisionMaxVitAdapter",
    "TorchvisionSwinAdapter",
    "TorchvisionVisionTransformerAdapter",
]
