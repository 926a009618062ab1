"""A registry of named plug-ins (selection methods, data sources): built-ins register when their
module is imported; others through an entry-point group, loaded once, on the first listing."""

from __future__ import annotations

from importlib.metadata import entry_points

from pfb_train.errors import UserError


class Registry:
    """Items with a `name`, by name. `kind` names them in messages (e.g. "selection method");
    `group` is the entry-point group whose modules register more when imported."""

    def __init__(self, kind: str, group: str):
        self.kind, self.group = kind, group
        self.items: dict = {}
        self.loaded = False  # entry points imported

    def register(self, item):
        """Add an item; registering the same name again replaces it (a reloaded module)."""
        self.items[item.name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove an item (tests register their own and take them away again); an unknown name is ignored."""
        self.items.pop(name, None)

    def all(self) -> dict:
        """Every registered item, by name: built-ins first, then plug-ins. A plug-in that fails to load
        is a one-line UserError naming it, not a traceback in every run."""
        if not self.loaded:
            self.loaded = True
            for point in entry_points(group=self.group):
                try:
                    point.load()  # importing the module registers its item(s)
                except Exception as e:
                    raise UserError(f"{self.kind} plug-in '{point.name}' ({point.value}) failed to load: {e}") from None
        return dict(self.items)
