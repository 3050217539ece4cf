"""Layer 1: the sans-IO protocol alone."""

from __future__ import annotations

import itertools
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netmemfs import ops
from netmemfs import protocol as p
from netmemfs.errors import LocalProtocolError, RemoteProtocolError
from netmemfs.pages import PAGE_SIZE, Buffer

names = st.text(min_size=1, max_size=20)
u64 = st.integers(min_value=0, max_value=p.MAX_U64)
small = st.integers(min_value=0, max_value=1 << 40)
txns = st.binary(min_size=1, max_size=p.MAX_TXN_ID_BYTES)
pages = st.integers(min_value=1, max_value=3).flatmap(
    lambda n: st.binary(min_size=n * PAGE_SIZE, max_size=n * PAGE_SIZE)
)
runs = st.builds(p.PageRun, names, small, pages)
entry_names = st.binary(min_size=1, max_size=255)
opt = st.none() | small
# Names as the store keeps them: bytes, surrogate-escaped where they are not UTF-8.
op_names = entry_names.map(lambda b: b.decode("utf-8", "surrogateescape"))
inode_ops = st.one_of(
    st.builds(
        ops.MakeNode,
        small,
        op_names,
        small,
        small,
        small,
        st.binary(max_size=9),
        small,
        small,
        small,
    ),
    st.builds(ops.Link, small, small, op_names),
    st.builds(ops.Unlink, small, op_names),
    st.builds(ops.Rmdir, small, op_names),
    st.builds(ops.Move, small, op_names, small, op_names, st.integers(0, 3)),
    st.builds(ops.SetAttr, small, opt, opt, opt, opt, opt),
    st.builds(ops.WritePages, small, small, pages),
    st.builds(ops.Truncate, small, small),
    st.builds(ops.Fence, small, u64),
)

requests = st.one_of(
    st.builds(p.Hello, u64, u64, st.binary(min_size=1, max_size=64)),
    st.builds(p.Authenticate, u64, st.binary(max_size=64)),
    st.builds(p.ListSegments, u64),
    st.builds(p.StatSegment, u64, names),
    st.builds(p.CreateSegment, u64, txns, names, small),
    st.builds(p.ResizeSegment, u64, txns, names, small),
    st.builds(p.RenameSegment, u64, txns, names, names),
    st.builds(p.DeleteSegment, u64, txns, names),
    st.builds(p.ReadPages, u64, names, small, small),
    st.builds(p.StagePages, u64, txns, names, small, pages),
    st.builds(
        p.Commit,
        u64,
        txns,
        st.lists(st.tuples(names, small), max_size=2).map(tuple),
        st.lists(runs, max_size=3).map(tuple),
    ),
    st.builds(p.Abort, u64, txns),
    st.builds(p.StatServer, u64),
    st.builds(p.Lookup, u64, u64, entry_names),
    st.builds(p.GetAttr, u64, u64),
    st.builds(p.ReadDir, u64, u64, st.binary(max_size=255), u64),
    st.builds(p.ReadInode, u64, u64, small, small),
    st.builds(p.Change, u64, txns, st.lists(inode_ops, max_size=4).map(tuple)),
    st.builds(p.StageInode, u64, txns, u64, small, pages),
    st.builds(p.Hold, u64, txns, st.lists(u64, max_size=5).map(tuple)),
    st.builds(p.Claim, u64, txns),
    st.builds(p.Subscribe, u64, st.lists(u64, max_size=5).map(tuple)),
    st.builds(p.Lock, u64, u64, u64, u64, st.booleans(), u64),
    st.builds(p.Unlock, u64, u64),
    st.builds(p.Renew, u64),
)
replies = st.one_of(
    st.builds(p.Held, u64, u64),
    st.builds(p.Claimed, u64, st.booleans()),
    st.builds(p.Subscribed, u64, u64),
    st.builds(p.Locked, u64, u64, u64, u64),
    st.builds(p.Unlocked, u64),
    st.builds(p.Renewed, u64, u64, u64),
    st.builds(
        p.Notice,
        u64,
        u64,
        u64,
        st.lists(st.tuples(u64, u64), max_size=3).map(tuple),
        st.booleans(),
    ),
    st.builds(p.HelloReply, u64, u64, st.binary(min_size=1, max_size=64), st.booleans()),
    st.builds(p.SegmentList, u64, st.lists(names, max_size=5).map(tuple)),
    st.builds(p.SegmentInfo, u64, names, small, small, small),
    st.builds(p.Pages, u64, names, small, small, small, st.lists(runs, max_size=3).map(tuple)),
    st.builds(
        p.Committed,
        u64,
        txns,
        st.lists(st.tuples(names, small), max_size=3).map(tuple),
        st.booleans(),
    ),
    st.builds(p.Error, u64, st.text(max_size=10), st.text(max_size=50)),
    st.builds(p.ServerInfo, u64, small, small, small),
    st.builds(p.Attrs, *[u64] * 13, st.binary(max_size=4095)),
    st.builds(
        p.Entries,
        u64,
        st.lists(st.tuples(entry_names, u64, u64), max_size=4).map(tuple),
        st.booleans(),
    ),
    st.builds(
        p.Changed,
        u64,
        txns,
        st.lists(st.tuples(u64, u64), max_size=3).map(tuple),
        st.lists(u64, max_size=3).map(tuple),
        st.booleans(),
    ),
)


