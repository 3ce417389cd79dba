"""A DNS server on loopback (UDP), for the downloader's resolver to ask (`dns_servers`): A and AAAA
records with their TTLs, a name that answers another address at each lookup (DNS rebinding), a name
it never answers, and NXDOMAIN for the rest. It counts the lookups of each name (its A queries: a
lookup asks for A and AAAA at once)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass

_A, _AAAA = 1, 28
_NXDOMAIN = 3


@dataclass(frozen=True)
class Name:
    addresses: list[str]  # its A and AAAA records, IPv4 and IPv6
    ttl: int = 300
    then: list[str] | None = None  # the records of every lookup after the first (a name that rebinds)


class DnsServer:
    """`with DnsServer({"a.example": Name(["1.2.3.4"])}, silent={"b.example"}) as dns:` then
    `dns_servers=(dns.server,)`."""

    def __init__(self, names: dict[str, Name], silent: frozenset[str] | set[str] = frozenset()) -> None:
        self.names = names
        self.silent = set(silent)
        self.lookups: Counter = Counter()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.server = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._socket.close()  # the thread's recvfrom then fails, and it ends

    def _serve(self) -> None:
        while True:
            try:
                query, client = self._socket.recvfrom(4096)
            except OSError:
                return
            reply = self._reply(query)
            if reply is not None:
                self._socket.sendto(reply, client)

    def _reply(self, query: bytes) -> bytes | None:
        ident, _, count = struct.unpack("!HHH", query[:6])
        if count != 1:
            return None
        labels, end = [], 12
        while query[end]:
            labels.append(query[end + 1 : end + 1 + query[end]].decode("ascii"))
            end += 1 + query[end]
        qtype = struct.unpack("!H", query[end + 1 : end + 3])[0]
        question = query[12 : end + 5]
        name = ".".join(labels).lower()
        if name in self.silent:
            return None
        known = self.names.get(name)
        if known is None:
            return struct.pack("!6H", ident, 0x8180 | _NXDOMAIN, 1, 0, 0, 0) + question
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
        return struct.pack("!6H", ident, 0x8180, 1, answers, 0, 0) + question + records
