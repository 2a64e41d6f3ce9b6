"""Old import paths keep working: ``attnedit.zoo``, ``attnedit.cli``, ... name the same module objects as their
new homes (``attnedit.models.zoo``, ``attnedit.surfaces.cli``), so imports, ``mock.patch`` targets and
``python -m attnedit.cli`` written before the package moved into folders still work, with no stub files."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import CodeType, ModuleType

MOVED = {
    f"attnedit.{name}": f"attnedit.{folder}.{name}"
    for folder, names in {
        "core": ("attention", "block_sparse", "edits", "install", "parallel"),  # attnedit.families is now a package
        "methods": ("attention_maps", "head_guidance", "headhunter", "key_masking", "radial", "refocusing"),
        "models": ("architectures", "zoo", "zoo_text"),
        "shapes": ("builtin", "training", "world"),
        "surfaces": ("batch", "cli", "loading", "outputs", "webapp", "webapp_tabs"),
    }.items()
    for name in names
}
MOVED["attnedit.pipelines.design_models"] = "attnedit.pipelines.design_inversion"  # DesignEdit's model half


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds an old name and hands out the module of its new name (imported once, one object)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__  # the import system sets __spec__ to the alias's; put the real one back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec

    def get_code(self, fullname: str) -> CodeType | None:  # python -m <old name>: run the new module's code
        spec = importlib.util.find_spec(MOVED[fullname])
        return spec.loader.get_code(spec.name)

    def get_source(self, fullname: str) -> str | None:
        spec = importlib.util.find_spec(MOVED[fullname])
        return spec.loader.get_source(spec.name)

    def is_package(self, fullname: str) -> bool:
        return False


def install_aliases() -> None:
    """Put the alias finder on ``sys.meta_path`` once, and register the old names of modules already imported.

    Registering those directly matters for ``attnedit.install``: the package's attribute ``install`` is the
    function, and importing the old module name through the finder would rebind it to the module.
    """
    for old, new in MOVED.items():
        if new in sys.modules:
            sys.modules.setdefault(old, sys.modules[new])
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