def _feed_in_chunks(conn: p.Connection, data: bytes, cuts: list[int]) -> list[p.Message]:
    out: list[p.Message] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        conn.receive_data(data[a:b])
        while True:
            ev = conn.next_event()
            if ev is p.NEED_DATA:
                break
            assert isinstance(ev, p.Message)
            out.append(ev)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(requests, min_size=1, max_size=6), st.lists(st.integers(0, 1 << 20), max_size=8))
def test_any_chunking_of_any_request_sequence(msgs: list[p.Message], cuts: list[int]) -> None:
    client, server = p.Connection(p.Role.CLIENT), p.Connection(p.Role.SERVER)
    wire = b"".join(client.send(m) for m in msgs)
    assert _feed_in_chunks(server, wire, cuts) == msgs
    server.receive_data(b"")
    assert server.next_event() is p.CLOSED


@settings(max_examples=150, deadline=None)
@given(st.lists(replies, min_size=1, max_size=6), st.lists(st.integers(0, 1 << 20), max_size=8))
def test_any_chunking_of_any_reply_sequence(msgs: list[p.Message], cuts: list[int]) -> None:
    client, server = p.Connection(p.Role.CLIENT), p.Connection(p.Role.SERVER)
    wire = b"".join(server.send(m) for m in msgs)
    assert _feed_in_chunks(client, wire, cuts) == msgs


def test_roles_are_enforced() -> None:
    with pytest.raises(LocalProtocolError):
        p.Connection(p.Role.CLIENT).send(p.Error(1, "x", "y"))
    with pytest.raises(LocalProtocolError):
        p.Connection(p.Role.SERVER).send(p.ListSegments(1))
    # A reply arriving at a server is an unknown type there.
    server = p.Connection(p.Role.SERVER)
    server.receive_data(p.Connection(p.Role.SERVER).send(p.Error(1, "x", "y")))
    with pytest.raises(RemoteProtocolError, match="unknown message type 127"):
        server.next_event()


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb({"a": 1}), "expected an array"),
        (msgpack.packb([]), "starts with its type"),
        (msgpack.packb([99, 1]), "unknown message type 99"),
        (msgpack.packb([3]), "has 1 fields, got 0"),
        (msgpack.packb([3, -1]), "unsigned 64-bit"),
        (msgpack.packb([3, True]), "unsigned 64-bit"),
        (msgpack.packb([4, 1, b"bytes-not-str"]), "expected a string"),
        (msgpack.packb([10, 1, b"t", "s", 0, b"x" * 100]), "whole number of pages"),
        (msgpack.packb([12, 1, b""]), "1..64 bytes"),
        (msgpack.packb([11, 1, b"t", [], [["s", 0]]]), "3 fields"),
        (msgpack.packb([3, 1]) + b"\x00", "not msgpack"),
    ],
)
def test_malformed_bodies_are_remote_errors(body: bytes, why: str) -> None:
    server = p.Connection(p.Role.SERVER)
    server.receive_data(_frame(body))
    with pytest.raises(RemoteProtocolError, match=why):
        server.next_event()


