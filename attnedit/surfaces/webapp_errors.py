"""How the app shows what goes wrong: a ValueError is a message without a server traceback, an unreadable upload is
a message naming it, and words a built-in model never saw are a warning."""

from __future__ import annotations

import logging


def friendly(fn):
    """Show a ValueError to the user as a gr.Error message, and the sampling steps as the event's progress bar.

    gradio tracks tqdm bars (diffusers' steps) for a function whose signature ends in a positional
    ``progress=gr.Progress(track_tqdm=True)``: the wrapper shows ``fn``'s positional parameters plus that one.
    """
    import inspect

    import gradio as gr

    def wrapper(*args, **kwargs):
        args = [a for a in args if not isinstance(a, gr.Progress)]
        kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, gr.Progress)}
        try:
            return fn(*args, **kwargs)
        except ValueError as error:  # bad input: a message, no server traceback
            raise gr.Error(str(error), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as error:  # a fault of the app or the model: logged, and still a readable message
            logging.getLogger("attnedit.app").exception("the app failed")
            raise gr.Error(f"{type(error).__name__}: {error}", print_exception=False) from None

    wrapper.__name__ = wrapper.__qualname__ = getattr(fn, "__name__", "run")  # a partial has none
    wrapper.__doc__ = fn.__doc__
    signature = inspect.signature(fn)
    kinds = [p.kind for p in signature.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL not in kinds:  # else nothing can follow: no progress bar
        positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        progress = inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default=gr.Progress(track_tqdm=True))
        wrapper.__signature__ = signature.replace(parameters=[*positional, progress])
    return wrapper


def readable_upload(component):
    """An image input whose unreadable upload is a message ("not an image this app can read"), not a traceback."""
    import gradio as gr

    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError) as error:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"{name} is not an image this app can read (PNG, JPEG, WebP): {type(error).__name__}",
                           print_exception=False) from None

    component.preprocess = checked
    return component


def hint_unknown(pipe, prompt: str) -> None:
    """A warning (not an error) naming prompt words a built-in model never saw: it reads them letter by letter."""
    import gradio as gr

    from attnedit.surfaces.webapp_defaults import unknown_words

    words = unknown_words(pipe, prompt)
    if words:
        from attnedit.shapes.world import WORDS

        gr.Warning(f"this model does not know {', '.join(map(repr, words))}: it reads them letter by letter. "
                   f"Its words: {' '.join(WORDS)}")
