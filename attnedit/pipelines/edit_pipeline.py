"""One call, every method: a pipeline made with ``from_pipe`` whose ``__call__`` composes attnedit's edits.

>>> pipe = AttnEditPipeline.from_pipe(sd_pipe)            # shares sd_pipe's modules; isinstance(pipe, type(sd_pipe))  # doctest: +SKIP
>>> image = pipe(layout=layout, pag_heads="L7", pag_scale=3.0, key_mask=hole).images[0]  # doctest: +SKIP

The returned object is an instance of a subclass of the stock pipeline's class (``AttnEditStableDiffusionPipeline``
for ``StableDiffusionPipeline``, made once per stock class), built by diffusers' own ``DiffusionPipeline.from_pipe``,
so every component is the same object as in the stock pipeline and no weight is copied. Its ``__call__`` takes the
stock call's arguments plus the keyword options below, installs the edits for the duration of the call (processors
and hooks are restored on exit, also on exceptions) and runs the stock ``__call__``, or
:func:`attnedit.pipelines.refocusing.refocus` when ``layout=`` is given. With no option set it *is* the stock call.

=================  ===============================================================================================
option             method
=================  ===============================================================================================
``layout``         attention refocusing toward a :class:`~attnedit.methods.refocusing.Layout` (SD 1.x, SDXL, SD3, FLUX.1);
                   ``refocus_config`` (a ``RefocusConfig``) and ``refocus_options`` (other ``refocus`` keywords,
                   e.g. ``return_losses``) tune it
``pag_heads``      head-level SoftPAG guidance on these heads (:func:`~attnedit.methods.head_guidance.perturbed_guidance`);
                   ``pag_scale`` (w_pag), ``pag_strength`` (u), ``pag_options`` (``steps``, ``target``, ...)
``key_mask``       a :class:`~attnedit.core.edits.KeyMask`, or a mask (tensor, array, PIL image; (H, W) or video
                   (F, H, W), 1 = hidden) that becomes ``KeyMask(mask=...)``
``radial``         radial sparse attention (Wan, HunyuanVideo): ``True`` (the family's preset), a preset name, a
                   dict of preset overrides, or a :class:`~attnedit.methods.radial.RadialAttention`
``edits``          further edits of your own, installed with the others
``edit_backend``   the attention backend of the installation (``"auto"``, ``"reference"``, ...)
=================  ===============================================================================================
"""

from __future__ import annotations

import contextvars
import inspect
import json
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from diffusers import DiffusionPipeline

from attnedit.core.attention import BACKENDS
from attnedit.core.checks import as_mask, is_int
from attnedit.core.edits import Edit, KeyMask, mask_coverage
from attnedit.core.install import install
from attnedit.families import detect_family, get_family
from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.methods.radial import RadialAttention
from attnedit.methods.refocusing import Layout, RefocusConfig
from attnedit.models.zoo import denoiser
from attnedit.pipelines.radial import check_overrides, default_preset
from attnedit.pipelines.refocusing import refocus, refocus_hooks

__all__ = ["OPTIONS", "AttnEditPipeline", "edit_pipeline_class"]

# The keyword options the edit pipeline's __call__ adds to the stock call, with their "not set" values.
OPTIONS: dict[str, Any] = {
    "layout": None, "refocus_config": None, "refocus_options": None,
    "pag_heads": None, "pag_scale": None, "pag_strength": None, "pag_options": None,
    "key_mask": None, "radial": None, "edits": (), "edit_backend": "auto",
}
_CLASSES: dict[type, type] = {}
_KEEP_DTYPE = contextvars.ContextVar("attnedit_keep_dtype", default=False)


