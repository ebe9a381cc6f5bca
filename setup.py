"""Build script: the pure-Python package, plus the optional compiled extension (see csrc/)."""

from setuptools import setup

setup()
