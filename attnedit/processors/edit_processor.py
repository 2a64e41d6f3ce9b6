"""The one processor family: the stock attention of each site, with the active edits applied at the attention call.

:func:`make_edit_processor` picks one of two shapes by the family's declaration:

* :class:`StockEditProcessor` (families with a ``layout``): keeps the stock processor and runs its code unchanged;
  its ``dispatch_attention_fn`` call comes here (:mod:`attnedit.processors.stock`) and is edited when edits cover it.
* :class:`ProjectedEditProcessor` (families with ``io``): the family's projection halves around the edited call.

With no edit covering a call both run exactly the stock operations. Under diffusers' Ulysses context parallelism an
edited self/joint call runs its edits inside diffusers' all-to-all, on the whole sequence (:mod:`.ulysses`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from attnedit.core.attention import attend
from attnedit.core.families import AttentionCall, Family, ProcessorCall, Site, TokenLayout
from attnedit.processors.projections import MASKING_BACKENDS, Projected, xformers_attention
from attnedit.processors.stock import call_arguments, call_signature, dispatch, rebound_call, run_stock
from attnedit.processors.ulysses import global_call, ulysses_attention, ulysses_config

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
    """Replaces a diffusers attention processor on one module (a :class:`Site`) while an installation lives."""

    def __init__(self, site: Site, family: Family, installation: EditSource, original: Any) -> None:
        self.site = site
        self.family = family
        self.installation = installation
        self.original = original

    def _active(self) -> bool:
        if self.installation.backend == "reference":
            return True
        step = self.installation.state.step
        return any(e.acts_at(self.site, step) for e in self.installation.edits_at(self.site))

    def _call(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor) -> AttentionCall:
        state = self.installation.state
        info = state.info
        n_image = layout.image_q.stop - layout.image_q.start
        grid = layout.grid or (info.grid if info is not None else (n_image,))
        return AttentionCall(
            site=self.site, family=self.family.name, step=state.step, branches=state.row_branches(q.shape[0]),
            grid=grid, num_queries=q.shape[2], num_keys=k.shape[2], image_queries=layout.image_q,
            image_keys=layout.image_k, text_queries=layout.text_q, text_keys=layout.text_k, device=q.device,
            dtype=q.dtype,
        )

    def _covering(self, call: AttentionCall) -> list[Edit]:
        return [e for e in self.installation.edits_at(self.site) if e.covers(call)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.site.name}, {self.site.kind} layer {self.site.layer})"


class StockEditProcessor(EditProcessor):
    """The stock processor's own code; its dispatcher calls are edited (see :mod:`attnedit.processors.stock`)."""

    # diffusers sets these on processors (set_attention_backend, enable_parallelism): they belong to the stock one
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self._active():
            return self.original(attn, *args, **kwargs)
        self._invocation = (attn, args, kwargs)
        self._dispatches = 0
        return run_stock(self, self.original, attn, args, kwargs)

    def _processor_call(self, index: int) -> ProcessorCall:
        attn, args, kwargs = self._invocation
        return ProcessorCall(self.site, call_arguments(type(self.original), (attn, *args), kwargs), index)

    def edited_attention(self, arguments: dict[str, Any]) -> torch.Tensor:
        """One dispatcher call of the stock code: ``arguments`` as ``dispatch_attention_fn`` takes them."""
        index, self._dispatches = self._dispatches, self._dispatches + 1
        q, k, v = (arguments[name].transpose(1, 2) for name in ("query", "key", "value"))  # (B, H, S, D) views
        layout = self.family.layout(self._processor_call(index), self.installation.state.info, q.shape[2], k.shape[2])
        if layout is None:
            return dispatch(arguments)
        local = self._call(layout, q, k)
        config = arguments.get("parallel_config")
        sharded = ulysses_config(config, self.site, self.family)
        call = global_call(local, sharded) if sharded is not None else local
        active = self._covering(call)
        if not active and self.installation.backend != "reference":
            return dispatch(arguments)
        if arguments.get("scale") is not None:  # the edits' kernels use 1/sqrt(D): fold the processor's scale into q
            q = q * (arguments["scale"] * math.sqrt(q.shape[-1]))
            arguments = {**arguments, "scale": None}
        parallel_model = getattr(self._parallel_config, "context_parallel_config", None) is not None
        if sharded is None and parallel_model and any(e.records for e in active):
            raise ValueError(
                f"{self.site.name}: under context parallelism a rank holds only its shard of this call's queries; "
                "record self/joint attention instead (kinds={'self'} or {'joint'})"
            )
        stock_mask = arguments.get("attn_mask")
        backend = arguments.get("backend")

        def kernel(q, k, v, mask, parallel_config=None):
            chosen = backend
            if mask is not stock_mask and mask is not None and not _applies_masks(backend):
                chosen = "native"  # flash-type backends take no mask: only the calls an edit masked fall back
            out = dispatch({**arguments, "query": q.transpose(1, 2), "key": k.transpose(1, 2),
                            "value": v.transpose(1, 2), "attn_mask": mask, "backend": chosen,
                            "parallel_config": parallel_config})
            return out.transpose(1, 2)

        if sharded is not None:
            out = ulysses_attention(sharded, q, k, v, stock_mask, local, call, active, (kernel, kernel),
                                    self.installation.backend)
        else:
            out = attend(q, k, v, stock_mask, call, active, lambda q, k, v, m: kernel(q, k, v, m, config),
                         self.installation.backend)
        return out.transpose(1, 2)


