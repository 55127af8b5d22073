"""What is installed, read from package metadata and module specs, never by importing: the
backends take seconds to import and the probe must stay fast."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import re


def installed_version(distribution: str, module: str) -> str | None:
    """The distribution's version if its metadata and its module are both present: metadata
    alone can outlive a broken uninstall."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if module_present(module) else None


def module_present(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it. ``find_spec`` of a dotted name
    would import the parent package, so a submodule is looked up in the parent's folders."""
    parent, _, child = module.rpartition(".")
    if not parent:
        return importlib.util.find_spec(module) is not None
    parent_spec = importlib.util.find_spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return False
    locations = list(parent_spec.submodule_search_locations)
    return importlib.machinery.PathFinder.find_spec(child, locations) is not None


def at_least(version: str, minimum: str) -> bool:
    """Compare release numbers ("0.42.1" >= "0.42"); pre-release tags are ignored, so a dev build
    of the minimum release counts as that release."""
    return _release(version) >= _release(minimum)


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    numbers = [int(part) for part in match.group(0).split(".")] if match else [0]
    while len(numbers) > 1 and numbers[-1] == 0:  # "0.42.0" equals "0.42"
        numbers.pop()
    return tuple(numbers)
