"""Thin pipelines built on stock diffusers pipelines and the edit core (one module per method)."""
