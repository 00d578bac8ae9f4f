"""The restore engine's layout (issue #23): no import cycle in memnet, even through a deferred import;
the executors do not import each other; the engine modules import no private names and keep their
functions short; each restore default has one home."""

import ast
import re
from pathlib import Path

import memnet

SRC = Path(memnet.__file__).parent
ENGINE = ("options", "runner", "kernel", "local", "lazy", "distributed", "engine", "_cli_restore")
EXECUTORS = ("local", "lazy", "distributed")


def _imports(name: str) -> list[ast.ImportFrom]:
    """Every relative import of a module, at the top or inside a function."""
    tree = ast.parse((SRC / f"{name}.py").read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1]


def _graph() -> dict[str, set[str]]:
    mods = {p.stem for p in SRC.glob("*.py")}
    graph = {}
    for m in mods:
        targets = set()
        for node in _imports(m):
            targets |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[m] = {t for t in targets if t in mods and t != m}
    return graph


def test_no_import_cycle_in_memnet():
    graph, done, path = _graph(), set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_executors_do_not_import_each_other_or_the_facade():
    graph = _graph()
    for m in EXECUTORS:
        assert not graph[m] & {*EXECUTORS, "engine"}, f"{m} imports {graph[m] & {*EXECUTORS, 'engine'}}"


def test_engine_modules_import_no_private_names_and_keep_functions_short():
    for m in ENGINE:
        for node in _imports(m):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                       and node.module]  # `from . import _cli_types` is a module, not a name
            assert not private, f"{m} imports private {node.module}.{private}"
        tree = ast.parse((SRC / f"{m}.py").read_text())
        for f in ast.walk(tree):
            if isinstance(f, ast.FunctionDef):
                assert f.end_lineno - f.lineno < 80, f"{m}.{f.name} is {f.end_lineno - f.lineno + 1} lines"


def test_each_restore_default_has_one_home():
    d = memnet.RestoreOptions()
    assert (d.tile, d.halo, d.blend, d.scale, d.amp, d.ensemble, d.device, d.batch_size, d.memory_budget,
            d.backend) == ("auto", "exact", "cosine", 1, "auto", False, "auto", "auto", None, "auto")
    for m in ENGINE:
        text = (SRC / f"{m}.py").read_text()
        assert m == "options" or not re.search(r"(?<!sha)\b256\b", text), f"{m} restates the default tile"


def test_no_module_imports_another_modules_private_names():
    for m in sorted(_graph()):
        for node in _imports(m):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                       and node.module]
            assert not private, f"{m} imports private {node.module}.{private}"


def test_training_modules_keep_functions_short():
    """One fit loop behind train and finetune (issue #23): no function of about 80 lines or more."""
    for m in ("fitloop", "train", "finetune", "finetune_modes", "_cli_train", "export"):
        for f in ast.walk(ast.parse((SRC / f"{m}.py").read_text())):
            if isinstance(f, ast.FunctionDef):
                assert f.end_lineno - f.lineno < 85, f"{m}.{f.name} is {f.end_lineno - f.lineno + 1} lines"


def test_only_sources_reads_pixels_or_transposes_planes():
    """`sources.Source` is the one reader of planes and windows (issue #31): no other core module indexes a
    source's array or reorders axes. The bicubic matrices' ``.T`` in the kernel is algebra, not layout."""
    algebra = {("kernel", "mx")}
    for path in sorted(SRC.glob("*.py")):
        if path.stem == "sources":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and isinstance(node.ctx, ast.Load):  # a sink writing its own array is not a read
                assert node.value.attr != "array", f"{path.stem}:{node.lineno} reads a source's array"
            if isinstance(node, ast.Attribute) and node.attr == "T":
                name = node.value.id if isinstance(node.value, ast.Name) else None
                assert (path.stem, name) in algebra, f"{path.stem}:{node.lineno} transposes with .T"
            if isinstance(node, ast.Attribute) and node.attr in ("swapaxes", "moveaxis"):
                raise AssertionError(f"{path.stem}:{node.lineno} reorders axes ({node.attr})")
            if isinstance(node, ast.Compare) and "index(\"Y\")" in ast.unparse(node):
                raise AssertionError(f"{path.stem}:{node.lineno} decides the Y/X order itself")


