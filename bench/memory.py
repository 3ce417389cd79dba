"""The resident memory of a process tree, for the benches whose work runs in several processes."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def tree_memory_bytes(root_pid: int) -> tuple[int, int]:
    """Resident memory of a process and all its descendants, from /proc: the sum of their RSS, which
    counts a page shared by several of them (a library's code, what a forked worker inherits) once in
    each, and the sum of their PSS, which splits each such page among them: the tree's own memory."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    rss = pss = 0
    for pid in tree:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            pss += int(rollup.split("\nPss:", 1)[1].split()[0]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return rss, pss


@contextlib.contextmanager
def tree_memory_peaks(root_pid: int) -> Iterator[list[int]]:
    """[peak RSS, peak PSS] in bytes of `root_pid`'s process tree (`tree_memory_bytes`), sampled every
    0.2 s from the start of the block to its end; the list is filled in as they are."""
    peaks = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while True:
            rss, pss = tree_memory_bytes(root_pid)
            peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], pss)
            if stop.wait(0.2):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join()
