"""Post-import hooks that plug hf-mergelaw into libraries which import no user code.

The wheel ships ``hf_mergelaw_hook.pth`` next to this module in site-packages; its one line,
``import _hf_mergelaw_hook; _hf_mergelaw_hook.install()``, runs at every interpreter start.
``install()`` only puts a small finder on ``sys.meta_path``. The finder waits for a trigger
module (e.g. ``mergekit.merge_methods``) to be imported, lets it execute normally, then calls
the callback registered for it (e.g. ``mergekit_plugins:register``). So plain ``mergekit-yaml``
sees ``ties_fused`` while other Python processes pay nothing: this module imports only ``sys``
(and ``__future__``).

To add a trigger (e.g. the ``evaluate`` metric shim), add one entry to ``TRIGGERS``.

Editable installs (``pip install -e .``) get the ``.pth`` and a copy of this module too:
hatchling puts force-included files in editable wheels (checked with hatchling 1.33); reinstall
after editing this file. A checkout on ``PYTHONPATH`` (not installed) has no hook. There,
``import mergekit_plugins`` before using mergekit's Python API, run the CLI as
``python -m mergekit_plugins CONFIG OUT [mergekit-yaml options]``, or write the ``.pth`` line
into site-packages yourself (``python -S`` skips site-packages, and with it the project)::

    SITE=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    echo "import _hf_mergelaw_hook; _hf_mergelaw_hook.install()" > "$SITE/hf_mergelaw_hook.pth"
"""

from __future__ import annotations

import sys

# Not `from typing import TYPE_CHECKING`: importing typing costs ~20 ms in every process.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

# Module name -> "package.module:function" to call once that module has been imported.
TRIGGERS: Mapping[str, str] = {
    "mergekit.merge_methods": "mergekit_plugins:register",
    "evaluate": "hf_mergelaw.metric_registration:register_metric",
}


def install(triggers: Mapping[str, str] = TRIGGERS) -> None:
    """Arrange for each trigger's callback to run right after its module is imported.

    Idempotent. A trigger whose module is already imported fires at once.

    >>> import _hf_mergelaw_hook
    >>> _hf_mergelaw_hook.install()
    """
    finder = _installed_finder()
    if finder is None:
        finder = _PostImportFinder()
        sys.meta_path.insert(0, finder)
    for module_name, target in triggers.items():
        if module_name in sys.modules:
            _run_callback(module_name, target)
        else:
            finder.pending[module_name] = target


def _installed_finder() -> _PostImportFinder | None:
    # Compare by marker, not class identity: a reloaded module defines a new class.
    for finder in sys.meta_path:
        if getattr(finder, "is_hf_mergelaw_hook", False):
            return finder  # type: ignore[return-value]
    return None


def _run_callback(module_name: str, target: str) -> None:
    """Call ``target`` ("module:function"); failures warn instead of breaking the import."""
    import importlib
    import warnings

    callback_module, _, function = target.partition(":")
    in_progress = sys.modules.get(callback_module)
    if getattr(getattr(in_progress, "__spec__", None), "_initializing", False):
        # The callback's own module imported the trigger (`import mergekit_plugins` first):
        # it is half-initialised now and registers by itself when its import completes.
        return
    try:
        callback: Callable[[], Any] = getattr(importlib.import_module(callback_module), function)
        callback()
    except Exception as error:
        # The user imported the trigger module for its own sake; it must keep working.
        warnings.warn(
            f"hf-mergelaw: {target} failed after importing {module_name}: {error!r}. "
            f"Import {callback_module} yourself to see the full error.",
            RuntimeWarning,
            stacklevel=2,
        )


class _PostImportFinder:
    """A ``sys.meta_path`` finder that never loads anything itself.

    For a pending trigger it asks the other finders for the real spec and wraps that spec's
    loader so the callback runs once the module has executed.
    """

    is_hf_mergelaw_hook = True

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, fullname, self.pending)
        return spec


class _CallbackLoader:
    """Delegates everything to the real loader; runs the callback after ``exec_module``."""

    def __init__(self, loader: Any, module_name: str, pending: dict[str, str]) -> None:
        self._loader = loader
        self._module_name = module_name
        # Shared with the finder: a spec found only to probe (importlib.util.find_spec) is
        # never executed, so the trigger stays pending until a module really runs.
        self._pending = pending

    def __getattr__(self, name: str) -> Any:
        # Resource readers, get_source and friends must see the real loader.
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        target = self._pending.pop(self._module_name, None)
        if target is None:
            return
        # importlib binds a submodule on its package only after exec_module returns; the
        # callback may already say `import package.module` and use the attribute.
        parent, _, child = self._module_name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)
        _run_callback(self._module_name, target)
