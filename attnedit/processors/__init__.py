"""The edit processor family that replaces diffusers' attention processors while edits are installed."""

from .edit_processor import EditProcessor
from .projections import IO, Projected

__all__ = ["IO", "EditProcessor", "Projected"]
