"""State that lives for one forward call, kept per thread.

A QST forward hands values to hooks and blocks it does not call directly: the backbone blocks' hooks append the hidden
states the side network reads, the top blocks' hooks add the low-rank deltas of the adapters routed in this forward,
and each side block gets its backbone hidden state. Several Python threads may run one model at once (a generation
server), so these values cannot live on the shared modules: each thread keeps its own, per module.
"""

from __future__ import annotations

import threading
import weakref

_local = threading.local()


def call_state(owner: object) -> dict:
    """This thread's state of the forward call that ``owner`` (a module) is running: a dict, empty at first."""
    states = getattr(_local, "states", None)
    if states is None:
        states = _local.states = weakref.WeakKeyDictionary()
    state = states.get(owner)
    if state is None:
        state = states[owner] = {}
    return state
