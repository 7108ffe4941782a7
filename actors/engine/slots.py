"""Which session's KV is in which sequence slot: eviction to host memory, restore, the prefix cache.

Sessions outnumbering the slots are swapped: an idle session's KV goes to host memory when
another needs its slot (within --session-cache-mb; beyond it the least recently used states are
dropped and rebuilt from their token history when next used) and comes back when it is used
again. Evaluated system prompts are kept as sequence state, so a new session with a known one
starts from a copy instead of evaluating it again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..logs import EventLog
from .jobs import Backend, Job, Session

log = EventLog("engine")

PREFIX_CACHE_ENTRIES = 8  # evaluated system prompts kept as sequence state


class SlotTable:
    """The context's sequence slots and the states evicted from them. Only the loop calls what
    touches the context (`bind`, `snapshot_prefix`), never while a decode runs."""

    def __init__(
        self,
        backend: Backend,
        cache_limit_bytes: int,
        on_event: Callable[[str, Session], None],
    ) -> None:
        self.backend = backend
        self.slots: list[Session | None] = [None] * backend.n_seq_max
        self.cache_limit = cache_limit_bytes
        self.on_event = on_event  # "evicted" / "restored"
        self.saved: dict[str, Session] = {}  # sessions whose KV is in host memory
        self.saved_bytes = 0
        self.prefix_cache: OrderedDict[tuple[int, ...], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self.slots)

    def holder(self, slot: int) -> Session | None:
        return self.slots[slot]

    def cells_used(self) -> int:
        return sum(s.n_past for s in self.slots if s is not None)

    # ---- bookkeeping only (safe while a decode runs) --------------------------------------

    def forget_kv(self, session: Session) -> None:
        """Drop the session's KV: the loop clears its slot before the session next uses it."""
        session.clear_slot = session.slot is not None
        self.drop_saved(session)
        session.n_past = 0

    def release(self, session: Session) -> None:
        """The session is gone: its slot is free (cleared when next bound), its state dropped."""
        if session.slot is not None:
            self.slots[session.slot] = None
            session.slot = None
        self.drop_saved(session)

    def drop_saved(self, session: Session) -> None:
        if session.saved is not None:
            self.saved_bytes -= len(session.saved)
            session.saved = None
            self.saved.pop(session.session_id, None)

    def store_saved(self, session: Session, state: bytes) -> None:
        """Keep an evicted session's state within the cache limit, dropping the least recently
        used states beyond it (those sessions are rebuilt from their history)."""
        session.saved = state
        self.saved[session.session_id] = session
        self.saved_bytes += len(state)
        while self.saved_bytes > self.cache_limit and self.saved:
            oldest = min(self.saved.values(), key=lambda s: s.last_used)
            self.drop_saved(oldest)
            oldest.n_past = 0
            log.debug("session state dropped", session_id=oldest.session_id)

    def free_slot_for(self, session: Session) -> int | None:
        """The slot this session can use now: its own, a free one, or an idle one to evict."""
        if session.slot is not None:
            return session.slot
        for index, holder in enumerate(self.slots):
            if holder is None:
                return index
        idle = [s for s in self.slots if s is not None and s.job is None]
        if not idle:
            return None
        victim = min(idle, key=lambda s: s.last_used)
        assert victim.slot is not None
        return victim.slot

    def spare(self, n_ctx: int) -> list[tuple[int, int]]:
        """(slot, position after its KV) of every slot a throw-away padding row may use: free,
        or held by an idle session with room after its KV."""
        return [
            (index, 0 if holder is None or holder.clear_slot else holder.n_past)
            for index, holder in enumerate(self.slots)
            if holder is None or (holder.job is None and holder.n_past < n_ctx - 1)
        ]

    # ---- the context (the loop only) ------------------------------------------------------

    def bind(self, session: Session, slot: int) -> None:
        """Give `slot` to `session`: evict its holder to host memory, restore the session's
        saved state if it has one."""
        backend = self.backend
        if session.slot == slot:
            if session.clear_slot:
                backend.seq_clear(slot)
                session.clear_slot = False
            return
        victim = self.slots[slot]
        if victim is not None:
            self.drop_saved(victim)
            if victim.n_past and not victim.clear_slot:
                self.store_saved(victim, backend.seq_save(slot))
            else:
                victim.n_past = 0
            victim.slot = None
            victim.clear_slot = False
            self.on_event("evicted", victim)
            log.debug(
                "session evicted", session_id=victim.session_id, bytes=len(victim.saved or b"")
            )
        backend.seq_clear(slot)
        self.slots[slot] = session
        session.slot = slot
        if session.saved is not None:
            self.on_event("restored", session)
            try:
                backend.seq_restore(slot, session.saved)
            except RuntimeError:
                log.warning("session restore failed, re-evaluating", session_id=session.session_id)
                backend.seq_clear(slot)
                session.n_past = 0
            self.drop_saved(session)

    def use_prefix(self, job: Job) -> None:
        """A system prompt evaluated before is restored instead of evaluated again; a new one is
        snapshotted once its last token is in the KV (`job.prefix_end`)."""
        prefix, slot = job.prefix, job.session.slot
        if prefix is None or job.session.n_past != 0 or slot is None:
            return
        state = self.prefix_cache.get(prefix)
        if state is None:
            job.prefix_end = len(prefix)
            return
        self.prefix_cache.move_to_end(prefix)
        try:
            self.backend.seq_restore(slot, state)
        except RuntimeError:
            self.backend.seq_clear(slot)
            return
        job.session.n_past = len(prefix)
        job.cached_tokens = len(prefix)
        job.prompt_tokens -= len(prefix)

    def snapshot_prefix(self, job: Job) -> None:
        assert job.prefix is not None and job.session.slot is not None
        self.prefix_cache[job.prefix] = self.backend.seq_save(job.session.slot)
        self.prefix_cache.move_to_end(job.prefix)
        while len(self.prefix_cache) > PREFIX_CACHE_ENTRIES:
            self.prefix_cache.popitem(last=False)
        job.prefix_end = 0
