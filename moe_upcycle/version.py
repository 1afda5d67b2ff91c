"""The package version, read by pyproject.toml (``[tool.setuptools.dynamic]``) and recorded in converted configs."""

__version__ = "0.1.0"
