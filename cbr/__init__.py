"""cbr: case-based reasoning for medical images.

Kept free of heavy imports so that ``cbr --help`` stays instant; import the submodules you need.
"""

from cbr.errors import CbrError

__version__ = "0.1.0"
__all__ = ["CbrError", "__version__"]
