"""State that lives for one forward call, kept per thread.

A QST forward hands values to hooks and blocks it does not call directly: the backbone blocks' hooks append the hidden
states the side network reads, the top blocks' hooks add the low-rank deltas of the adapters routed in this forward,
and each side block gets its backbone hidden state. Several Python threads may run one model at once (a generation
server), so these values cannot live on the shared modules as plain attributes: each module holds a
``threading.local``, in which each thread keeps its own.

The holder lives on the module itself, not in a process-wide table of modules: code that ``torch.compile`` traces
reads it from the module it runs, so the compiled code depends on that module alone. Read from a process-wide weak
table, it was specialised on the whole table (its size, the order of its entries), so that another QST model created
or freed, or a new thread, recompiled it, and an entry freed by the garbage collector while Dynamo read the table
failed the compilation ("dictionary changed size during iteration").
"""

from __future__ import annotations

import threading

#: the attribute of a module that holds its per-thread state
_ATTR = "_qst_call_state"


class _PerThread(threading.local):
    """A module's per-call state: ``values`` is a dict of its own in each thread, with the given keys (None) at first,
    so that every thread's dict has the same keys. Copies and pickles of a module get a fresh, empty holder."""

    def __init__(self, keys: tuple = ()) -> None:
        self.keys = keys
        self.values = dict.fromkeys(keys)

    def __deepcopy__(self, memo) -> "_PerThread":
        return _PerThread(self.keys)

    def __reduce__(self):
        return (_PerThread, (self.keys,))


def hold_call_state(owner: object, keys: tuple = ()) -> None:
    """Give ``owner`` (a module, from its ``__init__``) its per-thread state, with the keys its forward uses."""
    owner.__dict__[_ATTR] = _PerThread(tuple(keys))


def call_state(owner: object) -> dict:
    """This thread's state of the forward call that ``owner`` (a module) is running: a dict."""
    holder = owner.__dict__.get(_ATTR)
    if holder is None:  # a module built without hold_call_state (unpickled from an earlier version)
        hold_call_state(owner)
        holder = owner.__dict__[_ATTR]
    return holder.values


def held_call_state(owner: object):
    """This thread's call state of ``owner`` if it holds one, else None; unlike :func:`call_state`, gives none to an
    object that has none (code patched into a transformers class runs for models QST never touched)."""
    holder = owner.__dict__.get(_ATTR)
    return holder.values if holder is not None else None