class AttnEditPipeline:
    """Mixin of every edit pipeline; ``AttnEditPipeline.from_pipe(pipe)`` makes one from a stock pipeline."""

    _attnedit_stock: type  # the stock pipeline class, set on each generated subclass

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        """An edit pipeline sharing ``pipeline``'s components (diffusers' ``from_pipe``; no weight is copied).

        Unlike diffusers' ``from_pipe``, the shared modules keep their dtype unless ``torch_dtype=`` is passed:
        diffusers casts to float32 by default, in place, which would change the stock pipeline too.
        """
        if "custom_pipeline" in kwargs:
            raise ValueError("custom_pipeline= is not supported: the edit pipeline is a subclass of the stock pipeline's class")
        _check_pipeline(pipeline)
        target = edit_pipeline_class(type(pipeline)) if cls is AttnEditPipeline else cls
        token = _KEEP_DTYPE.set("torch_dtype" not in kwargs and "dtype" not in kwargs)
        try:
            new = DiffusionPipeline.from_pipe.__func__(target, pipeline, **kwargs)
        finally:
            _KEEP_DTYPE.reset(token)
        if getattr(pipeline, "_progress_bar_config", None) is not None:  # not part of the config: carry it over
            new.set_progress_bar_config(**pipeline._progress_bar_config)
        return new

    def to(self, *args: Any, **kwargs: Any) -> Any:
        if _KEEP_DTYPE.get() and not args and set(kwargs) == {"dtype"}:  # from_pipe's default float32 cast
            return self
        return super().to(*args, **kwargs)

    def to_json_string(self) -> str:
        """The stock class name in ``model_index.json``, so a saved edit pipeline loads as the stock one."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self._attnedit_stock.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @property
    def stock_class(self) -> type:
        return self._attnedit_stock

    def _edit_call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Split the options off, validate them, install the edits and run the stock call (or ``refocus``)."""
        options = {name: kwargs.pop(name, default) for name, default in OPTIONS.items()}
        stock_call = self._attnedit_stock.__call__
        if options["edit_backend"] not in BACKENDS:
            raise ValueError(f"edit_backend={options['edit_backend']!r}; valid: {list(BACKENDS)}")
        if all(_unset(name, value) for name, value in options.items() if name != "edit_backend"):
            return stock_call(self, *args, **kwargs)
        family = _family(self)
        _check_options(self, options, family)
        edits = _collect_edits(options, family, default_preset(self) if get_family(family).video else family)
        _check_key_mask(self, edits[0] if options["key_mask"] is not None else None, family, dict(zip(_names(self), args), **kwargs))
        layout, heads, backend = options["layout"], options["pag_heads"], options["edit_backend"]
        with ExitStack() as stack:
            handle = None
            if heads is not None:
                pag = {k: v for k, v in (("scale", options["pag_scale"]), ("strength", options["pag_strength"])) if v is not None}
                pag.update(options["pag_options"] or {})
                handle = stack.enter_context(perturbed_guidance(self, heads, **pag, backend=backend))
            if layout is not None:
                if handle is None and backend != "auto":  # refocus() installs with the default backend otherwise
                    handle = stack.enter_context(install(self, backend=backend))
                kwargs = _refocus_kwargs(self, layout, args, kwargs)
                config = options["refocus_config"]
                return refocus(self, layout, edits=tuple(edits), handle=handle,
                               **({} if config is None else {"config": config}), **(options["refocus_options"] or {}),
                               **kwargs)
            if edits:
                handle = stack.enter_context(install(self, *edits, backend=backend))
            if handle is not None:  # a call is a new run, also inside an enclosing installation
                handle.new_run()
            return stock_call(self, *args, **kwargs)


def edit_pipeline_class(stock: type) -> type:
    """The edit pipeline class of a stock pipeline class (``AttnEdit<Name>``), created once and cached.

    Its ``__call__`` has the stock call's signature plus the keyword-only :data:`OPTIONS` (so ``inspect`` and
    ``help()`` show both, and code that reads the stock defaults from the signature still finds them).
    """
    stock = getattr(stock, "_attnedit_stock", stock)  # an edit pipeline's class: its stock class
    if stock in _CLASSES:
        return _CLASSES[stock]
    if not (isinstance(stock, type) and issubclass(stock, DiffusionPipeline)) or stock is DiffusionPipeline:
        raise ValueError(f"{getattr(stock, '__name__', stock)!r} is not a diffusers pipeline class")
    signature = inspect.signature(stock.__call__)
    taken = sorted(set(OPTIONS) & set(signature.parameters))
    if taken:
        raise ValueError(f"{stock.__name__} is not supported: its __call__ already takes {taken}, which the edit "
                         "pipeline adds (use attnedit.install with the stock pipeline instead)")
    params = list(signature.parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    ours = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in OPTIONS.items()]
    call_signature = signature.replace(parameters=[p for p in params if p not in tail] + ours + tail)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._edit_call(args, kwargs)

    __call__.__signature__ = call_signature
    __call__.__doc__ = (f"{stock.__name__}.__call__ with attnedit's options ({', '.join(OPTIONS)}); see "
                        f"attnedit.pipelines.edit_pipeline.\n\n{stock.__call__.__doc__ or ''}")
    name = f"AttnEdit{stock.__name__}"
    cls = type(name, (AttnEditPipeline, stock), {
        "__call__": __call__, "__module__": __name__, "__qualname__": name, "_attnedit_stock": stock,
        "__doc__": f"{stock.__name__} whose __call__ also composes attnedit's edits (AttnEditPipeline.from_pipe).",
    })
    globals().setdefault(name, cls)  # picklable by name (the first stock class of that name)
    _CLASSES[stock] = cls
    return cls


