"""The repository's layout rules, checked on the source text (nothing is imported or run):

1. no import cycles among the project's modules (every import, at module level or inside a function,
   absolute or relative);
2. imports run one way between packages, by the table `ALLOWED` below;
3. no module over `MAX_LINES` lines;
4. one implementation of reading: only library/files/text.py opens text files, only
   library/files/images.py calls PIL's `Image.open`;
5. README.md and docs/*.md stand alone: no references to notes outside the repository, and every
   repository path they name in backticks exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = ("train_magicapture.py", "generate.py", "evaluate.py", "app.py")
PACKAGES = ("library", "dataset_tools", "testkit")

# Which package may import which (the importer's own package is always allowed). Layers, top to bottom:
# entry points -> training, generation -> export, postprocess, faces, evaluation -> models, config, files.
# A package not listed as a key, or a pair not in its set, is a violation. "library" is library/__init__.py.
BOTTOM = {"models", "config", "files"}
ALLOWED: dict[str, set[str]] = {
    "entry": {"app", "training", "generation", "export", "postprocess", "faces", "evaluation", "models", "config",
              "files", "dataset_tools"},
    # the web page sits with the entry points: it runs the dataset tools, training (as a subprocess) and generation
    "app": {"training", "generation", "export", "faces", "evaluation", "models", "config", "files", "dataset_tools"},
    "dataset_tools": {"faces", "evaluation", "files", "config"},
    # test support (tiny models, prepared folders): the tests, the demo and the benchmarks use it; nothing in
    # library/ or dataset_tools/ may, so that what users run holds no test fixtures
    "testkit": {"models", "config", "files"},
    "training": {"evaluation", "export", "faces", "models", "config", "files"},
    "generation": {"export", "postprocess", "models", "config", "files"},
    "export": {"models", "config", "files"},
    "postprocess": {"faces", "models", "config", "files"},
    "faces": {"files"},
    "evaluation": {"faces", "models", "config", "files"},
    "models": {"files"},
    "config": {"files"},
    "files": set(),
    "library": set(),
}

# ~500 lines is the rule for a module; the slack lets a module grow a little before it must be split.
MAX_LINES = 560


def _project_files() -> dict[str, Path]:
    """Dotted module name -> file, for library/, dataset_tools/ and the entry scripts."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    for name in ENTRY_SCRIPTS:
        mods[name[:-3]] = ROOT / name
    return mods


MODULES = _project_files()


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute dotted name of `from <.. level><module> import ...` written in `importer`."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _target(name: str) -> str | None:
    """The project module `name` refers to: itself, or its nearest enclosing project module (an
    attribute imported from a module, e.g. `library.faces.detect_face_landmarks` -> `library.faces`)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, source: str | None = None, is_package: bool | None = None) -> set[str]:
    """Project modules `module` imports anywhere in its file (module level, functions, try blocks);
    `source` / `is_package` stand in for the file's text and kind (for the parser's own test)."""
    path = MODULES.get(module)
    if source is None:
        source = path.read_text(encoding="utf-8")
    if is_package is None:
        is_package = path is not None and path.name == "__init__.py"
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, module, is_package)
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in map(_target, names) if t is not None and t != module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def package_of(module: str) -> str:
    """Which row of ALLOWED a module belongs to: "entry", "dataset_tools", "library" or library's subpackage."""
    parts = module.split(".")
    if parts[0] == "library":
        return parts[1] if len(parts) > 1 else "library"
    if parts[0] in ("dataset_tools", "testkit"):
        return parts[0]
    return "entry"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _calls(path: Path):
    """Every call in a file, with its line."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def _owner(func: ast.expr) -> str | None:
    """`os` in `os.open(...)`; None for a bare name or an expression (`Path(p).open`)."""
    return func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None


def _opens_text_for_reading(call: ast.Call) -> bool:
    """`open(...)`, `io.open`, `codecs.open`, `path.open(...)` in a text mode that reads (no mode, or one
    with r or + and no b), or `path.read_text(...)`. `os.open` (a file descriptor) and PIL's `Image.open`
    (checked on its own) are not text reads."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if name == "read_text" and isinstance(func, ast.Attribute):
        return True
    if name != "open" or _owner(func) in ("os", "Image"):
        return False
    modes = [k.value for k in call.keywords if k.arg == "mode"]
    modes += [a for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
              and re.fullmatch(r"[rwaxbt+]+", a.value)]
    if not modes:
        return True  # the default mode is "r": text
    mode = modes[0]
    if not (isinstance(mode, ast.Constant) and isinstance(mode.value, str)):
        return True  # a mode computed at run time could be a text read
    return "b" not in mode.value and ("r" in mode.value or "+" in mode.value)


