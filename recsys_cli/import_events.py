"""`recsys import-events`: historical interactions into the user-state store (joins exporter and gateway)."""

from __future__ import annotations

import os
from pathlib import Path

from exporter.data import load_dataset
from gateway.importer import ImportReport, import_events
from gateway.privacy import USER_KEY_ENV, Pseudonymizer, key_dir, load_user_key, read_key_file
from gateway.store import DEFAULT_MAX_EVENTS_PER_USER, open_store


def run_import(
    data_dir: Path,
    state: str,
    *,
    user_key_file: Path | None = None,
    mode: str = "dev",
    max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER,
    progress: bool = True,
) -> ImportReport:
    """`recsys import-events`: load the exporter's input layouts from data_dir into the store at `state`.

    The key comes from user_key_file, else RECSYS_GATEWAY_USER_KEY, else (dev mode, local store)
    the state directory's user.key: the same key the gateway uses, so imported users are found.
    """
    key = read_key_file(user_key_file) if user_key_file else load_user_key(
        os.environ.get(USER_KEY_ENV), key_dir(state), mode
    )  # fmt: skip
    ds = load_dataset(data_dir)
    store = open_store(state, max_events_per_user=max_events_per_user)
    try:
        return import_events(ds.user_ids, ds.item_ids, ds.timestamps, store, Pseudonymizer(key), progress=progress)
    finally:
        store.close()
