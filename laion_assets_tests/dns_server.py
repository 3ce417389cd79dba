"""A DNS server on loopback (UDP), for the downloader's resolver to ask (`dns_servers`): A and AAAA
records with their TTLs, a name that answers another address at each lookup (DNS rebinding), a name
whose answer waits until the test releases it, a name it never answers, and NXDOMAIN for the rest. It
counts the lookups of each name (its A queries: a lookup asks for A and AAAA at once)."""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import itertools
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

_A, _AAAA = 1, 28
_NXDOMAIN = 3


@dataclass(frozen=True)
class Name:
    addresses: list[str]  # its A and AAAA records, IPv4 and IPv6
    ttl: int = 300
    then: list[str] | None = None  # the records of every lookup after the first (a name that rebinds)
    held: threading.Event | None = None  # answered only once this is set


class DnsServer:
    """`with DnsServer({"a.example": Name(["1.2.3.4"])}, silent={"b.example"}) as dns:` then
    `dns_servers=(dns.server,)`. With `delay`, each reply goes that many seconds after its query, as from
    a resolver that recurses for each (bench/dns.py)."""

    def __init__(
        self, names: dict[str, Name], silent: frozenset[str] | set[str] = frozenset(), delay: float = 0.0
    ) -> None:
        self.names = names
        self.silent = set(silent)
        self.delay = delay
        self.lookups: Counter = Counter()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.server = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._due: list[tuple[float, int, bytes, tuple]] = []  # (when, order, reply, client): a heap
        self._due_changed = threading.Condition()
        self._order = itertools.count()

    def __enter__(self) -> DnsServer:
        self._thread.start()
        if self.delay:
            threading.Thread(target=self._send_due, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._socket.close()  # the threads' recvfrom or sendto then fail, and they end

    def _serve(self) -> None:
        while True:
            try:
                query, client = self._socket.recvfrom(4096)
            except OSError:
                return
            reply, held = self._reply(query)
            if reply is not None and held is not None:
                threading.Thread(target=self._send_when, args=(held, reply, client), daemon=True).start()
            elif reply is not None and self.delay:
                with self._due_changed:
                    heapq.heappush(
                        self._due, (time.monotonic() + self.delay, next(self._order), reply, client)
                    )
                    self._due_changed.notify()
            elif reply is not None:
                self._socket.sendto(reply, client)

    def _send_due(self) -> None:
        while True:
            with self._due_changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._due_changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, reply, client = heapq.heappop(self._due)
            try:
                self._socket.sendto(reply, client)
            except OSError:
                return

    def _send_when(self, held: threading.Event, reply: bytes, client: tuple) -> None:
        held.wait()
        with contextlib.suppress(OSError):  # the server was closed meanwhile
            self._socket.sendto(reply, client)

    def _reply(self, query: bytes) -> tuple[bytes | None, threading.Event | None]:
        """The reply to `query` (None: none), and the event it waits for."""
        ident, _, count = struct.unpack("!HHH", query[:6])
        if count != 1:
            return None, None
        labels, end = [], 12
        while query[end]:
            labels.append(query[end + 1 : end + 1 + query[end]].decode("ascii"))
            end += 1 + query[end]
        qtype = struct.unpack("!H", query[end + 1 : end + 3])[0]
        question = query[12 : end + 5]
        name = ".".join(labels).lower()
        if name in self.silent:
            return None, None
        known = self.names.get(name)
        if known is None:
            return struct.pack("!6H", ident, 0x8180 | _NXDOMAIN, 1, 0, 0, 0) + question, None
        if qtype == _A:
            self.lookups[name] += 1
        later = self.lookups[name] > 1 and known.then is not None
        addresses = known.then if later else known.addresses
        records = b""
        answers = 0
        for text in addresses:
            address = ipaddress.ip_address(text)
            if (address.version == 4) != (qtype == _A) or qtype not in (_A, _AAAA):
                continue
            data = address.packed
            records += struct.pack("!HHHIH", 0xC00C, qtype, 1, known.ttl, len(data)) + data
            answers += 1
        return struct.pack("!6H", ident, 0x8180, 1, answers, 0, 0) + question + records, known.held