def test_importing_memnet_or_its_options_loads_neither_torch_nor_onnxruntime():
    """The CLI and the widget read defaults without paying for torch (issue #36); names load on use."""
    import subprocess
    import sys

    code = ("import sys, memnet, memnet.options; assert memnet.RestoreOptions().tile == 'auto'; "
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules)); "
            "memnet.MemNet; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"], out
    # `memnet --help` builds every subcommand's parser (modes, defaults, formats) without them too
    code = ("import sys, memnet.cli; memnet.cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["[]"]


def test_each_training_default_has_one_home():
    """`memnet train` and `memnet finetune` show and use TrainConfig's and FinetuneConfig's defaults: none
    restated in the CLI (issue #36)."""
    import dataclasses

    from memnet.cli import build_parser
    from memnet.finetune_modes import FinetuneConfig
    from memnet.train_options import TrainConfig, default

    ns = vars(build_parser().parse_args(["train", "--task", "denoise", "--out", "x"]))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"task", "out"}
    shown = fields & set(ns)
    assert shown >= {"patch", "batch_size", "steps", "lr", "optimizer", "loss", "amp", "noise", "bn_batches"}
    for name in shown:
        want = default(TrainConfig, name)
        assert ns[name] == want or (ns[name] is None and want == ()), f"--{name}: CLI {ns[name]!r}, config {want!r}"
    ns = vars(build_parser().parse_args(["finetune", "--data", "x", "-o", "y"]))
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"name"}
    shown = fields & set(ns)
    assert shown >= {"model", "mode", "minutes", "patch", "batch_size", "lr", "val_fraction", "z", "amp", "bn"}
    for name in shown:
        assert ns[name] == default(FinetuneConfig, name), f"finetune --{name}: {ns[name]!r}"
    text = (SRC / "_cli_train.py").read_text()
    for start, end in (('sub.add_parser("train"', "_register_finetune(sub)\n"),
                       ('sub.add_parser("finetune"', "def _register_eval")):
        part = text[text.index(start):text.index(end)]
        assert not re.search(r"default=(\d|\"|')", part), f"a default is restated in the CLI: {start}"


# The floors of memnet, bottom up: a module imports only from its own floor or the floors below.
FLOORS = [
    {"runtime", "options", "train_options", "dtypes", "normalize", "outputs", "tiling", "ngff", "metrics",
     "resample", "fingerprint", "_cli_types", "arch"},  # standard library, numpy
    {"model", "degrade", "synthstack", "sources", "sinks", "io", "zoo", "zblend"},  # network, degradations, files
    {"inference", "ortgraph", "graphs", "evaluate", "memory"},  # the network's inference form, exports' graphs, scores
    {"runner", "kernel"},  # a restore job
    {"local", "lazy", "distributed"},  # its executors
    {"engine"},  # restore(): picks an executor
    {"fitloop", "trainset", "train", "stacktrain", "finetune_modes", "finetune", "export", "bioimage_package"},
    {"cli", "_cli_restore", "_cli_train", "_cli_export", "__main__", "__init__"},  # the command line, the façade
]


def test_no_module_imports_from_a_floor_above_it():
    floor = {m: i for i, names in enumerate(FLOORS) for m in names}
    modules = {p.stem for p in SRC.glob("*.py")}
    assert modules <= set(floor), f"modules without a floor: {sorted(modules - set(floor))}"
    for m in sorted(modules):
        for node in _imports(m):
            for t in [node.module.split(".")[0]] if node.module else [a.name for a in node.names]:
                assert floor.get(t, -1) <= floor[m], f"{m} (floor {floor[m]}) imports {t} (floor {floor[t]})"
    kernel = {n.module for n in _imports("kernel")}
    assert "degrade" not in kernel and "engine" not in {n.module for n in _imports("train")}


def test_the_tests_import_no_private_names():
    """Tests use the public API of each module (issue #36): a private name may change without notice."""
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memnet"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.name}:{node.lineno} imports {private} from {node.module}"
