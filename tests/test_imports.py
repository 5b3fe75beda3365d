"""The package's modules import one another in one direction: no import cycle, counting imports
inside functions too (a lazy import still ties the two modules together)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bert_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: the bert_jax modules it imports}, read with ast (nothing is imported)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                   else node.module for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    # A module's parent packages are imported with it: not an edge of the design.
    graph[name] = {d for d in deps if not name.startswith(d + ".") and d != "bert_jax"}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 1:
        return path[path.index(dep):] + [dep]
      if dep not in state and (cycle := visit(dep)):
        return cycle
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_graph_is_read():
  graph = import_graph()
  assert "bert_jax.trainer" in graph["bert_jax.pretrain"]
  assert "bert_jax.data.errors" in graph["bert_jax.tokenizer"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
  assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))
