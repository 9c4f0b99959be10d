"""Hot swap: watch CURRENT, verify and load a new bundle in the background, then swap one reference.

Generic over what a service builds from a bundle (a loader callable), so retrieval, ranking and the
gateway share one implementation::

    holder = SnapshotHolder(bundles_dir, lambda bundle: Retriever(bundle), poll_interval_s=1.0)
    holder.load_current()          # blocking first load (raises if the published bundle is bad)
    holder.start()                 # background thread polls CURRENT
    snapshot = holder.get()        # one reference per request, used from start to end

A new version is verified (its signature when a BundleTrust is given, every checksum, no extra file, no
path leaving the directory, shapes) by recsys_common.bundle.open_bundle before the loader runs, so
nothing of a damaged or wrongly signed bundle is ever loaded; a refused version is logged once with
the file and the reason, remembered, and the old snapshot keeps serving. Polling needs no extra
dependency and works on every filesystem (inotify does not see a CURRENT replaced over NFS or a mounted ConfigMap).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from recsys_common.bundle import Bundle, current_version, open_bundle
from recsys_common.errors import BundleMismatch, BundleUnavailable, RecsysError
from recsys_common.metrics import BUNDLE_REFUSED, BUNDLE_SWAPS, set_bundle_version
from recsys_common.signing import BundleTrust

log = logging.getLogger(__name__)

T = TypeVar("T")


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS, so resident memory follows the live snapshots (glibc only)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SnapshotHolder(Generic[T]):
    """The serving snapshot of the published bundle, replaced as a whole when CURRENT moves.

    loader(bundle) builds and warms a snapshot from a verified bundle; it runs outside any lock, while
    the old snapshot keeps serving. finalize(snapshot), if given, runs under the swap lock right
    before the swap (for state that must carry over, such as runtime filters); update(fn) applies the
    same kind of change to the live snapshot.
    """

    def __init__(
        self,
        bundles_dir: Path,
        loader: Callable[[Bundle], T],
        poll_interval_s: float = 1.0,
        finalize: Callable[[T], T] | None = None,
        name: str = "snapshot",
        trust: BundleTrust | None = None,
    ) -> None:
        self.bundles_dir = Path(bundles_dir)
        self.trust = trust
        self.loader = loader
        self.poll_interval_s = poll_interval_s
        self.finalize = finalize
        self.name = name
        self._current: T | None = None
        self._version: str | None = None
        self._previous: tuple[str, T] | None = None  # kept for requests pinned to it, until the next swap
        self._refused: dict[str, str] = {}
        self._swap_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pointer_problem = ""
        self.swaps = 0
        self.on_swap: list[Callable[[str], None]] = []

    # -- reading --------------------------------------------------------------------------------
    def get(self, version: str = "") -> T:
        """The snapshot to serve a request with: take it once per request and use only that reference.

        With a version (a caller pinning the version the rest of its request uses), the previous
        snapshot still answers for its version after a swap, so the services of a stack, which
        notice a new CURRENT a poll apart, keep serving one coherent version per request.
        """
        current, served, previous = self._current, self._version, self._previous
        if current is None:
            raise BundleUnavailable(f"{self.name}: no bundle loaded yet from {self.bundles_dir}")
        if not version or version == served:
            return current
        if previous is not None and version == previous[0]:
            return previous[1]
        raise BundleMismatch(
            f"bundle_version {version!r} was asked for; this server has {served!r}"
            + (f" (and {previous[0]!r})" if previous is not None else "")
        )

    @property
    def version(self) -> str | None:
        return self._version

    @property
    def refused(self) -> dict[str, str]:
        """Versions refused so far, with the reason (they are not tried again: bundles are immutable)."""
        return dict(self._refused)

    # -- loading --------------------------------------------------------------------------------
    def load_current(self, raise_errors: bool = True) -> bool:
        """Load CURRENT if it names a version other than the served one; True when a swap happened.

        With raise_errors (the first load) a bad bundle raises; otherwise it is logged and refused.
        """
        with self._load_lock:
            try:
                version = current_version(self.bundles_dir)
            except RecsysError as err:
                if raise_errors:
                    raise
                if str(err) != self._pointer_problem:
                    log.error("%s: cannot read the published version: %s; keeping %s", self.name, err, self._version)
                    self._pointer_problem = str(err)
                return False
            self._pointer_problem = ""
            if version == self._version or version in self._refused:
                return False
            try:
                # Verify everything (signature first) before loading anything.
                bundle = open_bundle(self.bundles_dir, version, self.trust)
                snapshot = self.loader(bundle)
            except Exception as err:
                if raise_errors:
                    raise
                reason = str(err) if isinstance(err, RecsysError) else f"{type(err).__name__}: {err}"
                self._refused[version] = reason
                BUNDLE_REFUSED.labels(self.name).inc()
                log.error("%s: refused bundle %s: %s; still serving %s", self.name, version, reason, self._version)
                return False
            self._swap(version, snapshot)
            return True

    def _swap(self, version: str, snapshot: T) -> None:
        with self._swap_lock:
            if self.finalize is not None:
                snapshot = self.finalize(snapshot)
            old = self._version
            self._previous = (old, self._current) if old is not None and self._current is not None else None
            self._current = snapshot  # the one reference swap; requests holding the old one finish with it
            self._version = version
            self.swaps += 1
        del snapshot
        set_bundle_version(self.name, version, old)
        BUNDLE_SWAPS.labels(self.name).inc()
        log.info("%s: now serving bundle %s (was %s)", self.name, version, old)
        for callback in self.on_swap:
            callback(version)
        # The previous snapshot is freed when its last request lets go; give the memory back to the OS.
        gc.collect()
        _malloc_trim()

    def update(self, fn: Callable[[T], T]) -> T:
        """Replace the live snapshot by fn(snapshot), atomically with respect to swaps."""
        with self._swap_lock:
            updated = fn(self.get())
            self._current = updated
            return updated

    # -- watching -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _watch(self) -> None:
        trim_next = False
        while not self._stop.wait(self.poll_interval_s):
            try:
                swapped = self.load_current(raise_errors=False)
            except Exception:  # never let the watcher die: the old snapshot keeps serving
                log.exception("%s: unexpected error while checking for a new bundle", self.name)
                swapped = False
            if trim_next and not swapped:
                _malloc_trim()  # requests that held the previous snapshot have finished by now
            trim_next = swapped
