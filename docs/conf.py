"""Sphinx configuration of brjax's documentation site.

Build it from the repository root (offline; warnings are errors):

    sphinx-build -W --keep-going -b html docs docs/_build/html

Pages written as MyST text notebooks (``{code-cell}``) are executed at every build; an
error in a cell fails the build. ``ext/coverage_check.py`` fails it when a public name
is missing from the API reference.
"""

from __future__ import annotations

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "ext"))
sys.path.insert(0, str(DOCS.parent))  # brjax itself, also without an installed package

import brjax  # noqa: E402  (after the path)

project = "brjax"
author = "the brjax authors"
copyright = "the brjax authors"  # noqa: A001  (Sphinx's name)
release = brjax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "api_docstrings",
    "coverage_check",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "ext", "requirements.txt",
                    "evidence_plan.txt", "**.ipynb_checkpoints"]

# MyST: the extensions the pages use.
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# myst-nb: every code-cell page runs at every build, and an error fails it.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 300
nb_merge_streams = True
nb_execution_in_temp = True  # files an example writes (mlp.npz) stay out of docs/

# The API reference: from the docstrings, in source order, typed from the signatures.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: no second entry beside the dataclass field
nitpicky = False
# Names that the checked public modules must have documented (ext/coverage_check.py).
coverage_check_modules = [
    "brjax", "brjax.nnx", "brjax.quant", "brjax.models", "brjax.data",
    "brjax.training", "brjax.export", "brjax.studies", "brjax.bench",
]
# The modules whose exported names the API pages document under the module's own name: an
# automodule listing of the module that defines such a name leaves it out (ext/api_docstrings.py).
api_public_modules = [
    "brjax", "brjax.nnx", "brjax.quant", "brjax.models", "brjax.export", "brjax.bench",
]

html_theme = "sphinx_book_theme"
html_title = f"brjax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path: list[str] = []
html_last_updated_fmt = None
