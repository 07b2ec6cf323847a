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
    # memgen is a regular package; memgen.kernels a namespace folder (see the last test)
    assert (ROOT / "python/memgen/__init__.py").is_file()
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
    cmake = (ROOT / "engine" / "CMakeLists.txt").read_text()
    assert re.search(r"nanobind_add_module\(_native\b", cmake)
    assert re.search(r"install\(TARGETS _native .*DESTINATION memgen\)", cmake)
    spec = importlib.util.find_spec("memgen._native")
    assert spec is not None and spec.origin and not spec.origin.endswith(".py")


def test_installed_package_holds_every_subpackage():
    for name, folder in _mapping().items():
        base = name.replace("/", ".")
        assert importlib.util.find_spec(base) is not None, f"{base} is not installed"
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder)
            module = ".".join([base, *rel.parts])
            assert importlib.util.find_spec(module) is not None, f"{module} is not installed"
    for source in (ROOT / "kernels").glob("*.py"):
        assert importlib.util.find_spec(f"memgen.kernels.{source.stem}") is not None, source


# A script run from the checkout root has the root first on sys.path (`python -m pytest`,
# `python -c`, `python my_script.py` in the root): no top-level folder may shadow an
# installed package there. transformers >= 5.2x imports the PyPI package `kernels`, which
# the checkout's `kernels/` (a namespace folder, shipped as `memgen.kernels`) must not hide.
_FROM_ROOT = """
import sys, torch
from transformers import AutoModelForCausalLM
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor([[3, 4, 5]])
hf_next = int(hf(ids).logits[0, -1].argmax())

import memgen.kernels.reference, memgen.kernels.lora
from memgen import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", seed=0)
out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
assert out[0].token_ids[0] == hf_next, (out[0].token_ids, hf_next)

import importlib.util, os
spec = importlib.util.find_spec("kernels")
ours = os.path.realpath("kernels")
assert spec is None or spec.origin is None or os.path.realpath(os.path.dirname(spec.origin)) != ours, spec
print("FROM-ROOT-OK")
"""


def test_checkout_root_shadows_no_installed_package(qwen2_dir):
    import subprocess
    import sys

    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the root shadow PyPI's kernels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run([sys.executable, "-c", _FROM_ROOT, str(qwen2_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FROM-ROOT-OK" in proc.stdout, proc.stderr[-3000:]


def test_native_compile_commands_do_not_depend_on_the_build_env(tmp_path):
    """pip builds in a new isolated env at each `pip install` and scikit-build-core then
    clears <build>/CMakeCache.txt and <build>/CMakeFiles. Reconfigured from an env at another
    path, the compile commands must stay the same and no object may live in the cleared
    folder, or installing an extra recompiles the whole runtime."""
    import json
    import shutil
    import subprocess
    import sys

    nanobind = importlib.util.find_spec("nanobind")
    assert nanobind is not None, "the test extra installs nanobind"
    build = tmp_path / "build"
    commands = []
    for env in ("env-a", "env-b"):
        shutil.copytree(Path(nanobind.origin).parent, tmp_path / env / "nanobind")
        (build / "CMakeCache.txt").unlink(missing_ok=True)
        shutil.rmtree(build / "CMakeFiles", ignore_errors=True)
        proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                               "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(tmp_path / env)}, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        commands.append(json.loads((build / "compile_commands.json").read_text()))
    assert commands[0] == commands[1]
    sources = {Path(c["file"]).name for c in commands[0]}
    assert {"cpu_gemm.cpp", "bindings.cpp", "nb_func.cpp"} <= sources
    for c in commands[0]:
        assert "env-a" not in c["command"], c["command"]
        output = Path(c["directory"]) / c.get("output", c["command"].split(" -o ")[1].split()[0])
        assert not output.resolve().is_relative_to((build / "CMakeFiles").resolve()), output
