"""The one processor: stock projections of its family, attention with the active edits, stock output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from attnedit.core.attention import attend
from attnedit.core.families import AttentionCall, Site, unet_grid
from attnedit.processors.projections import IO, Projected, xformers_attention
from attnedit.processors.ulysses import Unsharded, global_call, ulysses_attention, ulysses_config

if TYPE_CHECKING:
    from attnedit.core.edits import Edit


class EditSource(Protocol):
    """What a processor reads from the installation that owns it (``attnedit.core.install.Installation``).

    A protocol, so the processor layer does not import the installer that imports it.
    """

    backend: str
    state: Any  # RunState: step, branch and the denoiser's ForwardInfo of the current call

    def edits_at(self, site: Site) -> Sequence[Edit]: ...


class EditProcessor:
    """Replaces a diffusers attention processor on one module (a :class:`Site`) while an installation lives.

    With no edit covering the call it runs exactly the stock processor's operations. Under diffusers' Ulysses
    context parallelism (``_parallel_config``, set by ``enable_parallelism``) an edited self/joint call runs its
    edits inside diffusers' all-to-all, on the whole sequence (see :mod:`attnedit.processors.ulysses`).
    """

    _attention_backend = None  # copied from the processor it replaces (diffusers' dispatcher backends)
    _parallel_config = None

    def __init__(self, site: Site, family: str, installation: EditSource, original: Any) -> None:
        self.site = site
        self.family = family
        self.io = IO[family]
        self.installation = installation
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        self.attention_op = getattr(original, "attention_op", None)
        # keep the kernel the user chose: enable_xformers_memory_efficient_attention() swaps in XFormers* processors
        xformers = type(original).__name__.startswith("XFormers")
        self.native = xformers_attention if xformers else self.io.native
        # a key mask an edit adds goes to a kernel that applies it (flash-type dispatcher backends take none)
        self.masked = xformers_attention if xformers else self.io.masked

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        temb: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        rotary = rotary_emb if rotary_emb is not None else image_rotary_emb
        text_tokens = 0
        if self.site.stream == "single" and self.family == "flux":  # joined [text, image]: length from the inputs
            text_tokens = self.installation.state.info.text_tokens
        p = self.io.project(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens)
        edits = self.installation.edits_at(self.site)
        sharded = ulysses_config(self)  # context parallelism splits this call's tokens across ranks
        # cross-attention under context parallelism: local queries, whole text keys, no all-to-all (as stock Wan)
        kernel_owner = self if sharded is not None or self._parallel_config is None else Unsharded(self)
        if edits or self.installation.backend == "reference":
            call = self._call(p)
            if sharded is not None:
                call = global_call(call, sharded)
            active = [e for e in edits if e.covers(call)]
            if sharded is not None and (active or self.installation.backend == "reference"):
                out = ulysses_attention(self, p, call, active)  # the edits run on the whole sequence, local heads
                return self.io.finish(attn, out, p, self)
            if kernel_owner is not self and any(e.records for e in active):
                raise ValueError(
                    f"{self.site.name}: under context parallelism a rank holds only its shard of this call's queries; "
                    "record self/joint attention instead (kinds={'self'} or {'joint'})"
                )
            stock_mask = p.mask

            def native(q, k, v, mask):
                return (self.native if mask is stock_mask else self.masked)(q, k, v, mask, kernel_owner)

            out = attend(p.q, p.k, p.v, p.mask, call, active, native, self.installation.backend)
        else:
            out = self.native(p.q, p.k, p.v, p.mask, kernel_owner)
        return self.io.finish(attn, out, p, self)

    def _call(self, p: Projected) -> AttentionCall:
        state = self.installation.state
        info = state.info
        n_image = p.image_q.stop - p.image_q.start
        grid = info.grid if info is not None else (n_image,)
        if self.family == "unet" and info is not None:
            grid = unet_grid(info.grid, n_image)
        return AttentionCall(
            site=self.site, family=self.family, step=state.step, branches=state.row_branches(p.q.shape[0]),
            grid=grid, num_queries=p.q.shape[2], num_keys=p.k.shape[2], image_queries=p.image_q,
            image_keys=p.image_k, text_queries=p.text_q, text_keys=p.text_k, device=p.q.device, dtype=p.q.dtype,
        )

    def __repr__(self) -> str:
        return f"EditProcessor({self.site.name}, {self.site.kind} layer {self.site.layer})"
