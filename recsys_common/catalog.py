"""The bundle's item vocabulary: external string ids <-> dense item indices (1..n; 0 is padding)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from recsys_common.bundle import Bundle


@dataclass(frozen=True)
class Catalog:
    item_ids: tuple[str, ...]  # item_ids[i - 1] is the id of item index i
    titles: tuple[str, ...]
    genres: tuple[tuple[str, ...], ...]
    _index: dict[str, int] = field(repr=False, compare=False)

    @classmethod
    def load(cls, bundle: Bundle) -> Catalog:
        raw = json.loads(bundle.file("items.json").read_text())
        ids = tuple(raw["item_ids"])
        return cls(
            item_ids=ids,
            titles=tuple(raw.get("titles") or [""] * len(ids)),
            genres=tuple(tuple(g) for g in (raw.get("genres") or [[]] * len(ids))),
            _index={item_id: i + 1 for i, item_id in enumerate(ids)},
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_id: str) -> int:
        """Dense index of an item, 0 when the bundle does not know it."""
        return self._index.get(item_id, 0)

    def indices(self, item_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Dense indices, 0 for unknown ids, in the given order."""
        get = self._index.get
        return np.fromiter((get(i, 0) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def known(self, item_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Dense indices of the known ids only, in the given order (unknown ones dropped)."""
        idx = self.indices(item_ids)
        return idx[idx > 0]

    def id_of(self, index: int) -> str:
        return self.item_ids[index - 1]

    def title_of(self, item_id: str) -> str:
        index = self._index.get(item_id, 0)
        return self.titles[index - 1] if index else ""
