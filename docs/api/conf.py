"""Sphinx configuration of the API reference: `sphinx-build -W docs/api OUT` (offline)."""

import pathlib
import sys

# The checkout's package, whatever is installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

project = "sophia-lambda-jax"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as fields of the class entry (autodoc lists a NamedTuple's fields itself).
napoleon_use_ivar = True
html_theme = "alabaster"
exclude_patterns = ["_build"]
