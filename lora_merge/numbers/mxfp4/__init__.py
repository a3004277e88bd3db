"""MXFP4 (e2m1 codes, groups of 32 sharing an e8m0 scale), as gpt-oss stores its experts: the definition
(``spec``), the CPU merge (``merge``) and check (``check``), and torch's codec (``codec``)."""
