"""Parts other packages add: each entry-point group (`edgebundle.targets`, `edgebundle.stages`) names modules
that register their part when imported. Loaded once per group, on the first lookup that needs them."""

from __future__ import annotations

_loaded: set[str] = set()


def load_entry_points(group: str) -> None:
    """Import every module the installed packages declare in `group`, once per process."""
    if group in _loaded:
        return
    _loaded.add(group)
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        ep.load()
