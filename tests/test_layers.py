"""The package's folders are its layers: an import never runs up a layer (ops <- library <-
integrations <- pipeline), checked on the source of every module, imports inside functions
included."""
import ast
from pathlib import Path

import effseg

ROOT = Path(effseg.__file__).parent
# Higher number: higher layer. The library is everything at the top level and in ops/, nn/,
# models/ (ops is its bottom, but the library modules may import each other).
LAYERS = {"ops": 0, "integrations": 2, "pipeline": 3}


def _layer(parts: tuple[str, ...]) -> int:
    """The layer of a module given its path inside effseg (('pipeline', 'train'), ...)."""
    if not parts:
        return 1
    return LAYERS.get(parts[0], 1)


def _imports(path: Path):
    """(line, effseg-relative module parts) of every effseg import in a file."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1] if path.name != "__init__.py" else rel[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + tuple(node.module.split(".")) if node.module else base
                names = [] if node.module else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "effseg":
                target = tuple(node.module.split(".")[1:])
                names = [] if target else [a.name for a in node.names]
            else:
                continue
            for t in [target + (n,) for n in names] or [target]:
                yield node.lineno, t
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "effseg":
                    yield node.lineno, tuple(a.name.split(".")[1:])


def test_no_import_runs_up_a_layer():
    wrong = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("__init__.py", "__main__.py", "nnunet.py"):
            # The package's face: it gathers the public names of every layer (effseg.nnunet is
            # a module of its own so that `import effseg` never imports nnU-Net).
            continue
        mine = _layer(rel.with_suffix("").parts)
        for line, target in _imports(path):
            if target and target[0] in ("_build_config", "_C"):
                continue
            if _layer(target) > mine:
                wrong.append(f"{rel}:{line} imports effseg.{'.'.join(target)}")
    assert not wrong, "\n".join(wrong)


def test_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check is not vacuous: a library module importing the pipeline is reported."""
    fake = tmp_path / "effseg"
    (fake / "nn").mkdir(parents=True)
    (fake / "nn" / "bad.py").write_text("def f():\n    from ..pipeline import train\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    imports = list(_imports(fake / "nn" / "bad.py"))
    assert imports == [(2, ("pipeline",))] and _layer(imports[0][1]) > _layer(("nn",))


def test_public_import_paths_are_kept():
    import effseg.convert
    import effseg.monai
    from effseg.convert import ConversionReport
    from effseg.nn import convert_sync  # noqa: F401
    assert callable(effseg.convert) and effseg.convert.__name__ == "convert"
    assert ConversionReport.__module__ == "effseg.integrations.convert"
    assert hasattr(effseg.monai, "register")


def test_import_effseg_alone_gives_the_public_packages():
    """`import effseg` then effseg.models / losses / memory / nn / convert, as the README uses
    them (a fresh interpreter: this one has imported everything already)."""
    import subprocess
    import sys
    code = ("import effseg, sys; effseg.models.FullVolumeFCN; effseg.losses.DiceCELoss; "
            "effseg.memory.peak_allocated; effseg.nn.InPlaceAGN; effseg.convert; "
            "effseg.monai.register; print('pipeline' in ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"  # the application is not imported by the library
