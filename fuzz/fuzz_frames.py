"""Coverage-guided fuzzing of the frame decoder (netmemfs.protocol.Connection), both roles.

    .venv/bin/python fuzz/fuzz_frames.py -max_total_time=60      # atheris (libFuzzer) flags

The input is cut into chunks fed to receive_data() one by one, as a network would cut
it; every event is drained after each. Peer bytes may only ever raise RemoteProtocolError;
any other exception is a crash, and libFuzzer writes the input to crash-<hash>. Each
message decoded is encoded again and decoded again, and must come back equal. Inputs that
once crashed live in fuzz/regressions/frames/ and run in the test suite
(tests/test_46_fuzz_regressions.py).
"""

from __future__ import annotations

import sys

from netmemfs.errors import RemoteProtocolError
from netmemfs.protocol import CLOSED, NEED_DATA, Connection, Message, Role

MAX_EVENTS = 10_000  # a bound on the work one input may ask for


def _roundtrip(msg: Message, role: Role) -> None:
    """msg as a peer of role would send it, decoded by a role connection, is msg."""
    sender = Connection(Role.CLIENT if role is Role.SERVER else Role.SERVER)
    receiver = Connection(role)
    receiver.receive_data(sender.send(msg))
    again = receiver.next_event()
    assert again == msg, (msg, again)


def one_input(data: bytes) -> None:
    if not data:
        return
    role = Role.SERVER if data[0] & 1 else Role.CLIENT
    cut = max(1, data[0] >> 1)  # chunk length, 1..127 bytes
    body = data[1:]
    conn = Connection(role)
    events = 0
    try:
        for start in range(0, len(body) + 1, cut):
            chunk = body[start : start + cut]
            conn.receive_data(chunk)  # the last chunk is b"": end of stream
            while events < MAX_EVENTS:
                ev = conn.next_event()
                events += 1
                if ev is NEED_DATA or ev is CLOSED:
                    break
                assert isinstance(ev, Message), ev
                _roundtrip(ev, role)
            if not chunk:
                return
    except RemoteProtocolError:
        return


def main() -> None:
    import atheris  # only the fuzzer needs it; the regression test does not

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
