"""An exclusive lock on a dataset root, for local disks and object stores alike.

Two pipeline runs on one root would interleave manifest writes; the second must wait or fail with a
message naming the holder. The lock is a small JSON object ``<root>/_lock.json`` created with an
atomic create-if-absent (a conditional ``PUT If-None-Match: *``) on S3, whose holder refreshes an
expiry time from a heartbeat thread; on an object store a lock whose expiry has passed —
or, on the same host, whose process is gone — is stale and is taken over with a compare-and-swap
(``PUT If-Match: <etag>``), so two contenders can never both win. On a local disk the lock is a
kernel ``flock`` on the same file, which dies with its holder.

Fencing. A lease can be lost while its holder still runs (a stalled process, a partitioned host:
its lease expires and another run takes over). The heartbeat notices (its compare-and-swap fails, or
it has not managed to refresh for a whole lease) and marks the lock lost; writers call
:meth:`RootLock.ensure_held` right before they publish, which raises :class:`LockLost` then.
Release is conditional too: the lock is overwritten with a released marker only if it is still ours
(``If-Match`` on our last ETag), so a holder that lost its lease can never remove a successor's lock.
Stores without conditional writes (anything but local disks and s3fs) are refused, by protocol name,
rather than locked unsafely.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .store import Storage

LOCK_REF = "_lock.json"
log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """The root is locked by another live run."""


class LockLost(LockHeld):
    """This holder's lease expired or was taken over: it must stop before publishing anything."""


class LockUnsupported(RuntimeError):
    """The store offers no conditional write that a safe lock can be built on."""


