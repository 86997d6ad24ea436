"""harness.machine.ioeventfd on a stand-in for QEMU: this process's own descriptors."""

from __future__ import annotations

import os
import threading
import time

from harness.machine.ioeventfd import new_eventfds


def test_the_eventfd_made_in_the_block_is_taken_as_a_duplicate() -> None:
    with new_eventfds(os.getpid(), 1) as taken:
        made = os.eventfd(0, os.EFD_NONBLOCK)
    assert len(taken) == 1 and taken[0] != made
    os.eventfd_write(taken[0], 3)           # the same eventfd: what one writes the other reads
    assert os.eventfd_read(made) == 3
    for fd in taken + [made]:
        os.close(fd)


def test_another_number_than_expected_takes_none() -> None:
    with new_eventfds(os.getpid(), 1) as none_made:
        pass
    with new_eventfds(os.getpid(), 1) as two_made:
        made = [os.eventfd(0), os.eventfd(0)]
    assert none_made == [] and two_made == []
    for fd in made:
        os.close(fd)


def test_watchers_of_one_process_take_turns() -> None:
    events: list[tuple[str, int]] = []
    made: list[int] = []

    def watch(k: int) -> None:
        with new_eventfds(os.getpid(), 1) as taken:
            events.append(("in", k))
            time.sleep(0.02)
            made.append(os.eventfd(0))
            events.append(("out", k))
        made.extend(taken)
    threads = [threading.Thread(target=watch, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [kind for kind, _ in events] == ["in", "out"] * 3     # never two inside at once
    assert len(made) == 6                                       # each took exactly its own
    for fd in made:
        os.close(fd)
