"""bfloat16, float16 and float32: the merge of a float tensor on the CPU (``merge``), its check (``check``) and the
definition both follow (``spec``: each dtype's rounding and encoding)."""
