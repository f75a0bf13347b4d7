"""Import user modules that register models or datasets (``--plugin my_package.my_module``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable


class PluginError(ImportError):
    """A plugin module that could not be imported."""


def load_plugins(modules: Iterable[str]) -> None:
    """Import each module by dotted name, or by path when it ends in ``.py``.

    The working directory is put on ``sys.path`` first, so a module next to where the user runs
    the benchmark can be named without installing it.

    Raises:
        PluginError: If a module cannot be found or fails while importing.
    """
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for module in modules:
        try:
            if module.endswith(".py"):
                _import_path(Path(module))
            else:
                importlib.import_module(module)
        except PluginError:
            raise
        except ModuleNotFoundError as error:
            raise PluginError(
                f"Plugin module {module!r} was not found ({error}). Pass an importable dotted "
                f"name (installed, or relative to the current folder) or a path to a .py file."
            ) from error
        except Exception as error:
            raise PluginError(
                f"Plugin module {module!r} failed while importing: {type(error).__name__}: {error}"
            ) from error


def _import_path(path: Path) -> None:
    if not path.is_file():
        raise PluginError(f"Plugin file {str(path)!r} does not exist.")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