def _applies_masks(backend: Any) -> bool:
    if backend is None:  # the dispatcher's active backend (set_attention_backend / attention_backend() set it)
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry._active_backend
    return getattr(backend, "value", backend) in MASKING_BACKENDS


class ProjectedEditProcessor(EditProcessor):
    """The family's projection halves (``family.io``) around the edited call, for processors that bypass the
    dispatcher; keeps xFormers where the user enabled it."""

    _attention_backend = None  # copied from the processor it replaces
    _parallel_config = None

    def __init__(self, site: Site, family: Family, installation: EditSource, original: Any) -> None:
        super().__init__(site, family, installation, original)
        self.io = family.io
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        self.attention_op = getattr(original, "attention_op", None)
        # keep the kernel the user chose: enable_xformers_memory_efficient_attention() swaps in XFormers* processors
        xformers = type(original).__name__.startswith("XFormers")
        self.native = xformers_attention if xformers else self.io.native
        self.masked = xformers_attention if xformers else self.io.masked

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        p = self.io.project(attn, hidden_states, encoder_hidden_states, attention_mask, None, temb)
        ulysses_config(self._parallel_config, self.site, self.family)  # refuses context parallelism clearly
        if self._active():
            call = self._call(self._layout(p), p.q, p.k)
            stock_mask = p.mask

            def native(q, k, v, mask):
                return (self.native if mask is stock_mask else self.masked)(q, k, v, mask, self)

            out = attend(p.q, p.k, p.v, p.mask, call, self._covering(call), native, self.installation.backend)
        else:
            out = self.native(p.q, p.k, p.v, p.mask, self)
        return self.io.finish(attn, out, p, self)

    def _layout(self, p: Projected) -> TokenLayout:
        info = self.installation.state.info
        grid = None
        if self.io.level_grid is not None and info is not None:
            grid = self.io.level_grid(info.grid, p.image_q.stop - p.image_q.start)
        return TokenLayout(p.image_q, p.image_k, p.text_q, p.text_k, grid)


_STOCK_CLASSES: dict[type, type] = {}


def make_edit_processor(site: Site, family: Family, installation: EditSource, original: Any) -> EditProcessor:
    """The edit processor for ``site``: projection halves if the family declares them, else the stock code kept.

    The stock-keeping class is made once per stock processor class with the stock ``__call__`` signature, because
    diffusers passes an attention module only the keyword arguments its processor's signature names.
    """
    if family.io is not None:
        return ProjectedEditProcessor(site, family, installation, original)
    stock = type(original)
    if stock not in _STOCK_CLASSES:
        def __call__(self, attn, *args, **kwargs):
            return StockEditProcessor.__call__(self, attn, *args, **kwargs)

        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        signature = call_signature(stock)
        __call__.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
        _STOCK_CLASSES[stock] = type(f"Edit{stock.__name__}", (StockEditProcessor,), {"__call__": __call__})
    rebound_call(stock)  # refuses, at install time, a processor that does not call the dispatcher
    return _STOCK_CLASSES[stock](site, family, installation, original)