def test_oversized_frame_is_refused_before_buffering() -> None:
    server = p.Connection(p.Role.SERVER)
    server.receive_data(struct.pack(">I", p.MAX_FRAME_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="limit"):
        server.next_event()


def test_sender_refuses_frames_past_the_limit() -> None:
    big = bytes((p.MAX_MESSAGE_PAGES + 1) * PAGE_SIZE)
    with pytest.raises(LocalProtocolError, match="at most 4096 pages per message"):
        p.Connection(p.Role.CLIENT).send(p.StagePages(1, b"t", "s", 0, big))
    with pytest.raises(LocalProtocolError, match="whole number of pages"):
        p.Connection(p.Role.CLIENT).send(p.StagePages(1, b"t", "s", 0, b"x"))


def test_eof_mid_frame_is_an_error() -> None:
    server = p.Connection(p.Role.SERVER)
    wire = p.Connection(p.Role.CLIENT).send(p.ListSegments(5))
    server.receive_data(wire[:-1])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_event()


def test_page_data_passes_through_without_copy() -> None:
    data = bytearray(PAGE_SIZE * 16)  # at or past _COPY_BELOW: not copied
    parts = p.encode_parts(p.StagePages(1, b"t", "s", 0, data))
    assert any(part is data for part in parts)


def test_small_messages_packed_in_one_call_are_the_same_bytes() -> None:
    """Below _COPY_BELOW a message is packed by one msgpack call, pages copied; the
    bytes are those packing by parts gives."""
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    for msg in [
        p.StagePages(1, b"t" * 16, "s", 7, page * 2),
        p.Pages(2, "", 3, 4, 9, (p.PageRun("", 3, page), p.PageRun("", 5, page))),
        p.ReadInode(3, 12, 0, 1),
    ]:
        joined = b"".join(p.encode_parts(msg))
        by_parts: list[Buffer] = []
        p.pack_parts(msgpack.unpackb(joined[4:]), by_parts)
        assert joined[4:] == b"".join(by_parts), type(msg).__name__
        assert len(joined) < p._COPY_BELOW


def test_holes_and_runs_rejects_runs_outside_the_request() -> None:
    run = p.PageRun("s", 10, bytes(PAGE_SIZE))
    with pytest.raises(RemoteProtocolError, match="outside"):
        p.holes_and_runs(0, 4, [run])
    out = p.holes_and_runs(8, 4, [run])
    assert len(out) == 4 * PAGE_SIZE


subset = st.recursive(
    st.one_of(
        st.integers(0, p.MAX_U64),
        st.text(max_size=40),
        st.binary(max_size=64),
        st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE + 5),
        st.booleans(),
        st.none(),
    ),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(subset, st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4))
def test_in_place_decoder_agrees_with_msgpack(obj: object, flips: list[tuple[int, int]]) -> None:
    data = bytearray(msgpack.packb(obj))
    assert p.unpack_in_place(data) == obj
    for pos, value in flips:
        data[pos % len(data)] = value
    try:
        mine = p.unpack_in_place(bytes(data))
    except RemoteProtocolError:
        return  # refusing what the protocol never sends (maps, floats...) is allowed
    assert mine == msgpack.unpackb(bytes(data))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=4),
    st.lists(st.integers(1, 1 << 18), min_size=1, max_size=30),
)
def test_large_frames_received_in_place(sizes: list[int], reads: list[int]) -> None:
    """Frames arriving through receive_buffer() in arbitrary pieces decode to the same
    messages, their page data as views of the frame."""
    msgs = [
        p.Pages(i, "s", 0, n, 1, (p.PageRun("s", 0, bytes([i]) * (n * PAGE_SIZE)),))
        for i, n in enumerate(sizes)
    ]
    wire = memoryview(b"".join(p.Connection(p.Role.SERVER).send(m) for m in msgs))
    client = p.Connection(p.Role.CLIENT)
    got: list[p.Message] = []
    pos = 0
    step = itertools.cycle(reads)
    while pos < len(wire):
        n = next(step)
        view = client.receive_buffer()
        if view is not None:
            n = min(n, len(view), len(wire) - pos)
            view[:n] = wire[pos : pos + n]
            client.received(n)
        else:
            client.receive_data(wire[pos : pos + n])
            n = min(n, len(wire) - pos)
        pos += n
        while isinstance(ev := client.next_event(), p.Message):
            got.append(ev)
    assert got == msgs
    big = [m for m in got if isinstance(m, p.Pages) and m.count * PAGE_SIZE >= p.LARGE_FRAME_BYTES]
    assert all(isinstance(m.runs[0].data, memoryview) for m in big)


