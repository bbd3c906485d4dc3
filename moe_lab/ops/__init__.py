"""Ops: autograd Functions and kernels, one op per file, behind thin wrappers (as MegaBlocks).

- :mod:`.grouped_mm`: ``grouped_matmul`` (rows sorted by expert times stacked expert weights;
  ``torch.nn.functional.grouped_mm`` where it runs, else a padded batched matmul);
- :mod:`.all_to_all`: ``all_to_all`` (``all_to_all_single`` with variable splits, autograd-aware);
- :mod:`.gather_rows`: ``gather_rows`` (concatenate every rank's rows, autograd-aware).

Layers call them by name; none holds parameters or state.
"""

from .all_to_all import all_to_all
from .gather_rows import gather_rows
from .grouped_mm import grouped_matmul, grouped_mm_supported

__all__ = ["all_to_all", "gather_rows", "grouped_matmul", "grouped_mm_supported"]
