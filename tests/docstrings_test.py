"""Every public function of the package that takes more than one argument documents them."""

import ast
import pathlib

import tensorflow as tf

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'tff_clipq'


def _arguments(node: ast.FunctionDef) -> list[str]:
  args = node.args
  names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
  names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
  return [name for name in names if name not in ('self', 'cls')]


def _public_functions(tree: ast.Module):
  """(qualified name, node) for public module-level functions and public methods of classes."""
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and not node.name.startswith('_'):
      yield node.name, node
    elif isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
      for item in node.body:
        if isinstance(item, ast.FunctionDef) and (
          not item.name.startswith('_') or item.name == '__init__'
        ):
          yield f'{node.name}.{item.name}', item


def undocumented_arguments() -> list[str]:
  """Public functions in tff_clipq/ with two or more arguments and no Args section."""
  missing = []
  for path in sorted(PACKAGE.rglob('*.py')):
    if any(part.startswith('_') and part != '__init__.py' for part in path.parts[-2:]):
      continue
    tree = ast.parse(path.read_text(), filename=str(path))
    for name, node in _public_functions(tree):
      if len(_arguments(node)) < 2:
        continue
      docstring = ast.get_docstring(node) or ''
      if name.endswith('.__init__'):
        # A constructor may document its arguments in the class docstring instead.
        class_node = next(
          n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name.split('.')[0]
        )
        docstring += ast.get_docstring(class_node) or ''
      if 'Args:' not in docstring:
        missing.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}')
  return missing


class DocstringsTest(tf.test.TestCase):
  def test_public_functions_with_several_arguments_have_an_args_section(self):
    missing = undocumented_arguments()
    self.assertEmpty(missing, 'No Args section:\n' + '\n'.join(missing))


if __name__ == '__main__':
  tf.test.main()
