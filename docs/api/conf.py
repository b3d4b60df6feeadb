"""Sphinx configuration of the API reference (scripts/docs.sh builds it, warnings as errors)."""

from __future__ import annotations

import xengrant

project = "xengrant"
author = "the xengrant developers"
copyright = "2026, the xengrant developers"
release = version = xengrant.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' Args/Returns/Raises/Attributes sections
    "sphinx.ext.viewcode",
]
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # Attributes: as fields, not a second description of each member
html_theme = "alabaster"
html_static_path: list[str] = []
exclude_patterns = ["_build"]
