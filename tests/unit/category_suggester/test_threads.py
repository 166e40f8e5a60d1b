"""NamedThread: the kernel knows the thread by its name."""

from __future__ import annotations

import threading
from pathlib import Path

from category_suggester.threads import NamedThread


def test_the_os_thread_carries_the_name_cut_to_fifteen_bytes() -> None:
    seen: dict[str, str] = {}

    def look() -> None:
        native = threading.get_native_id()
        seen["comm"] = Path(f"/proc/self/task/{native}/comm").read_text().strip()

    for name in ("decode_0", "a-name-longer-than-fifteen"):
        thread = NamedThread(target=look, name=name)
        thread.start()
        thread.join()
        assert seen["comm"] == name[:15]
