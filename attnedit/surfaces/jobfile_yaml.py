"""Job files in YAML, read safely: no tags that build objects (SafeLoader), and a bounded size after alias expansion.

A YAML "billion laughs" file (``a: &a [x, x]``, ``b: &b [*a, *a]``, ... nested) is a few hundred bytes that become
gigabytes once something walks it (hashing a job or writing its record does); its expanded size is counted on the
composed node graph, once per distinct node, and a file over the limit is refused before anything expands it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_yaml(content: str, path: Path, limit: int) -> Any:
    """Safe YAML whose size after alias expansion is bounded: an alias bomb (``&a [*b, *b]`` nested) is refused
    before anything expands it (hashing a job or writing its record would)."""
    import yaml

    try:
        root = yaml.compose(content, Loader=yaml.SafeLoader)
        _expanded_size(root, path, limit)
        return yaml.safe_load(content)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None


def _expanded_size(root: Any, path: Path, limit: int) -> int:
    """Nodes plus scalar characters of the document with every alias expanded, counted once per distinct node."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ValueError(f"{path}: a recursive alias (a node that contains itself)")
        open_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        else:
            total = 1 + len(str(node.value))
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        if total > limit:
            raise ValueError(f"{path}: expands to more than {limit:,} nodes and characters "
                             "(an alias bomb?); write the jobs out")
        return total

    return size(root) if root is not None else 0
