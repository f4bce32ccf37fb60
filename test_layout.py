"""The layout's promises (README, "Layout"), checked on the source: one room per file, the engine blind to
the models, no entry point importing another, short functions and lines."""

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
LIBRARY = [
    "part.py", "vit.py", "baselines.py", "engine.py", "cli.py", "bench.py", "weights.py", "data.py", "figures.py"
]
ENTRY_POINTS = ["train.py", "sleep1d.py", "detect.py"]
SOURCES = LIBRARY + ENTRY_POINTS + ["studies/compare_table.py"]
# what the engine may ask of a model: nn.Module's own interface, nothing a method defines
MODULE_API = {
    "train",
    "eval",
    "parameters",
    "named_parameters",
    "buffers",
    "state_dict",
    "load_state_dict",
    "to",
    "no_sync",
    "module",
}


def tree(name):
    return ast.parse((ROOT / name).read_text(), filename=name)


def imports(name):
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def model_classes():
    """Every class that part.py, vit.py, baselines.py and detect.py define."""
    return {
        node.name
        for name in ("part.py", "vit.py", "baselines.py", "detect.py")
        for node in ast.walk(tree(name))
        if isinstance(node, ast.ClassDef)
    }


@pytest.mark.parametrize("name", SOURCES)
def test_each_file_opens_with_what_it_owns(name):
    assert ast.get_docstring(tree(name)), f"{name} has no opening docstring"


def test_the_engine_imports_no_model_nor_click_and_names_no_model_class():
    assert not imports("engine.py") & {
        "part",
        "baselines",
        "detect",
        "sleep1d",
        "train",
        "cli",
        "click",
        "weights",
        "figures",
    }
    names = {node.id for node in ast.walk(tree("engine.py")) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree("engine.py")) if isinstance(node, ast.Attribute)}
    assert not names & model_classes()


def test_the_engine_reads_nothing_of_a_model_but_modules_own_interface():
    asked = {
        node.attr
        for node in ast.walk(tree("engine.py"))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("model", "raw")
    }
    assert asked <= MODULE_API, asked - MODULE_API


@pytest.mark.parametrize("name", LIBRARY + ENTRY_POINTS)
def test_no_entry_point_is_imported(name):
    assert not imports(name) & {Path(e).stem for e in ENTRY_POINTS if e != name}


@pytest.mark.parametrize("name", SOURCES)
def test_functions_are_short_and_lines_within_120_characters(name):
    long_functions = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree(name))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    long_lines = [i for i, line in enumerate((ROOT / name).read_text().splitlines(), 1) if len(line) > 120]
    assert long_functions == [] and long_lines == [], (long_functions, long_lines[:10])


def prose_share(name):
    """Characters of docstrings and comments per character of code (the issue's and STYLE.md's measure)."""
    src = (ROOT / name).read_text()
    prose = sum(len(t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT)
    prose += sum(
        len(ast.get_docstring(n, clean=False) or "")
        for n in ast.walk(ast.parse(src))
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    )
    return prose / (len(src) - prose)


def test_part_py_reaches_part_forward_early_and_its_prose_stays_at_the_anchors_level():
    part_class = next(n for n in tree("part.py").body if isinstance(n, ast.ClassDef) and n.name == "PART")
    forward = next(n for n in part_class.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    assert forward.lineno <= 300 and prose_share("part.py") <= 0.6, (forward.lineno, prose_share("part.py"))


def test_the_engine_holds_no_loop_state_class():
    """The loop is functions; a class in engine.py is a value (dataclass), an error, torch's data plumbing or a file
    it holds open (a context manager), never the loop's locals moved onto self."""
    for node in tree("engine.py").body:
        if isinstance(node, ast.ClassDef):
            dataclass = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            bases = {ast.unparse(b) for b in node.bases}
            resource = any(isinstance(f, ast.FunctionDef) and f.name == "__enter__" for f in node.body)
            assert dataclass or resource or bases & {"Exception", "Dataset", "DistributedSampler"}, node.name
