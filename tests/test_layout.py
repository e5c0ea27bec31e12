"""The package's shape stays what the README's code map says: no import cycles inside
`vitcls/`, and every module named in the map, once."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vitcls")


def _modules(root: str = PACKAGE) -> dict[str, str]:
  """Dotted module name -> file, for every .py file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      parts = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: str, module: str, is_package: bool, known: set[str]) -> set[str]:
  """The vitcls modules `module` imports anywhere in its file (function bodies too: a
  lazy import still runs the other module's top level), TYPE_CHECKING blocks aside."""
  tree = ast.parse(open(path).read(), path)
  package = module if is_package else module.rpartition(".")[0]
  found: set[str] = set()

  def target(name: str) -> None:
    while name and name not in known:  # `from a.b import c` where c is not a module.
      name = name.rpartition(".")[0]
    if name:
      found.add(name)

  def visit(node: ast.AST) -> None:
    if isinstance(node, ast.If) and _is_type_checking(node):
      for child in node.orelse:
        visit(child)
      return
    if isinstance(node, ast.Import):
      for alias in node.names:
        target(alias.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        target(f"{base}.{alias.name}")
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  # A module importing its own package (or a parent) is how Python packages work: the
  # package is already being imported when the module runs. Not a cycle.
  return {m for m in found if m != module and not module.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
  """Module -> the vitcls modules it imports."""
  modules = _modules()
  known = set(modules)
  return {m: _imports(p, m, p.endswith("__init__.py"), known) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_cycles_and_only_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # A diamond.
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_sees_lazy_and_relative_imports(tmp_path):
  pkg = tmp_path / "vitcls"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from . import a\n")
  (pkg / "sub" / "a.py").write_text("def f():\n  from vitcls import b\n")
  (pkg / "b.py").write_text("from vitcls.sub.a import f\nfrom vitcls import sub\n")
  modules = _modules(str(pkg))
  graph = {m: _imports(p, m, p.endswith("__init__.py"), set(modules))
           for m, p in modules.items()}
  assert graph["vitcls.sub"] == {"vitcls.sub.a"}
  assert graph["vitcls.sub.a"] == {"vitcls.b"}
  assert graph["vitcls.b"] == {"vitcls.sub.a", "vitcls.sub"}
  assert find_cycle(graph) == ["vitcls.b", "vitcls.sub", "vitcls.sub.a", "vitcls.b"]


def test_no_import_cycle_inside_vitcls():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def code_map() -> dict[str, str]:
  """The README's code map: `vitcls/...` path -> what it owns."""
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("\n## Code map\n", 1)
  assert len(section) == 2, "README.md has no '## Code map' section"
  body = section[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\| `(vitcls/[^`]*)` \| (.+?) \|$", body, re.M)
  paths = [p for p, _ in rows]
  duplicated = sorted({p for p in paths if paths.count(p) > 1})
  assert not duplicated, f"named twice in the code map: {duplicated}"
  return dict(rows)


def _mapped_name(module: str, path: str) -> str:
  rel = os.path.relpath(path, REPO)
  return os.path.dirname(rel) + "/" if rel.endswith("__init__.py") else rel


def test_the_code_map_names_every_module_and_nothing_else():
  on_disk = {_mapped_name(m, p) for m, p in _modules().items()
             if not p.endswith("__main__.py")}
  on_disk.discard("vitcls/")  # The map is of what is inside the package.
  mapped = code_map()
  missing = sorted(on_disk - set(mapped))
  gone = sorted(set(mapped) - on_disk)
  assert not missing, f"modules without a line in README.md's code map: {missing}"
  assert not gone, f"the code map names what does not exist: {gone}"
  empty = [p for p, what in mapped.items() if len(what.split()) < 3]
  assert not empty, f"code map lines that say nothing: {empty}"
