"""The parity check: the project's central promise, with code of its own (none of the merge's).

``verdict`` the typed result per tensor (``TensorVerdict``) and per check (``Check``); ``elements`` every element of
a tensor merged with torch, ``grid`` of one written in a quantized format through torch (the CPU paths' checks are
in their format's folder: ``numbers/<format>/check.py``);
``readback`` the comparison of written bytes and the reading of a folder; ``structure``, ``files`` and ``report``
the rest of the report and its table.
"""