LOCKABLE_PROTOCOLS = ("file", "s3", "s3a")
"""Local disks (flock) and S3 through s3fs (conditional PUT: If-None-Match / If-Match)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RootLock:
    """``ref`` (default ``_lock.json``) under ``storage``; ``what`` names the locked thing in messages
    (default: the dataset root). ``sweep``: the holder removes temporaries a killed run left behind
    (only the root lock's holder may: it owns every path under the root)."""

    def __init__(self, storage: Storage, purpose: str = "pipeline", ttl_s: float = 60.0, wait_s: float = 0.0,
                 poll_s: float = 0.5, ref: str = LOCK_REF, what: str | None = None, sweep: bool = True):
        self.storage, self.purpose, self.ttl_s, self.wait_s, self.poll_s, self.ref = storage, purpose, ttl_s, wait_s, poll_s, ref
        self.what = what or f"dataset root {storage.root}"
        self.sweep = sweep
        self.token = uuid.uuid4().hex
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = 0.0  # time.monotonic() of the last successful write of the lease
        self._lost: str | None = None
        self.held = False

    # -- body ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"token": self.token, "purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired_at": getattr(self, "_acquired_at", now), "expires_at": now + self.ttl_s}).encode()

    def _is_stale(self, info: dict[str, Any] | None, age_s: float) -> bool:
        if info is None:  # unreadable (a crash between create and write): stale once old enough
            return age_s > self.ttl_s
        if time.time() > float(info.get("expires_at", 0)):
            return True
        return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))

    def _describe(self, info: dict[str, Any] | None) -> str:
        if info and info.get("released"):
            return f"{info.get('purpose')} run that has just released it"
        if not info:
            return "an unreadable lock"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("acquired_at", 0))))
        return f"{info.get('purpose')} run (host {info.get('host')}, pid {info.get('pid')}, since {since})"

    # -- local ----------------------------------------------------------------------------------
    # On a local (or NFS) disk the kernel's flock does the work: it is released when the holder dies,
    # so a killed run never leaves a stale lock behind. The file's JSON is only for messages.
    def _local_path(self) -> str:
        return self.storage.resolve(self.ref)[1]

    def _local_try(self) -> tuple[bool, dict | None]:
        import fcntl

        path = self._local_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False, self._local_read(path)[0]
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._body(), 0)
        os.fsync(fd)
        self._fd = fd
        return True, None

    def _local_check(self) -> None:
        """The flock lives on our open file: it is lost only if the file was removed or replaced."""
        try:
            same = os.path.samestat(os.fstat(self._fd), os.stat(self._local_path()))
        except OSError:
            same = False
        if not same:
            raise LockLost(f"lock {self.storage.uri(self.ref)} was removed or replaced while held")

    def _local_read(self, path: str) -> tuple[dict | None, float]:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, 0.0
        try:
            return json.loads(raw), 0.0
        except ValueError:
            return None, 0.0

    # -- object stores ----------------------------------------------------------------------------
    def _s3(self):
        fs, path = self.storage.resolve(self.ref)
        bucket, key = path.split("/", 1)
        return fs, bucket, key

    def _s3_read(self) -> tuple[dict | None, str | None, float]:
        fs, bucket, key = self._s3()
        from fsspec.asyn import sync

        for attempt in range(4):
            try:
                resp = fs.call_s3("get_object", Bucket=bucket, Key=key)
                body = sync(fs.loop, resp["Body"].read)
                age = time.time() - resp["LastModified"].timestamp()
                etag = resp["ETag"]
                break
            except FileNotFoundError:
                return None, None, 0.0
            except Exception as exc:  # noqa: BLE001 - a body cut short is not retried by botocore
                if attempt == 3 or "Payload" not in type(exc).__name__ and not isinstance(exc, ConnectionError):
                    raise
                time.sleep(0.1 * 2 ** attempt)
        try:
            return json.loads(body), etag, age
        except ValueError:
            return None, etag, age

    def _s3_try(self) -> tuple[bool, dict | None]:
        fs, bucket, key = self._s3()
        try:
            resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")
            self._etag = resp.get("ETag")
            return True, None
        except (FileExistsError, PermissionError, OSError) as exc:
            if not _is_precondition(exc):
                raise
        except Exception as exc:  # noqa: BLE001 - botocore without the conditional-write parameters
            if "IfNoneMatch" in str(exc) and "Unknown parameter" in str(exc):
                raise LockUnsupported(f"{self.storage.uri(self.ref)}: this botocore cannot send conditional PUTs "
                                      f"(If-None-Match); upgrade botocore/s3fs to lock an S3 root") from None
            raise
        info, etag, age = self._s3_read()
        if etag is None:
            return self._s3_try()
        if info is not None and info.get("token") == self.token:  # our own PUT, its reply lost and retried
            self._etag = etag
            return True, None
        if not self._is_stale(info, age):
            return False, info
        try:
            resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag)
        except (FileExistsError, PermissionError, OSError) as exc:
            if _is_precondition(exc):
                return False, info
            raise
        self._etag = resp.get("ETag")
        return True, None

    def _s3_refresh(self) -> None:
        fs, bucket, key = self._s3()
        try:
            resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=self._etag)
        except (FileExistsError, PermissionError, OSError) as exc:
            if _is_precondition(exc):
                info, etag, _ = self._s3_read()
                if info is not None and info.get("token") == self.token:  # our refresh applied, reply lost
                    self._etag = etag
                    return
                raise LockHeld(f"lock {self.storage.uri(self.ref)} was taken over by {self._describe(info)}") from None
            raise
        self._etag = resp.get("ETag")

    # -- public ---------------------------------------------------------------------------------
    def _check_supported(self) -> bool:
        """True for a local lock, False for S3; anything else is refused by name."""
        proto = self.storage.protocol_of(self.ref)
        if proto not in LOCKABLE_PROTOCOLS:
            raise LockUnsupported(
                f"cannot lock {self.storage.uri(self.ref)}: the {proto}:// store has no conditional writes that "
                f"shardflow can build a safe lock on (supported: local paths, s3:// through s3fs). Use a local or S3 "
                f"root, or an S3-compatible endpoint of that storage (storage.endpoint_url)")
        if proto == "file":
            return True
        import s3fs  # noqa: F401 - the protocol maps to s3fs, whose call_s3 sends the conditional headers

        fs, _ = self.storage.resolve(self.ref)
        if not isinstance(fs, s3fs.S3FileSystem):
            raise LockUnsupported(f"cannot lock {self.storage.uri(self.ref)}: {proto}:// is served by "
                                  f"{type(fs).__name__}, not s3fs, so conditional PUTs are not available")
        return False

    def acquire(self) -> "RootLock":
        local = self._check_supported()
        deadline = time.monotonic() + self.wait_s
        self._acquired_at = time.time()
        while True:
            started = time.monotonic()
            ok, info = self._local_try() if local else self._s3_try()
            if ok:
                break
            if time.monotonic() >= deadline:
                raise LockHeld(
                    f"{self.what} is locked by a {self._describe(info)}; "
                    f"wait for it to finish, or remove {self.storage.uri(self.ref)} if that run is dead "
                    f"(a lock not refreshed for {self.ttl_s:.0f}s is taken over automatically)")
            time.sleep(self.poll_s)
        self.held = True
        self._lost = None
        self._renewed = started
        self._stop.clear()
        if self.sweep:
            # The holder owns the root: temporaries a killed run left behind can go (see sweep_temporaries).
            swept = self.storage.sweep_temporaries(older_than_s=self.ttl_s)
            if swept:
                log.info("removed %d temporary file(s) left by an earlier killed run under %s", len(swept), self.storage.root)
        if local:
            return self
        self._thread = threading.Thread(target=self._heartbeat, name="shardflow-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        """Refresh the lease every third of it. A takeover (the compare-and-swap fails: someone else's
        lock is there) marks the lock lost at once and ends the heartbeat; a store that stays
        unreachable makes :meth:`ensure_held` fail once a whole lease has gone by unrenewed."""
        while not self._stop.wait(self.ttl_s / 3):
            try:
                started = time.monotonic()  # the new expires_at is counted from before the PUT
                self._s3_refresh()
                self._renewed = started
            except LockHeld as exc:
                self._lost = str(exc)
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - transient store errors: retried at the next beat
                log.warning("could not refresh lock %s (%s: %s); retrying", self.storage.uri(self.ref),
                            type(exc).__name__, exc)

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` unless this lock is certainly still ours: call right before publishing.

        On an object store "certainly" means renewed less than a lease ago, minus a margin for the
        clock of whoever would take it over (their check runs on ``expires_at``, written a beat
        before our last renewal at the latest).
        """
        if not self.held:
            raise LockLost(f"lock {self.storage.uri(self.ref)} is not held by this run")
        if self._lost:
            raise LockLost(f"lost the lock on {self.what}: {self._lost}; stopping before publishing")
        if self.storage.protocol_of(self.ref) == "file":
            self._local_check()
            return
        silent = time.monotonic() - self._renewed
        if silent > self.ttl_s * 0.9:
            raise LockLost(f"lost the lock on {self.what}: its lease ({self.ttl_s:.0f}s) was not renewed for "
                           f"{silent:.0f}s, so another run may have taken it over; stopping before publishing")

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def release(self) -> None:
        """Give the lock up, only if it is still ours (a lost lease leaves the successor's lock alone)."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.held = False
        local = self.storage.protocol_of(self.ref) == "file"
        if local:
            import fcntl

            # Leave the file in place (unlinking a flock'd file races with a new holder's open), and
            # truncate it only if it is still the file we lock (not a successor's after a removal).
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(self._fd), os.stat(self._local_path())):
                    os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            return
        if self._lost:
            return
        # Compare-and-swap our lease into a released marker (expired, so the next run takes it at once).
        fs, bucket, key = self._s3()
        body = json.dumps({"token": self.token, "purpose": self.purpose, "released": True, "expires_at": 0}).encode()
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=self._etag)
        except (FileExistsError, PermissionError, OSError) as exc:
            if not _is_precondition(exc):
                raise
            info, _, _ = self._s3_read()
            if info is None or info.get("token") != self.token or info.get("released"):
                return  # a successor's lock (or our marker, its reply lost): not ours to touch
            raise

    def __enter__(self) -> "RootLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never mask the error that ended the run (e.g. the store is down)
            if exc_type is None:
                raise


def _is_precondition(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "PreconditionFailed" in text or "pre-condition" in text.lower() or "412" in text or isinstance(exc, FileExistsError)
