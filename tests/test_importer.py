"""Bulk import (`recsys import-events`) and the pseudonymization key it shares with the gateway."""

from __future__ import annotations

import csv
import stat
from pathlib import Path

import numpy as np
import pytest

from gateway.importer import import_events
from gateway.privacy import KEY_FILE_NAME, USER_KEY_ENV, Pseudonymizer, load_user_key
from gateway.store import Event, UserStore, open_store
from recsys_cli.main import main
from recsys_common.config import ConfigError
from tests.test_store import backend, make_store, redis_server, store_url  # noqa: F401  (the store suite's fixtures)

KEY = b"0123456789abcdef0123456789abcdef"


def write_generic(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with (path / "interactions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("user_id", "item_id", "timestamp"))
        writer.writerows(rows)
    return path


def synthetic(n_users: int, per_user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    users = np.repeat([f"user{u}" for u in range(n_users)], per_user)
    items = np.array([f"i{i}" for i in rng.integers(0, 500, size=n_users * per_user)])
    stamps = np.tile(np.arange(per_user, dtype=np.int64), n_users) + 1_000
    order = rng.permutation(len(users))  # file order is not time order
    return users[order], items[order], stamps[order]


# --- pseudonymization ----------------------------------------------------------------------------


def test_pseudonymizer_is_keyed_stable_and_separates_domains() -> None:
    p, other = Pseudonymizer(KEY), Pseudonymizer(KEY[::-1])
    key = p.user_key("alice")
    assert key == p.user_key("alice") and len(key) == 64 and int(key, 16) >= 0
    assert key != other.user_key("alice") and key != p.user_key("bob")
    assert p.event_key("alice") != key, "user and event ids are hashed in separate domains"
    assert p.event_key("") == ""
    assert p.event(Event("alice", "i1", 5, "e1", "click")) == Event(key, "i1", 5, p.event_key("e1"), "click")
    with pytest.raises(ValueError, match="at least"):
        Pseudonymizer(b"short")


def test_production_mode_refuses_to_run_without_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=USER_KEY_ENV):
        load_user_key(None, tmp_path, "production")
    assert not (tmp_path / KEY_FILE_NAME).exists()
    assert load_user_key("k" * 40, None, "production") == b"k" * 40
    with pytest.raises(ConfigError, match="at least 32"):
        load_user_key("too-short", tmp_path, "production")
    with pytest.raises(ConfigError, match="RECSYS_GATEWAY_MODE"):
        load_user_key(None, tmp_path, "staging")


def test_dev_mode_makes_one_private_key_in_the_state_dir(tmp_path: Path) -> None:
    first = load_user_key(None, tmp_path / "state", "dev")
    assert load_user_key(None, tmp_path / "state", "dev") == first
    mode = stat.S_IMODE((tmp_path / "state" / KEY_FILE_NAME).stat().st_mode)
    assert mode == 0o600
    assert list((tmp_path / "state").iterdir()) == [tmp_path / "state" / KEY_FILE_NAME]
    with pytest.raises(ConfigError, match="every replica"):
        load_user_key(None, None, "dev")  # a Redis store has no local dir: a per-process key would split users


# --- import ----------------------------------------------------------------------------------------


def test_import_pseudonymizes_trims_and_is_idempotent(make_store: object) -> None:  # noqa: F811
    store: UserStore = make_store(max_events_per_user=30)  # type: ignore[operator]
    users, items, stamps = synthetic(n_users=20, per_user=50)
    p = Pseudonymizer(KEY)
    report = import_events(users, items, stamps, store, p, chunk=300, progress=False)
    assert (report.rows, report.stored, report.users) == (1000, 1000, 20)
    assert store.recent("user3", 100) == [], "raw user ids never reach the store"
    history = store.recent(p.user_key("user3"), 100)
    mine = sorted(zip(stamps[users == "user3"].tolist(), items[users == "user3"].tolist(), strict=True))
    assert [(e.timestamp, e.item_id) for e in history] == mine[-30:]
    again = import_events(users, items, stamps, store, p, chunk=1000, progress=False)
    assert again.stored == 0
    assert len(store.trending(1000)) == len(set(items.tolist()))


def test_import_is_fast_enough_not_to_be_quadratic(tmp_path: Path) -> None:
    users, items, stamps = synthetic(n_users=500, per_user=100)
    store = open_store(str(tmp_path))
    try:
        report = import_events(users, items, stamps, store, Pseudonymizer(KEY), progress=False)
    finally:
        store.close()
    # The target on a quiet 2-core machine is >= 50,000 events/s; this floor only catches regressions.
    assert report.events_per_s > 10_000, report.line()


def test_cli_import_uses_the_state_dir_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: object) -> None:
    monkeypatch.delenv(USER_KEY_ENV, raising=False)
    data = write_generic(tmp_path / "data", [("u1", "a", 3), ("u1", "b", 1), ("u2", "a", 2)])
    state = tmp_path / "state"
    for expected_new in (3, 0):
        with pytest.raises(SystemExit) as done:
            main(["import-events", "--data", str(data), "--state", str(state), "--quiet"])
        assert done.value.code == 0
        assert f"{expected_new} new" in capsys.readouterr().out  # type: ignore[attr-defined]
    p = Pseudonymizer(load_user_key(None, state, "dev"))
    store = open_store(str(state))
    try:
        assert [e.item_id for e in store.recent(p.user_key("u1"), 10)] == ["b", "a"]
    finally:
        store.close()


def test_cli_import_in_production_mode_needs_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(USER_KEY_ENV, raising=False)
    data = write_generic(tmp_path / "data", [("u1", "a", 3)])
    with pytest.raises(SystemExit) as refused:
        main(["import-events", "--data", str(data), "--state", str(tmp_path / "s"), "--mode", "production"])
    assert refused.value.code == 2 and USER_KEY_ENV in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text("x" * 40)
    key_file.chmod(0o600)
    with pytest.raises(SystemExit) as done:
        main(["import-events", "--data", str(data), "--state", str(tmp_path / "s"), "--mode", "production",
              "--user-key-file", str(key_file), "--quiet"])  # fmt: skip
    assert done.value.code == 0
