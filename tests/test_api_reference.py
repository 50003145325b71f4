"""The API reference (docs/api) builds from the docstrings with Sphinx, offline, warnings as
errors, and lists every optimizer, transform, Hessian estimator and label helper with the
defaults of its hyperparameters."""

import html
import inspect
import pathlib
import re
import subprocess
import sys

import sophia_lambda_jax as slj
from sophia_lambda_jax import hessian, labels, transforms

REPO = pathlib.Path(__file__).resolve().parents[1]


def _public(module):
  """The functions and classes `module` defines whose names do not start with _."""
  return [name for name, obj in vars(module).items()
          if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
          and obj.__module__ == module.__name__]


def test_api_reference_builds_with_warnings_as_errors_and_lists_every_name(tmp_path):
  out = tmp_path / "html"
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
       str(REPO / "docs" / "api"), str(out)], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  page = (out / "index.html").read_text()
  ids = set(re.findall(r'id="(sophia_lambda_jax\.[\w.]+)"', page))
  expected = {f"sophia_lambda_jax.{name}" for name in slj.OPTIMIZERS}
  expected |= {f"sophia_lambda_jax.{name}" for name in (
      "OptimizerSpec", "get_optimizer", "register", "unregister", "resolve")}
  for module in (transforms, hessian, labels):
    names = _public(module)
    assert names, module
    expected |= {f"{module.__name__}.{name}" for name in names}
  assert not expected - ids, sorted(expected - ids)
  # Each optimizer's hyperparameters with their defaults, as its signature states them.
  text = html.unescape(re.sub(r"<[^>]+>", "", page))
  for name, spec in slj.OPTIMIZERS.items():
    (signature,) = re.findall(rf"sophia_lambda_jax\.{name}\((.*?)\) →", text)
    for parameter in inspect.signature(spec.factory).parameters.values():
      default = "" if parameter.default is inspect.Parameter.empty else \
          rf" = {re.escape(repr(parameter.default))}"
      assert re.search(rf"(^|, ){parameter.name}(: [^=]+?)?{default}(,|$)", signature), \
          (name, parameter.name, signature)
