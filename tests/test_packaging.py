"""Packaging: pyproject.toml (scikit-build-core) maps every source folder of
the package, the native module is built into it, and the installed package
(editable or not) holds every subpackage of the source tree."""
import importlib.util
import os
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _mapping() -> dict[str, str]:
    """package (slash form) -> source folder, normalized."""
    packages = CONFIG["tool"]["scikit-build"]["wheel"]["packages"]
    return {name: os.path.normpath(folder) for name, folder in packages.items()}


def test_build_backend_is_scikit_build_core_with_nanobind():
    system = CONFIG["build-system"]
    assert system["build-backend"] == "scikit_build_core.build"
    assert any(r.startswith("nanobind") for r in system["requires"])
    assert "hypothesis" in " ".join(CONFIG["project"]["optional-dependencies"]["test"])


def test_every_source_folder_is_mapped():
    mapping = _mapping()
    assert mapping == {"memgen": "python/memgen", "memgen/kernels": "kernels"}
    for folder in mapping.values():
        assert (ROOT / folder / "__init__.py").is_file(), folder
    # no package folder outside the mapped ones (it would not be shipped)
    mapped = [ROOT / f for f in mapping.values()]
    for init in list((ROOT / "python").rglob("__init__.py")) + list((ROOT / "kernels").rglob("__init__.py")):
        assert any(init.is_relative_to(m) for m in mapped), f"{init.parent} is not in wheel.packages"


def test_editable_install_puts_nothing_outside_the_checkout_on_sys_path():
    """scikit-build-core's editable .pth adds, per mapping, the source folder stripped of
    as many levels as the package name has parts (package_search_dirs)."""
    for name, folder in CONFIG["tool"]["scikit-build"]["wheel"]["packages"].items():
        search = ROOT / folder
        for _ in Path(name).parts:
            search = search.parent
        assert search.resolve().is_relative_to(ROOT), f"{name} = {folder!r} puts {search.resolve()} on sys.path"


def test_native_module_is_built_into_the_package():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"nanobind_add_module\(_native\b", cmake)
    assert re.search(r"install\(TARGETS _native .*DESTINATION memgen\)", cmake)
    spec = importlib.util.find_spec("memgen._native")
    assert spec is not None and spec.origin and not spec.origin.endswith(".py")


def test_installed_package_holds_every_subpackage():
    for name, folder in _mapping().items():
        base = name.replace("/", ".")
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder)
            module = ".".join([base, *rel.parts])
            assert importlib.util.find_spec(module) is not None, f"{module} is not installed"