# ------------------------------------------------------------------------------------------------- helpers
def _check_pipeline(pipe: Any) -> None:
    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError(f"from_pipe needs a diffusers pipeline; got {type(pipe).__name__}")  # noqa: TRY004
    try:
        _family(pipe)
    except ValueError as error:
        raise ValueError(f"{type(pipe).__name__} is not supported: {error}") from None


def _family(pipe: Any) -> str:
    return detect_family(denoiser(pipe)).name


def _unset(name: str, value: Any) -> bool:
    return value is None or value is False or (name == "edits" and not value)


def _as_key_mask(value: Any) -> KeyMask:
    """A :class:`KeyMask` as given, or one hiding the keys of a mask (tensor, array, PIL image or nested list with
    values in [0, 1], 8-bit ones / 255)."""
    return value if isinstance(value, KeyMask) else KeyMask(mask=as_mask(value, "key_mask").cpu().float())


def _check_key_mask(pipe: Any, edit: KeyMask | None, family: str, kwargs: dict[str, Any]) -> None:
    """Refuse, before any model runs, a key mask the call's token grid cannot take: a video mask on an image model,
    a video mask whose frame count is not the call's latent frames, or a mask whose aspect ratio is not the
    image's (checked on the coarsest patch grid; the call's size, else the pipeline's default)."""
    if edit is None:
        return
    mask, video = edit.mask, get_family(family).video
    if mask.ndim == 3 and not video:
        raise ValueError(f"key_mask= of shape {tuple(mask.shape)} is a video mask (F, H, W); {family} makes "
                         "images: give an (H, W) mask")
    defaults = inspect.signature(pipe._attnedit_stock.__call__).parameters

    def given(name: str) -> Any:
        value = kwargs.get(name)
        return value if value is not None else getattr(defaults.get(name), "default", None)

    temporal, frames = getattr(pipe, "vae_scale_factor_temporal", None), given("num_frames")
    if mask.ndim == 3 and is_int(temporal) and is_int(frames) and frames > 0:
        latent = (frames - 1) // temporal + 1
        if mask.shape[0] != latent:
            raise ValueError(f"key_mask of {mask.shape[0]} frames does not match num_frames={frames}, which the VAE "
                             f"turns into {latent} latent frames ((num_frames - 1) // {temporal} + 1)")
    scale = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
    side = getattr(pipe, "default_sample_size", None) or getattr(denoiser(pipe).config, "sample_size", None)
    side = side * scale if is_int(side) else None
    height, width = given("height") or side, given("width") or side
    if is_int(height) and is_int(width) and height > 0 and width > 0:
        cell = 2 * scale  # the largest patch of the supported families (FLUX packs 2x2 latents; Wan patches 2x2)
        try:
            mask_coverage(mask[0] if mask.ndim == 3 else mask, (max(1, height // cell), max(1, width // cell)))
        except ValueError:
            raise ValueError(f"key_mask of size {tuple(mask.shape)} does not have the aspect ratio of the "
                             f"{width}x{height} (WxH) image") from None


def _as_radial(value: Any, family: str, preset: str) -> RadialAttention:
    """``True``: the pipeline's preset (``wan22`` for Wan 2.2); a name: that preset; a dict: the pipeline's preset
    with these fields."""
    if not get_family(family).video:
        raise ValueError(f"radial= needs a video diffusion transformer; this pipeline is {family}")
    if isinstance(value, RadialAttention):
        return value
    if value is True:
        return RadialAttention.preset(preset)
    if isinstance(value, str):
        return RadialAttention.preset(value)
    if isinstance(value, dict):
        check_overrides(value)
        return RadialAttention.preset(preset, **value)
    raise ValueError(f"radial={value!r} must be True, a preset name, a dict of RadialAttention fields or a RadialAttention")


def _collect_edits(options: dict[str, Any], family: str, radial_preset: str) -> list[Edit]:
    """The edits installed for the whole call, in order: key mask, radial attention, the user's own."""
    edits: list[Edit] = []
    if options["key_mask"] is not None:
        edits.append(_as_key_mask(options["key_mask"]))
    if not _unset("radial", options["radial"]):
        edits.append(_as_radial(options["radial"], family, radial_preset))
    extra = options["edits"]
    if extra is not None and not isinstance(extra, (Edit, list, tuple)):
        raise ValueError(f"edits={extra!r} must be an attnedit Edit or a list of them")
    extra = (extra,) if isinstance(extra, Edit) else tuple(extra or ())
    bad = [e for e in extra if not isinstance(e, Edit)]
    if bad:
        raise ValueError(f"edits= takes attnedit Edit objects; got {bad!r}")
    return edits + list(extra)


def _check_options(pipe: Any, options: dict[str, Any], family: str) -> None:
    """Clear errors for options that do not apply, before anything is installed."""
    for name in ("pag_options", "refocus_options"):
        if options[name] is not None and not isinstance(options[name], dict):
            raise ValueError(f"{name}={options[name]!r} must be a dict of keyword arguments")
    if options["pag_heads"] is None:
        given = [n for n in ("pag_scale", "pag_strength", "pag_options") if options[n] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given without pag_heads=; name the perturbed heads, e.g. pag_heads='L1'")
    elif set(options["pag_options"] or {}) & {"heads", "scale", "strength", "backend"}:
        raise ValueError("pag_options= must not repeat heads/scale/strength/backend: use pag_heads, pag_scale, "
                         "pag_strength and edit_backend")
    layout = options["layout"]
    if layout is None:
        given = [n for n in ("refocus_config", "refocus_options") if options[n] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given without layout=")
        return
    if not isinstance(layout, Layout):
        raise ValueError(f"layout={layout!r} must be an attnedit.methods.refocusing.Layout")  # noqa: TRY004
    if refocus_hooks(get_family(family)) is None:
        raise ValueError(f"layout= (attention refocusing) supports SD 1.x, SDXL, SD3 and FLUX.1 text-to-image "
                         f"pipelines; {type(pipe).__name__} is {family}")
    config = options["refocus_config"]
    if config is not None and not isinstance(config, RefocusConfig):
        raise ValueError(f"refocus_config={config!r} must be a RefocusConfig")
    taken = set(options["refocus_options"] or {}) & {"config", "edits", "handle", "layout"}
    if taken:
        raise ValueError(f"refocus_options= must not set {sorted(taken)}: use refocus_config=, edits=, key_mask=, ...")


def _names(pipe: Any) -> list[str]:
    """The stock call's positional parameters after ``self``."""
    return [p.name for p in inspect.signature(pipe._attnedit_stock.__call__).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]


def _refocus_kwargs(pipe: Any, layout: Layout, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The stock call's arguments as keywords for ``refocus``; a prompt must be the layout's."""
    names = _names(pipe)
    if len(args) > len(names):
        raise ValueError(f"too many positional arguments for {pipe._attnedit_stock.__name__}")
    kwargs = {**dict(zip(names, args)), **kwargs}
    prompt = kwargs.pop("prompt", None)
    if prompt is not None and prompt != layout.prompt and list(_as_list(prompt)) != [layout.prompt]:
        raise ValueError(f"prompt={prompt!r} differs from layout.prompt={layout.prompt!r}; with layout= the prompt "
                         "is the layout's (leave prompt= out)")
    return kwargs


def _as_list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, (list, tuple)) else [value]
