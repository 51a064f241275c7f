# The package version: read by setup.py and ckd_ext/__init__.py, written nowhere else.
__version__ = "0.1.0"