def _root_name(func: ast.expr) -> str | None:
    """`imageio` in `imageio.v3.imread(...)`."""
    while isinstance(func, ast.Attribute):
        func = func.value
    return func.id if isinstance(func, ast.Name) else None


def _opens_images(call: ast.Call) -> bool:
    """PIL's `Image.open(...)` or `ImageFile.Parser()`, `cv2.imread(...)`, anything of imageio's."""
    func = call.func
    return isinstance(func, ast.Attribute) and (
        (func.attr, _owner(func)) in (("open", "Image"), ("Parser", "ImageFile"), ("imread", "cv2"))
        or _root_name(func) == "imageio")


# -------------------------------------------------------------------------------------------- tests


def test_the_import_parser_sees_relative_function_level_and_from_imports():
    """The parser behind the checks below, on a written module `library.faces.example`: each import
    form must resolve to the project module named in the comment."""
    source = """
import numpy as np                                   # not the project's: ignored
from . import geometry                               # library.faces.geometry
from .masks import oval_mask                         # library.faces.masks
from ..files import images                           # library.files.images
from library.faces import detect_face_landmarks      # library.faces (a name in its __init__)
def late():
    import library.config                            # library.config, inside a function
    from library.models.family import ModelFamily    # library.models.family
try:
    from library.export.kohya import save_lora       # library.export.kohya, in a try block
except ImportError:
    pass
"""
    assert imports_of("library.faces.example", source, is_package=False) == {
        "library.faces.geometry", "library.faces.masks", "library.files.images", "library.faces",
        "library.config", "library.models.family", "library.export.kohya"}
    # in a package's __init__, "." is the package itself
    assert imports_of("library.faces", "from . import geometry\nfrom .analyzer import FaceAnalyzer\n",
                      is_package=True) == {"library.faces.geometry", "library.faces.analyzer"}


def test_no_import_cycles():
    """No two project modules import each other, directly or through others (a cycle breaks whichever
    import comes first at run time, and hides which module is the lower one)."""
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_imports_run_one_way_between_packages():
    """Every import between two packages is allowed by ALLOWED (entry points -> training, generation ->
    export, postprocess, faces, evaluation -> models, config, files)."""
    unknown = sorted({package_of(m) for m in MODULES} - set(ALLOWED))
    assert unknown == [], f"packages missing from the ALLOWED table: {unknown}"
    violations = sorted(
        f"{m} ({package_of(m)}) imports {d} ({package_of(d)})"
        for m, deps in GRAPH.items() for d in deps
        if package_of(d) != package_of(m) and package_of(d) not in ALLOWED[package_of(m)]
    )
    assert violations == []


def test_the_table_is_layered():
    """The table itself runs one way: no package may import one that may import it back, and the
    bottom layer imports nothing above it."""
    both_ways = sorted(f"{a} <-> {b}" for a, deps in ALLOWED.items() for b in deps if a in ALLOWED.get(b, ()) and a < b)
    assert both_ways == []
    assert all(ALLOWED[p] <= {"files"} for p in BOTTOM) and ALLOWED["files"] == set()


def test_no_module_is_over_the_line_limit():
    long = sorted(f"{_rel(p)}: {n} lines" for p in MODULES.values()
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES)
    assert long == []


def test_only_the_text_reader_reads_text_files():
    """Every text file is read through library/files/text.py (UTF-8 / UTF-16 with a mark, or one line
    naming the file); no module outside library/files/ opens a file in a text mode for reading (inside
    it, atomic.py reads the umask from /proc/self/status, a system file and no user's)."""
    files = ROOT / "library" / "files"
    offenders = sorted(f"{_rel(p)}:{c.lineno}" for p in MODULES.values() if files not in p.parents
                       for c in _calls(p) if _opens_text_for_reading(c))
    assert offenders == []


