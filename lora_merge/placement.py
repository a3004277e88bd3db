"""Where an adapter's targets land in BASE's files: by name when the names are the files', else through the model's
own layout, which transformers' conversion tables describe (``conversion``; transformers is imported then and only
then, once per BASE), the targets then moved onto the on-disk tensors (``layout.to_disk``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .adapter import Adapter
from .conversion import model_layout
from .errors import LayoutError, LayoutNeeded, name_list
from .formats import load_adapter
from .layout import FilesLayout, ModelLayout, to_disk
from .names import family
from .plan import OUTPUT_EMBEDDINGS
from .sources import BaseModel


class Placement:
    """Places adapters on BASE's files: by name when the names are the files', else through the model's own
    layout (transformers, imported then and only then, once per BASE)."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.files = FilesLayout(base)
        self.model: ModelLayout | None = None
        self.families: set[str] | None = None

    def place(self, path: Path, options=None) -> Adapter:
        """The adapter at ``path`` with every target on an on-disk tensor (or left for the planner to report)."""
        try:
            adapter = self._present(load_adapter(path, self.files, options))
            missing = self._unplaced(adapter)
            if not missing or not self._renamed(missing):
                return adapter  # placed, or names of BASE's own kind that BASE lacks: the plan lists what does not fit
            why = [f"{n}: not a tensor in BASE's files" for n in missing]
        except LayoutNeeded as e:
            why = e.problems
        try:
            model = self.layout()
        except LayoutError as e:  # say which targets needed it
            raise LayoutError(e.args[0], e.problems or [name_list(why)], e.hint) from None
        adapter = load_adapter(path, model, options)
        return to_disk(adapter, model, self.files.shapes)

    def layout(self) -> ModelLayout:
        """The model transformers builds from BASE's files, built once."""
        if self.model is None:
            self.model = model_layout(self.base)
        return self.model

    def _renamed(self, missing: list[str]) -> bool:
        """Whether some targets name tensors of a kind BASE's files do not have (``mlp.experts.gate_up_proj``, a
        ``language_model`` prefix): the model in memory may store them so; more layers than BASE has is not that."""
        if self.families is None:
            self.families = {family(n) for n in self.files.shapes}
        return any(family(n) not in self.families for n in missing)

    def _present(self, adapter: Adapter) -> Adapter:
        """Without the optional targets BASE's files lack (IA3's scaling of a bias the layer does not have)."""
        absent = [n for n, op in adapter.targets.items() if op.optional and n not in self.files.shapes]
        if not absent:
            return adapter
        return replace(adapter, targets={n: op for n, op in adapter.targets.items() if n not in absent})

    def _unplaced(self, adapter: Adapter) -> list[str]:
        """Targets that name no on-disk tensor (an output embedding tied to the input one aside)."""
        return sorted(n for n in adapter.targets if n not in self.files.shapes and n not in OUTPUT_EMBEDDINGS)
