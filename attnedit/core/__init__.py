"""The engine: edits (what to change), the attention call that applies them, installation on diffusers models,
family adapters, block-sparse attention and context parallelism. Every method builds on these."""
