"""The stock processor kept, its dispatcher call routed through attnedit: edits without re-implementing a family.

Most diffusers transformers (FLUX.1/2, Qwen-Image, Wan, HunyuanVideo 1/1.5, Z-Image, LTX-2, ...) project, normalize
and rotate q, k, v in their own processor and then call ``dispatch_attention_fn`` with ``(B, S, H, D)`` tensors.
attnedit runs that same processor code, unchanged, as a function whose global name ``dispatch_attention_fn`` is
attnedit's :func:`edited_dispatch` (a copy of the function object with its own globals: diffusers' modules and
other processors are untouched; no monkey patching). ``edited_dispatch`` passes every call through to diffusers'
dispatcher unless an attnedit processor is running and has edits for the call, in which case the call's attention
runs with the edits (:func:`attnedit.core.attention.attend`). Outputs with no edit are the stock ones by construction.
"""

from __future__ import annotations

import contextvars
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
import attnedit.core.versions  # noqa: F401  (a clear error on an untested diffusers, before its internals)
from diffusers.models.attention_dispatch import dispatch_attention_fn

DISPATCH = "dispatch_attention_fn"
_SIGNATURE = inspect.signature(dispatch_attention_fn)
_NAMES = tuple(_SIGNATURE.parameters)  # binding by zip: inspect's bind costs more than a small attention call
_DEFAULTS = {n: p.default for n, p in _SIGNATURE.parameters.items() if p.default is not inspect.Parameter.empty}
# the attnedit processor whose stock code is running (its edited_attention gets the dispatch calls), if any
RUNNING: contextvars.ContextVar[Any] = contextvars.ContextVar("attnedit_running_processor", default=None)


def edited_dispatch(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for ``dispatch_attention_fn`` inside stock processors that attnedit runs (same arguments)."""
    processor = RUNNING.get()
    if processor is None:
        return dispatch_attention_fn(*args, **kwargs)
    arguments = {**_DEFAULTS, **dict(zip(_NAMES, args)), **kwargs}
    return processor.edited_attention(arguments)


def dispatch(arguments: dict[str, Any]) -> torch.Tensor:
    """diffusers' dispatcher with bound arguments (``query``, ``key``, ``value``, ``attn_mask``, ``backend``, ...)."""
    return dispatch_attention_fn(**arguments)


def _global_names(func: Callable) -> set[str]:
    """The global names ``func``'s code (nested functions included) uses."""
    names: set[str] = set()
    stack = [func.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def calls_dispatcher(func: Callable) -> bool:
    """Whether ``func``'s code (nested functions included) names ``dispatch_attention_fn``."""
    return DISPATCH in _global_names(func)


def _with_globals(func: Callable, namespace: dict[str, Any]) -> Callable:
    copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    return copy


_REBOUND: dict[Any, Callable] = {}


def rebound_call(stock_class: type) -> Callable:
    """``stock_class.__call__`` as a function whose ``dispatch_attention_fn`` is :func:`edited_dispatch` (cached)."""
    func = stock_class.__call__
    if func not in _REBOUND:
        if not calls_dispatcher(func):
            raise ValueError(
                f"{stock_class.__name__} does not call diffusers' dispatch_attention_fn, so attnedit cannot edit its "
                "attention; set the model's default processors (model.set_default_attn_processor() or "
                "model.set_attention_backend('native')) or use a family with projection halves"
            )
        namespace = dict(func.__globals__)
        namespace[DISPATCH] = edited_dispatch
        # module-level helpers that call the dispatcher for the processor (FLUX.2's KV-cache attention) see the
        # same namespace, so their calls are routed too (one level deep)
        for name in _global_names(func):
            helper = namespace.get(name)
            if (isinstance(helper, types.FunctionType) and helper.__globals__ is func.__globals__
                    and calls_dispatcher(helper)):
                namespace[name] = _with_globals(helper, namespace)
        _REBOUND[func] = _with_globals(func, namespace)
    return _REBOUND[func]


def run_stock(processor: Any, stock: Any, attn: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``stock``'s own ``__call__`` with ``processor`` receiving its dispatcher calls."""
    token = RUNNING.set(processor)
    try:
        return rebound_call(type(stock))(stock, attn, *args, **kwargs)
    finally:
        RUNNING.reset(token)


_SIGNATURES: dict[type, inspect.Signature] = {}


def call_signature(stock_class: type) -> inspect.Signature:
    """The stock ``__call__`` signature without ``self`` (diffusers filters attention kwargs by it)."""
    if stock_class not in _SIGNATURES:
        signature = inspect.signature(stock_class.__call__)
        _SIGNATURES[stock_class] = signature.replace(parameters=list(signature.parameters.values())[1:])
    return _SIGNATURES[stock_class]


_CALL_NAMES: dict[type, tuple[str, ...]] = {}


def call_arguments(stock_class: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The stock ``__call__``'s arguments by name (``attn`` first; defaults left out), bound by position."""
    names = _CALL_NAMES.get(stock_class)
    if names is None:
        names = _CALL_NAMES[stock_class] = tuple(
            n for n, p in call_signature(stock_class).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return {**dict(zip(names, args)), **kwargs}