def test_only_the_image_reader_opens_image_files():
    """Every image file is read through library/files/images.py (EXIF, 16-bit, CMYK, transparency are
    handled there once), in library/, dataset_tools/ and the entry points."""
    reader = ROOT / "library" / "files" / "images.py"
    offenders = sorted(f"{_rel(p)}:{c.lineno}" for p in MODULES.values() if p != reader
                       for c in _calls(p) if _opens_images(c))
    assert offenders == []
    assert any(_opens_images(c) for c in _calls(reader))  # the check sees the one that does


def test_the_call_checks_classify_calls():
    """Which calls count as a text read or an image open, by the rules in their docstrings."""
    def first_call(code):
        return next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call))

    text_reads = ['open(p)', 'open(p, "r", encoding="utf-8")', 'open(p, mode="r+")', 'io.open(p)',
                  'Path(p).open()', 'p.read_text("utf-8")', 'open(p, m)']
    not_text_reads = ['open(p, "rb")', 'open(p, "w")', 'open(p, "a", encoding="utf-8")', 'os.open(p, os.O_RDONLY)',
                      'Image.open(p)', 'Path(p).open("wb")', 'p.read_bytes()', 'read_text(p)']
    assert [_opens_text_for_reading(first_call(c)) for c in text_reads] == [True] * len(text_reads)
    assert [_opens_text_for_reading(first_call(c)) for c in not_text_reads] == [False] * len(not_text_reads)
    images = ("Image.open(p)", "cv2.imread(p)", "imageio.v3.imread(p)", "ImageFile.Parser()", "open(p)",
              "os.open(p, 0)", "cv2.imwrite(p, a)", "Image.new('RGB', s)")
    assert [_opens_images(first_call(c)) for c in images] == [True] * 4 + [False] * 4


# ------------------------------------------------------------------------------------- documentation

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# notes that live outside the repository: the documentation must stand alone
OUTSIDE_REFERENCES = ("../shared", "METHOD.md", "DESIGN.md")
# a repository path in backticks: starts with a top-level folder or is a top-level script
REPO_PATH = re.compile(r"^(?:(?:library|dataset_tools|testkit|tests|configs|bench|scripts|docs)/[\w./+-]*|\w+\.py)$")


def backticked_paths(markdown: str) -> list[str]:
    """Repository paths named in inline code (`library/files/text.py`, `tests/test_x.py::test_y`,
    `generate.py`) outside fenced code blocks (those hold commands with the user's own paths); a
    `::test` suffix is dropped, and so is anything after the first space."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    found = []
    for span in re.findall(r"`([^`\n]+)`", text):
        word = span.split()[0].split("::")[0] if span.strip() else ""
        if REPO_PATH.match(word):
            found.append(word)
    return found


def test_docs_exist_and_readme_links_them():
    names = {p.name for p in DOCS}
    assert {"README.md", "method.md", "design.md", "formats.md"} <= names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert all(f"(docs/{n})" in readme for n in ("method.md", "design.md", "formats.md"))
    assert readme.count("make demo") >= 1 and readme.count("make test") >= 1


def test_docs_refer_to_nothing_outside_the_repository():
    """README.md, docs/*.md, the project's modules, the tests and the shipped configs name no notes that
    live outside the repository (the method and the design are docs/method.md and docs/design.md)."""
    texts = [*DOCS, *MODULES.values(), *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "configs").glob("*.toml"))]
    offenders = sorted(f"{_rel(p)}: {ref}" for p in texts if p != Path(__file__).resolve()
                       for ref in OUTSIDE_REFERENCES if ref in p.read_text(encoding="utf-8"))
    assert offenders == []


def test_every_path_the_docs_name_exists():
    missing = sorted({f"{p.name}: {word}" for p in DOCS for word in backticked_paths(p.read_text(encoding="utf-8"))
                      if not (ROOT / word).exists()})
    assert missing == []


def test_backticked_paths_are_found_by_the_rule():
    markdown = ("See `library/files/text.py` and `tests/test_layout.py::test_x`; run `generate.py --n 2`;\n"
                "not `out/run/NAME.safetensors`, not `ss_*`, not `a b`.\n"
                "```bash\npython `library/not_here.py`\n```\n")
    assert backticked_paths(markdown) == ["library/files/text.py", "tests/test_layout.py", "generate.py"]
