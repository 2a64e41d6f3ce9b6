"""The edit processor family that replaces diffusers' attention processors while edits are installed."""

from attnedit.processors.edit_processor import EditProcessor
from attnedit.processors.projections import IO, Projected

__all__ = ["IO", "EditProcessor", "Projected"]