# Field values near the edges of what each kind accepts, and of the wrong types.
edge_values = st.one_of(
    st.sampled_from([0, 1, p.MAX_U64, p.MAX_U64 + 1, -1, True, False, None, 1.5, "", "s"]),
    st.integers(-(1 << 70), 1 << 70),
    st.text(max_size=8),
    st.binary(max_size=8),
)
page_data = st.sampled_from(
    [
        bytes(PAGE_SIZE),
        memoryview(bytes(2 * PAGE_SIZE)),
        bytes(PAGE_SIZE - 1),
        bytes(2 * PAGE_SIZE + 1),
        b"",
        memoryview(bytes(PAGE_SIZE + 3)),
        bytearray(PAGE_SIZE),
        bytes(p.MAX_MESSAGE_PAGES * PAGE_SIZE),
        bytes((p.MAX_MESSAGE_PAGES + 1) * PAGE_SIZE),
        "x" * PAGE_SIZE,
    ]
)
good_run = st.tuples(
    st.text(max_size=4),
    st.integers(0, 9),
    st.sampled_from([bytes(PAGE_SIZE), memoryview(bytes(2 * PAGE_SIZE))]),
).map(list)
bad_run = st.one_of(
    st.tuples(
        st.one_of(st.text(max_size=4), edge_values),
        st.one_of(st.integers(0, 9), edge_values),
        page_data,
    ).map(list),
    st.lists(st.one_of(st.text(max_size=2), st.integers(0, 9), edge_values, page_data), max_size=4),
    edge_values,
)
# Each kind's good values, and values that may be bad in any way.
good_field = {
    p.U64: st.integers(0, 9),
    p.STR: st.text(max_size=4),
    p.RUNS: st.lists(good_run, max_size=3),
}
any_field = {
    p.U64: edge_values,
    p.STR: edge_values,
    p.RUNS: st.one_of(
        st.lists(st.one_of(good_run, bad_run), min_size=1, max_size=3),
        edge_values,
    ),
}


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_fast_decoders_check_what_the_general_one_checks(data: st.DataObject) -> None:
    """The page path's own decoders (_FAST_DECODERS) accept exactly what the general
    decoder accepts, and give the same message: no check on bytes from the network is
    weakened by them. Each example is a good message with at most two fields spoiled."""
    cls = data.draw(st.sampled_from(sorted(p._FAST_DECODERS, key=lambda c: c.TYPE)))
    spoiled = data.draw(st.sets(st.integers(0, len(cls.KINDS) - 1), max_size=2))
    items: list[object] = [cls.TYPE]
    for i, kind in enumerate(cls.KINDS):
        items.append(data.draw((any_field if i in spoiled else good_field)[kind]))
    outcomes: list[object] = []
    for decode in (p._FAST_DECODERS[cls], lambda items: p._decode_general(cls, items)):
        try:
            outcomes.append(decode(list(items)))
        except RemoteProtocolError:
            outcomes.append(RemoteProtocolError)
    assert outcomes[0] == outcomes[1], items


def test_fast_decoders_take_the_page_path_messages() -> None:
    """What the page path sends goes through its own decoders, and comes out whole."""
    assert set(p._FAST_DECODERS) == {p.ReadInode, p.ReadPages, p.Pages}
    data = bytes(range(256)) * (PAGE_SIZE // 256)
    for role, msg in (
        (p.Role.CLIENT, p.ReadInode(3, 9, 1 << 40, 1)),
        (p.Role.CLIENT, p.ReadPages(4, "seg", 7, 2)),
        (p.Role.SERVER, p.Pages(5, "", 7, 3, 11, (p.PageRun("", 8, data),))),
        (p.Role.SERVER, p.Pages(6, "s", 0, 1, 0, ())),
    ):
        peer = p.Connection(p.Role.SERVER if role is p.Role.CLIENT else p.Role.CLIENT)
        peer.receive_data(p.Connection(role).send(msg))
        assert peer.next_event() == msg


def _short(run: object) -> str:
    """A test id for a page run: its parts' types and lengths, not its bytes."""
    if not isinstance(run, list | tuple):
        return repr(run)
    return "-".join(
        f"{type(x).__name__}{len(x)}" if isinstance(x, Buffer | str) else repr(x) for x in run
    )


@pytest.mark.parametrize(
    "run",
    [
        ["s", 1, data]
        for data in (
            bytes(PAGE_SIZE - 1),
            bytes(2 * PAGE_SIZE + 1),
            b"",
            memoryview(bytes(PAGE_SIZE + 3)),
            bytearray(PAGE_SIZE),
            "x" * PAGE_SIZE,
            None,
            bytes((p.MAX_MESSAGE_PAGES + 1) * PAGE_SIZE),
        )
    ]
    + [[name, 1, bytes(PAGE_SIZE)] for name in (b"s", 1, None, True)]
    + [["s", at, bytes(PAGE_SIZE)] for at in (-1, p.MAX_U64 + 1, True, "1", 1.0)]
    + [["s", 1], ["s", 1, bytes(PAGE_SIZE), 0], [], ("s", 1, bytes(PAGE_SIZE)), "s", 5],
    ids=lambda run: _short(run),
)
def test_fast_pages_decoder_refuses_each_bad_run(run: object) -> None:
    """Each way a page run can be wrong, beside a good run: refused by both decoders."""
    items = [p.Pages.TYPE, 1, "", 0, 4, 1, [["", 0, bytes(PAGE_SIZE)], run]]
    for decode in (p._FAST_DECODERS[p.Pages], lambda items: p._decode_general(p.Pages, items)):
        with pytest.raises(RemoteProtocolError):
            decode(list(items))
