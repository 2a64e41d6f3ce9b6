"""``install(model_or_pipeline, *edits)``: put the edit processor on every attention site, restore on exit.

Installing on a model that already has an installation nests: the new edits join the enclosing ones (after
them) and leave on exit, so ``with perturbed_guidance(pipe, ...): with install(pipe, KeyMask(...)):`` composes.

The step index and the CFG branch of each batch row are read without touching diffusers' forwards: a forward
pre-hook on the denoiser sees the timestep and the batch. A new timestep is a new step; a repeated timestep is
another pass of the same step (Wan, FLUX and HunyuanVideo run cond, then uncond); a timestep that moves against
the run's direction starts a new run (step 0). ``new_run()`` resets explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from attnedit.core.edits import BRANCHES, Edit
from attnedit.core.families import Family, ForwardInfo, Site
from attnedit.families import detect_family
from attnedit.processors.edit_processor import EditProcessor, make_edit_processor


class RunState:
    """Where the denoising run is: step, pass within the step, and the current forward's inputs."""

    def __init__(self, family: Family, pipeline: Any = None) -> None:
        self.family = family
        self.pipeline = pipeline
        self.branch_override: tuple[str, ...] | None = None
        # True during forwards that are not the pipeline's denoising calls (refocusing's gradient forwards):
        # guidance hooks pass them through, so they add no guidance rows to a forward nobody samples from
        self.auxiliary = False
        self.new_run()

    def new_run(self) -> None:
        self.step = 0
        self.pass_index = 0
        self.last_t: float | None = None
        self.direction = 0
        self._info: ForwardInfo | None = None
        self._inputs: tuple | None = None

    @property
    def info(self) -> ForwardInfo | None:
        """The current forward's inputs, read on first use (most forwards with no active edit never need it)."""
        if self._info is None and self._inputs is not None:
            self._info = self.family.forward_info(*self._inputs)
        return self._info

    def on_forward(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = self.family.timestep(model, args, kwargs)
        if self.last_t is not None:
            if t == self.last_t:
                self.pass_index += 1
            else:
                direction = 1 if t > self.last_t else -1
                if self.direction and direction != self.direction:
                    self.step, self.direction = 0, 0
                else:
                    self.step, self.direction = self.step + 1, direction
                self.pass_index = 0
        self.last_t = t
        self._info, self._inputs = None, (model, args, kwargs)

    def batch_branches(self) -> tuple[str, ...]:
        """Branch names of the equal chunks of the batch (batched CFG) or of this pass (separate passes)."""
        if self.branch_override is not None:
            return self.branch_override
        if self.family.batched_cfg:
            try:
                cfg = bool(self.pipeline is not None and self.pipeline.do_classifier_free_guidance)
            except AttributeError:  # the pipeline sets its guidance scale only inside __call__
                cfg = False
            return self.family.cfg_rows if cfg else ("cond",)
        return ("cond",) if self.pass_index == 0 else ("uncond",)

    def row_branches(self, batch: int) -> tuple[str, ...]:
        chunks = self.batch_branches()
        if batch % len(chunks):
            raise ValueError(f"batch of {batch} rows cannot be split into branches {chunks}")
        return tuple(name for name in chunks for _ in range(batch // len(chunks)))


class Installation:
    """Edit processors on a denoiser (or a pipeline's denoisers); a context manager that always restores."""

    def __init__(self, target: Any, edits: Sequence[Edit], backend: str = "auto") -> None:
        from attnedit.core.attention import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; valid: {list(BACKENDS)}")
        self.pipeline = target if _is_pipeline(target) else None
        self.models = _denoisers(target)
        self._originals: list[tuple[torch.nn.Module, Any]] = []
        self._hooks: list[Any] = []
        self._edits: tuple[Edit, ...] = ()
        self._by_site: dict[Site, list[Edit]] = {}
        self._owner = _installed_on(self.models)
        if self._owner is not None:  # nested: add our edits to the installation already there
            owner = self._owner
            if backend not in ("auto", owner.backend):
                raise ValueError(f"backend={backend!r} differs from the enclosing installation's {owner.backend!r}")
            self.family, self.sites, self.state, self.backend = owner.family, owner.sites, owner.state, owner.backend
            self.edits = edits
            return
        self.family = detect_family(self.models[0])
        self.sites = self.family.sites(self.models[0])
        for other in self.models[1:]:  # Wan 2.2: transformer_2 shares the layer numbering edits are written in
            if detect_family(other) is not self.family or self.family.sites(other) != self.sites:
                raise ValueError(
                    f"the pipeline's denoisers {[type(m).__name__ for m in self.models]} have different attention "
                    "sites; install on one of them (install(pipe.transformer, ...)) instead of the pipeline"
                )
        self.backend = backend
        self.state = RunState(self.family, self.pipeline)
        self.edits = edits
        self.attach()

    # -- edits ---------------------------------------------------------------------------------------------
    @property
    def edits(self) -> tuple[Edit, ...]:
        return self._edits

    @edits.setter
    def edits(self, edits: Sequence[Edit]) -> None:
        for k, edit in enumerate(edits):
            if not isinstance(edit, Edit):
                hint = "; pass edits one by one: install(pipe, *edits)" if isinstance(edit, (list, tuple)) else ""
                raise ValueError(f"edits[{k}]={edit!r} is not an attnedit Edit{hint}")  # noqa: TRY004 (one error type for bad input)
            edit.validate(self.sites, self.family.name)
        previous, self._edits = self._edits, tuple(edits)
        if self._owner is not None:
            self._owner._nested_changed(previous, self._edits)
        else:
            self._index()

    def _nested_changed(self, removed: tuple[Edit, ...], added: tuple[Edit, ...]) -> None:
        """A nested installation swapped its edits: keep ours first, then every nested one in install order."""
        self._nested = [e for e in getattr(self, "_nested", []) if all(e is not r for r in removed)] + list(added)
        self._index()

    def _index(self) -> None:
        every = self._edits + tuple(getattr(self, "_nested", []))
        self._by_site = {
            site: [e for e in every if (e.kinds is None or site.kind in e.kinds) and (e.layers is None or site.layer in e.layers)]
            for site in self.sites
        }

    def edits_at(self, site: Site) -> list[Edit]:
        return self._by_site[site]

    # -- run state -------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    def new_run(self) -> None:
        """Start step counting from 0 (call before a generation when runs are not separated by the schedule)."""
        self.state.new_run()

    @contextmanager
    def branches(self, *names: str) -> Iterator[None]:
        """Within the block, the batch is split into these branches, in order (e.g. uncond, cond, perturbed)."""
        if not names or any(n not in BRANCHES for n in names):
            raise ValueError(f"branches {names} must be a non-empty sequence of {BRANCHES}")
        previous, self.state.branch_override = self.state.branch_override, tuple(names)
        try:
            yield
        finally:
            self.state.branch_override = previous

    # -- lifecycle -------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Put the edit processors and the step hook on (``install`` does; after ``remove()`` it re-attaches the
        same installation, sites and run state, e.g. for refocusing's gradient forwards only)."""
        try:
            for model in self.models:
                modules = dict(model.named_modules())
                for site in self.sites:
                    module = modules[site.name]
                    original = module.processor
                    self._originals.append((module, original))
                    module.set_processor(make_edit_processor(site, self.family, self, original))
                self._hooks.append(model.register_forward_pre_hook(self._pre_forward(model), with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def _pre_forward(self, model: torch.nn.Module):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.state.on_forward(model, args, kwargs)

        return hook

    def remove(self) -> None:
        """Restore the original processors and remove the hooks (idempotent); a nested one takes back its edits."""
        if self._owner is not None:
            self._owner._nested_changed(self._edits, ())
            self._edits, self._owner = (), None
            return
        while self._originals:
            module, original = self._originals.pop()
            config = getattr(module.processor, "_parallel_config", None)
            if config is not None and hasattr(original, "_parallel_config"):
                original._parallel_config = config  # enable_parallelism() ran while ours were on: the stock one needs it
            module.set_processor(original)
        while self._hooks:
            self._hooks.pop().remove()

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Installation({self.family.name}, {len(self.sites)} sites, edits={list(self._edits)})"


def install(target: Any, *edits: Edit, backend: str = "auto") -> Installation:
    """Install ``edits`` on a diffusers pipeline or denoiser. Use as ``with install(pipe, edit): pipe(...)``.

    >>> with install(pipe, HeadBlend(strength=0.5, heads={3: (0, 1)})):   # doctest: +SKIP
    ...     image = pipe("a cat").images[0]
    """
    return Installation(target, edits, backend)


def _installed_on(models: list[torch.nn.Module]) -> Installation | None:
    """The installation whose processors already sit on these models, if any."""
    for model in models:
        for module in model.modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, EditProcessor):
                return processor.installation
    return None


def _is_pipeline(target: Any) -> bool:
    return hasattr(target, "components") and not isinstance(target, torch.nn.Module)


def _denoisers(target: Any) -> list[torch.nn.Module]:
    """The denoisers of a pipeline (``transformer_2`` too: Wan 2.2's low-noise expert), or the model itself.

    ``torch.compile(model)`` wraps a model in an ``OptimizedModule`` that forwards to ``_orig_mod``: the processors
    and the step hook go on the wrapped model (whose attention modules the compiled forward calls).
    """
    if isinstance(target, torch.nn.Module):
        return [unwrap_compiled(target)]
    if _is_pipeline(target):
        found = [getattr(target, n) for n in ("unet", "transformer", "transformer_2") if getattr(target, n, None) is not None]
        if found:
            return [unwrap_compiled(m) for m in found]
    raise ValueError(f"{type(target).__name__} is neither a diffusers pipeline with a unet/transformer nor a denoiser model")


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model a ``torch.compile`` wrapper (``OptimizedModule``) compiles; any other model as it is."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model
