"""attnedit: edit what diffusion models attend to, with composable edits on diffusers' attention modules.

Folders: ``core/`` (edits, attention, installation), ``processors/``, ``methods/`` (one per method),
``pipelines/`` (thin runners), ``models/`` (architectures, tiny zoo), ``shapes/`` (world, trained models),
``surfaces/`` (CLI, batch, app). Old flat paths (``attnedit.zoo``) still import: :mod:`attnedit.compat`.
"""

from attnedit.compat import install_aliases
from attnedit.core.attention import BACKENDS, dense_attention
from attnedit.core.edits import AttentionRecorder, BlockMask, Edit, HeadBlend, KeyMask, RecordedMap
from attnedit.core.families import FAMILIES, AttentionCall, Site, detect_family
from attnedit.core.install import Installation, install

install_aliases()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FAMILIES",
    "AttentionCall",
    "AttentionRecorder",
    "BlockMask",
    "Edit",
    "HeadBlend",
    "Installation",
    "KeyMask",
    "RecordedMap",
    "Site",
    "dense_attention",
    "detect_family",
    "install",
]
