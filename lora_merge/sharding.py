"""The output's weights files: BASE's own, or the tensors in BASE's order cut into shards of at most
``--max-shard-size``, as transformers' ``save_pretrained(max_shard_size=...)`` cuts them. (The checks go by
tensor name, so `verify` takes any layout as it is.)"""

from __future__ import annotations

import re
from dataclasses import replace

from .plan import OutputShard, Plan


def resharded(plan: Plan, max_bytes: int) -> Plan:
    """``plan`` with its tensors, in BASE's order, in shards of at most ``max_bytes`` each (a tensor larger
    than that alone in its shard); one shard is written unindexed as ``<stem>.safetensors``."""
    groups: list[list] = [[]]
    size = 0
    for e in plan.entries:
        if groups[-1] and size + e.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    stem = weights_stem(plan)
    n = len(groups)
    names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shards = tuple(OutputShard(name, tuple(entries), {"format": "pt"}) for name, entries in zip(names, groups))
    return replace(plan, shards=shards, sharded=n > 1, index_name=f"{stem}.safetensors.index.json")


def weights_stem(plan: Plan) -> str:
    """What BASE's weights files are called before their shard numbers: ``model``, ``diffusion_pytorch_model``."""
    first = plan.base.shards[0].path.name
    return re.sub(r"(-\d{5}-of-\d{5})?\.safetensors$", "", first)
