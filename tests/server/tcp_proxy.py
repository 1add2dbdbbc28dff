"""A loopback TCP proxy the tests can cut and restore: a database outage without root.

Cutting closes the listening socket and every open connection (each side sees its peer go
away, as when a database host dies or a firewall resets the link); stalling resets the open
connections and then accepts new ones but never answers (a host that drops packets, where
only a timeout helps); restoring forwards again on the same port. Loopback only.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream loopback address, until cut."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        assert upstream[0] in ("127.0.0.1", "localhost", "::1"), "loopback only"
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._held: list[socket.socket] = []
        self._stalled = False
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        """Listen (again, on the same port once one was chosen) and forward."""
        with self._lock:
            self._stalled = False
            held, self._held = self._held, []
        for conn in held:
            conn.close()
        if self._listener is not None:
            return  # was only stalled
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def stall(self) -> None:
        """Reset the open connections; accept new ones but never forward a byte."""
        with self._lock:
            self._stalled = True
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        """Cut, and let go of the connections held while stalled."""
        self.cut()
        with self._lock:
            held, self._held = self._held, []
        for conn in held:
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            with self._lock:
                if self._stalled:
                    self._held.append(client)
                    continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            src.close()  # each socket is the source of exactly one pump
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
