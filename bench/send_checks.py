"""What ``Connection.send``'s field checks cost on the hot frames (DELIVER, CONFIRM).

Run: ``python bench/send_checks.py``. Encodes 100k of each frame with ``encode`` alone and
with ``check_fields`` first (the generated validators the decoder runs). The figures back
the choice, noted in ``protocol/connection.py``, that the broker's and client's hot paths
encode straight from fields they built and only check the frame size.
"""

from __future__ import annotations

import timeit

from conveyor.protocol import Confirm, Deliver, encode
from conveyor.protocol.connection import check_fields

N = 100_000


def main() -> None:
    deliver = Deliver(
        "ctag-1", 12345, False, "", "tasks", {"content_type": "text/plain"}, b"x" * 100, 1
    )
    confirm = Confirm(1, 100, True, 0, "")
    for frame in (deliver, confirm):
        plain = min(timeit.repeat(lambda f=frame: encode(f), number=N, repeat=3))
        checked = min(
            timeit.repeat(lambda f=frame: (check_fields(f), encode(f)), number=N, repeat=3)
        )
        print(
            f"{frame.NAME:8} x{N}: encode {plain:.3f} s, check_fields + encode "
            f"{checked:.3f} s ({checked / plain:.1f}x)"
        )


if __name__ == "__main__":
    main()
