"""The package's import picture (issue 14), read from the source with `ast`, nothing imported:
- `latentlm_mcore.data` reaches the σ-VAE only through the names `latentlm_mcore.vae` exports (its encoder
  interface), never its internal modules;
- `inference` and `hf` form no cycle (hf builds on inference; inference never imports hf);
- `runtime` imports no Megatron and nothing else of the package but itself;
- argparse only in `runtime/cli.py` and the demo CLIs (`demo/`), not in library modules.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "latentlm_mcore"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
    """(imported module, imported name or None) for every import in the file, function-level ones included."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield base, alias.name


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _edges(prefix: str):
    for name, path in MODULES.items():
        if name == prefix or name.startswith(prefix + "."):
            for target, imported in _imports(path):
                yield name, target, imported


def _within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def test_the_parser_sees_imports():
    """The independent check that the walk finds imports at all (function-level ones too)."""
    edges = set(_edges("latentlm_mcore.data.loader.packed"))
    assert any(t == "latentlm_mcore.vae" and n == "sample_sigma_latents" for _, t, n in edges), edges
    assert any(_within(t, "latentlm_mcore.inference") for _, t, _ in _edges("latentlm_mcore.hf"))


def test_data_uses_only_the_vae_encoder_interface():
    init = MODULES["latentlm_mcore.vae"]
    exported = {ast.literal_eval(elt) for node in ast.walk(ast.parse(init.read_text()))
                if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
                for elt in node.value.elts}
    bad = [(src, target, name) for src, target, name in _edges("latentlm_mcore.data")
           if _within(target, "latentlm_mcore.vae") and (target != "latentlm_mcore.vae" or name not in exported)]
    assert not bad, f"data imports σ-VAE internals (use the names latentlm_mcore.vae exports): {bad}"


@pytest.mark.parametrize("src,dst", [("latentlm_mcore.inference", "latentlm_mcore.hf")])
def test_no_inference_hf_cycle(src, dst):
    back = [(a, t) for a, t, _ in _edges(src) if _within(t, dst)]
    assert not back, f"{src} imports {dst}, which imports {src}: {back}"


def test_runtime_imports_no_megatron_and_no_other_package_module():
    bad = [(a, t) for a, t, _ in _edges("latentlm_mcore.runtime")
           if t.split(".")[0] == "megatron"
           or (_within(t, "latentlm_mcore") and not _within(t, "latentlm_mcore.runtime"))]
    assert not bad, bad


def test_argparse_only_in_the_cli_layer():
    allowed = ("latentlm_mcore.runtime.cli", "latentlm_mcore.demo")
    bad = sorted({a for a, t, _ in _edges("latentlm_mcore") if t == "argparse" and not a.startswith(allowed)})
    assert not bad, f"library modules that parse the command line: {bad}"


def _environ_edits(path: pathlib.Path):
    """Line numbers that assign to, or call an editing method of, `os.environ` (or call os.putenv)."""
    def is_environ(node):
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
                yield node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if (is_environ(f.value) and f.attr in ("setdefault", "update", "pop", "clear", "popitem")) \
                    or f.attr in ("putenv", "unsetenv"):
                yield node.lineno


def test_os_environ_is_edited_only_in_runtime_ranks():
    assert list(_environ_edits(MODULES["latentlm_mcore.runtime.ranks"])), "the walk finds ranks.py's edits"
    bad = {name: lines for name, path in MODULES.items() if name != "latentlm_mcore.runtime.ranks"
           and (lines := list(_environ_edits(path)))}
    assert not bad, f"os.environ edited outside runtime/ranks.py (module: lines): {bad}"
