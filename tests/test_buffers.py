"""The read-buffer pool: exact-size reuse, an idle cap, and safety across threads."""

from __future__ import annotations

import threading

from fusekit.io.buffers import BufferPool


def test_a_returned_buffer_is_reused_for_the_same_size_only() -> None:
    pool = BufferPool(max_idle_bytes=1 << 20)
    first = pool.take(100)
    pool.give(first)
    assert pool.take(200).data_ptr() != first.data_ptr()
    assert pool.take(100).data_ptr() == first.data_ptr()
    assert pool.idle_bytes == 0


def test_idle_buffers_beyond_the_cap_are_freed_oldest_size_first() -> None:
    pool = BufferPool(max_idle_bytes=250)
    a, b, c = pool.take(100), pool.take(100), pool.take(200)
    pool.give(a)
    pool.give(b)
    pool.give(c)  # 400 idle > 250: the 100-byte buffers go first
    assert pool.idle_bytes == 200
    assert pool.take(200).data_ptr() == c.data_ptr()
    assert pool.idle_bytes == 0


def test_emptied_sizes_do_not_break_the_cap() -> None:
    pool = BufferPool(max_idle_bytes=100)
    a = pool.take(60)
    pool.give(a)
    pool.take(60)  # empties that size
    pool.give(pool.take(80))
    pool.give(pool.take(90))  # over the cap with a size whose list was emptied before
    assert pool.idle_bytes <= 100


def test_concurrent_take_and_give_keep_the_books_straight() -> None:
    pool = BufferPool(max_idle_bytes=10_000)

    def churn() -> None:
        for size in [64, 128, 256] * 200:
            pool.give(pool.take(size))

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0 <= pool.idle_bytes <= 10_000
