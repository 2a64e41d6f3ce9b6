"""The edit processor family that replaces diffusers' attention processors while edits are installed."""

from attnedit.processors.edit_processor import EditProcessor, make_edit_processor
from attnedit.processors.projections import FamilyIO, Projected

__all__ = ["EditProcessor", "FamilyIO", "Projected", "make_edit_processor"]
