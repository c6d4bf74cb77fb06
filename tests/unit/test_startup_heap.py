"""resnet_dist.inference.freeze_startup_heap: a server's startup objects out of full collections."""

from __future__ import annotations

import gc
import weakref

from resnet_dist.inference import freeze_startup_heap


class Node:
    pass


def test_startup_objects_are_frozen_and_later_garbage_is_still_collected():
    kept = [Node() for _ in range(1000)]   # alive at startup: a server's modules and model
    dropped = Node()
    dropped.cycle = dropped                 # garbage from startup: freed first, not frozen
    dropped_ref = weakref.ref(dropped)
    del dropped
    try:
        frozen = freeze_startup_heap()
        assert dropped_ref() is None
        assert frozen == gc.get_freeze_count() >= len(kept)
        walked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in walked for o in kept)

        later = Node()                      # made while serving: still collected
        later.cycle = later
        later_ref = weakref.ref(later)
        assert id(later) in {id(o) for o in gc.get_objects()}
        del later
        gc.collect()
        assert later_ref() is None
    finally:
        gc.unfreeze()
