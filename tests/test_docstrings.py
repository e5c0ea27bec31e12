"""Every public module, function, class and method in vitcls/ and benchmarks/ says what it
is for. Read with ast, so nothing is imported; closures inside functions are exempt."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("vitcls", "benchmarks")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def missing_docstrings(source, path):
  """`path:line name` for each public definition in `source` that lacks a docstring."""
  tree = ast.parse(source, filename=path)
  missing = [] if ast.get_docstring(tree) else [f"{path}:1 <module>"]
  for node in tree.body:
    if not isinstance(node, _DEFS) or node.name.startswith("_"):
      continue
    if not ast.get_docstring(node):
      missing.append(f"{path}:{node.lineno} {node.name}")
    if isinstance(node, ast.ClassDef):
      for method in node.body:
        if (isinstance(method, _DEFS[:2]) and not method.name.startswith("_")
            and not ast.get_docstring(method)):
          missing.append(f"{path}:{method.lineno} {node.name}.{method.name}")
  return missing


def _sources():
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
      dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
      for name in sorted(filenames):
        if name.endswith(".py"):
          yield os.path.relpath(os.path.join(dirpath, name), ROOT)


def test_public_api_has_docstrings():
  missing = []
  for path in _sources():
    with open(os.path.join(ROOT, path)) as f:
      missing += missing_docstrings(f.read(), path)
  assert not missing, "missing docstrings:\n" + "\n".join(missing)


def test_checker_catches_what_it_should():
  source = '''"""A module."""

def documented():
  """Why."""

def undocumented():
  def closure():
    pass

def _private():
  pass

class Thing:
  """Why."""

  def method(self):
    pass

  def _helper(self):
    pass

class _Hidden:
  def method(self):
    pass
'''
  assert missing_docstrings(source, "m.py") == ["m.py:6 undocumented", "m.py:16 Thing.method"]
  assert missing_docstrings("x = 1\n", "n.py") == ["n.py:1 <module>"]
