"""Bulk import of historical interactions into the user-state store, pseudonymized like live events.

Usage::

    ds = exporter.data.load_dataset(Path("data/ml-100k"))  # or any user_ids/item_ids/timestamps arrays
    report = import_events(ds.user_ids, ds.item_ids, ds.timestamps, store, Pseudonymizer(key))
    print(report.line())

Rows go in file order, in large chunks: each chunk is one store.append (one SQLite transaction
with executemany, trimmed once at its end; or one pipeline of per-user Lua calls for Redis). Each
row gets the event id ``import:<item>:<timestamp>`` (pseudonymized; scoped to its user like every
event id), so re-running an import within the dedupe window stores nothing twice, and an
interrupted import can simply be run again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from gateway.privacy import Pseudonymizer
from gateway.store import Event, UserStore

DEFAULT_CHUNK = 200_000


@dataclass(frozen=True)
class ImportReport:
    rows: int
    stored: int  # new events (rows already in the store within the dedupe window are not stored again)
    users: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"imported {self.rows} rows of {self.users} users in {self.seconds:.2f} s "
            f"({self.events_per_s:,.0f} events/s); {self.stored} new, {self.rows - self.stored} already stored"
        )


def import_events(
    user_ids: Sequence[object],
    item_ids: Sequence[object],
    timestamps: Sequence[object],
    store: UserStore,
    pseudonymizer: Pseudonymizer,
    *,
    chunk: int = DEFAULT_CHUNK,
    event_type: str = "",
    progress: bool = True,
) -> ImportReport:
    """Append every row (user_ids[i], item_ids[i], timestamps[i]) to the store; arrays as numpy or lists."""
    if not len(user_ids) == len(item_ids) == len(timestamps):
        raise ValueError(f"row arrays differ in length: {len(user_ids)}, {len(item_ids)}, {len(timestamps)}")
    users = user_ids.tolist() if hasattr(user_ids, "tolist") else list(user_ids)
    items = item_ids.tolist() if hasattr(item_ids, "tolist") else list(item_ids)
    stamps = timestamps.tolist() if hasattr(timestamps, "tolist") else list(timestamps)
    keys: dict[str, str] = {}
    stored = 0
    start = time.perf_counter()
    with tqdm(total=len(users), desc="import", unit="ev", unit_scale=True, disable=not progress) as bar:
        for lo in range(0, len(users), chunk):
            batch = []
            rows = zip(users[lo : lo + chunk], items[lo : lo + chunk], stamps[lo : lo + chunk], strict=True)
            for user, item, ts in rows:
                user, item, ts = str(user), str(item), int(ts)
                key = keys.get(user)
                if key is None:
                    key = keys[user] = pseudonymizer.user_key(user)
                batch.append(Event(key, item, ts, pseudonymizer.event_key(f"import:{item}:{ts}"), event_type))
            stored += store.append(batch)
            bar.update(len(batch))
    return ImportReport(len(users), stored, len(keys), time.perf_counter() - start)
