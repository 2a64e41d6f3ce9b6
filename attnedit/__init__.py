"""attnedit: edit what diffusion models attend to, with composable edits on diffusers' attention modules."""

from .attention import BACKENDS, dense_attention
from .edits import AttentionRecorder, BlockMask, Edit, HeadBlend, KeyMask, RecordedMap
from .families import FAMILIES, AttentionCall, Site, detect_family
from .install import Installation, install

__version__ = "0.1.0"

__all__ = [
    "AttentionCall", "AttentionRecorder", "BACKENDS", "BlockMask", "Edit", "FAMILIES", "HeadBlend", "Installation",
    "KeyMask", "RecordedMap", "Site", "dense_attention", "detect_family", "install",
]
