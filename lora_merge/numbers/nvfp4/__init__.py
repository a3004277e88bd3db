"""NVFP4 (e2m1 codes, groups of 16 sharing an e4m3 scale, and a global scale): torch's codec (``codec``), merged
and checked through the torch route (``route.GridRoute``, ``check/grid.py``)."""
