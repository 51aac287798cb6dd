"""Judge keys typed in the dashboard for an endpoint other than the server's own: held only in the memory of the
process that took them and handed, when asked, to the worker running that run, over a UNIX socket in a folder
only this user can open. A key is never written to the store, a log, a file or a result."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import tempfile
import threading
from pathlib import Path

_offers: dict[Path, "_Offer"] = {}
_lock = threading.Lock()


def _socket_path(store_root: str | os.PathLike, run_id: str) -> Path:
    folder = Path(tempfile.gettempdir()) / f"prunescope-keys-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    name = hashlib.sha256(f"{Path(store_root).expanduser().resolve()}\0{run_id}".encode()).hexdigest()[:24]
    return folder / f"{name}.sock"


def _same_user(conn: socket.socket) -> bool:
    """Only a process of this user may read a key (SO_PEERCRED: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] == os.getuid()


class _Offer(threading.Thread):
    """Serves one run's key to every local process of this user that asks, until withdrawn."""

    def __init__(self, path: Path, key: str) -> None:
        super().__init__(daemon=True)
        self.path, self.key = path, key
        path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        os.chmod(path, 0o600)
        self.server.listen()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                if _same_user(conn):
                    conn.sendall(self.key.encode())

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)


def offer(store_root: str | os.PathLike, run_id: str, key: str) -> None:
    """Hold `key` for the worker that will judge `run_id` (replacing an earlier offer for it)."""
    path = _socket_path(store_root, run_id)
    with _lock:
        if path in _offers:
            _offers.pop(path).close()
        _offers[path] = _Offer(path, key)
        _offers[path].start()


def withdraw(store_root: str | os.PathLike, run_id: str) -> None:
    """Forget the key held for `run_id`."""
    with _lock:
        held = _offers.pop(_socket_path(store_root, run_id), None)
    if held:
        held.close()


def fetch(store_root: str | os.PathLike, run_id: str, timeout_s: float = 5.0) -> str | None:
    """The key offered for `run_id`, or None when no live process offers one."""
    path = _socket_path(store_root, run_id)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(str(path))
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode() or None
