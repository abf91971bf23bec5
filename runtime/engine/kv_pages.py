"""Which KV page holds which positions: a pool of fixed-size pages with reference counts,
and a radix tree over full pages that lets a new request reuse a cached prompt prefix.

Every page is in exactly one of three states:
  free      ref 0, not in the tree          (on the free list, ready to hand out)
  in use    ref > 0                         (in some sequence's page table; maybe in the tree too)
  cached    ref 0, in the tree              (kept for prefix hits; evicted LRU, leaves first)
`ref` counts page-table entries only; the tree's ownership is separate, which is why a
cached page can have ref 0 and still not be free.

Tree pages are immutable: a page enters the tree only once all its positions are
computed, and a sequence writes a page only while it alone holds it and the tree does
not. Any other write goes through copy-on-write: a fresh page, plus a PageCopy the
model runner must apply before that step's forward pass.

The page manager never touches tensors; it hands out page ids and copy instructions.

Hybrid models (Qwen3.5) also keep a fixed-size linear-attention state per sequence; the
manager hands each admitted sequence a state slot (`seq.state_slot`) in the model
runner's state pool, beside its pages. That state summarises the whole prefix and cannot
be rebuilt from cached pages, so the prefix cache is off for them: every lookup is a
miss and the prompt is recomputed (correct, only slower).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from ..errors import ArleError
from .sequence import Sequence

PAGE_SIZE = 16


@dataclass(frozen=True)
class PageCopy:
    """Copy page `src`'s K and V (all layers, all positions) into page `dst`.

    Apply a step's copies before its forward pass, in order (or as one gather followed
    by one scatter): a `src` given up by one sequence may be handed to another as a
    write target or a later `dst` within the same step.
    """

    src: int
    dst: int


class _Node:
    """A full page in the radix tree; the path from the root spells its token prefix."""

    __slots__ = ("key", "page", "parent", "children", "depth", "last_used")

    def __init__(self, key: tuple[int, ...], page: int, parent: "_Node | None"):
        self.key = key
        self.page = page
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.depth = 0 if parent is None else parent.depth + 1
        self.last_used = 0


class PageManager:
    """Allocates KV pages to sequences and caches full pages for prefix reuse."""

    def __init__(self, num_pages: int, page_size: int = PAGE_SIZE, prefix_cache: bool = True, state_slots: int = 0):
        if num_pages < 1:
            raise ArleError("The KV cache has no room for a single page; give it more memory.")
        self.num_pages = num_pages
        self.page_size = page_size
        # state_slots > 0: a hybrid model's linear-attention state pool (see the module doc).
        self.num_state_slots = state_slots
        self._free_state_slots = list(range(state_slots - 1, -1, -1))
        self.prefix_cache = prefix_cache and not state_slots
        self._ref = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._root = _Node((), -1, None)
        self._node_of: dict[int, _Node] = {}  # page -> its tree node
        self._tail: dict[int, _Node] = {}  # seq_id -> deepest tree node of its published pages
        self._num_evictable = 0  # tree pages with ref 0
        # Lazy LRU heap of evictable leaves: (last_used, push order, node). Entries go
        # stale when a node is used again, gains a child or is evicted; pop checks.
        self._heap: list[tuple[int, int, _Node]] = []
        self._pushes = itertools.count()
        self._tick = 0
        self.prefix_lookup_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_evicted = 0

    # --- counters (for /metrics) ---------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        """The longest sequence the pool could hold with nothing else in it."""
        return self.num_pages * self.page_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Pages in the prefix tree, in use or not."""
        return len(self._node_of)

    @property
    def num_evictable(self) -> int:
        return self._num_evictable

    @property
    def num_available(self) -> int:
        """Pages an allocation can get: free ones plus cached ones nobody uses."""
        return len(self._free) + self._num_evictable

    @property
    def num_in_use(self) -> int:
        return self.num_pages - self.num_available

    def stats(self) -> dict[str, int]:
        return {
            "kv_pages_total": self.num_pages,
            "kv_pages_in_use": self.num_in_use,
            "kv_pages_cached": self.num_cached,
            "kv_pages_free": self.num_free,
            "kv_pages_evicted": self.num_evicted,
            "prefix_lookup_tokens": self.prefix_lookup_tokens,
            "prefix_hit_tokens": self.prefix_hit_tokens,
        }

    # --- what the scheduler calls ----------------------------------------------------

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def lookup(self, token_ids: list[int]) -> int:
        """How many leading tokens a sequence with these tokens would get from the cache.

        At most len - 1: the last token must go through the model to give logits."""
        return min(len(self._match(token_ids)) * self.page_size, max(len(token_ids) - 1, 0))

    def try_admit(self, seq: Sequence) -> list[PageCopy] | None:
        """Give a waiting sequence its cached prefix and pages for all its tokens.

        Reserving the whole prompt up front means an admitted prefill never stalls for
        pages halfway; only decodes grow afterwards. Returns the copies its first
        chunk needs, or None (and changes nothing) when the pages are not there.
        """
        assert not seq.page_table and seq.num_computed == 0, seq
        n = seq.num_tokens
        nodes = self._match(seq.token_ids)
        while True:
            cached = min(len(nodes) * self.page_size, n - 1)
            # A prompt made only of cached pages still computes its last token, which
            # lands in the last matched page: that page is copied, not written.
            cow = len(nodes) * self.page_size > cached
            fresh = self.pages_for(n) - len(nodes) + cow
            pinned = sum(1 for node in nodes if self._ref[node.page] == 0)
            if fresh + pinned <= self.num_available:
                break
            if not cow:
                return None
            # Recomputing the last page's tokens needs one page less than copying it
            # (the copy's source stays pinned meanwhile); matters when the pool is tight.
            nodes = nodes[:-1]
        if self.num_state_slots:
            if not self._free_state_slots:
                return None
            seq.state_slot = self._free_state_slots.pop()
        self._tick += 1
        for node in nodes:
            self._incref(node.page)
            node.last_used = self._tick
        seq.page_table = [node.page for node in nodes]
        seq.num_computed = cached
        seq.num_cached_tokens = cached
        full = cached // self.page_size
        self._tail[seq.seq_id] = nodes[full - 1] if full else self._root
        self.prefix_lookup_tokens += n
        self.prefix_hit_tokens += cached
        return self.prepare(seq, n)

    def pages_needed(self, seq: Sequence, end: int) -> int:
        """Fresh pages `prepare(seq, end)` would take."""
        first = seq.num_computed // self.page_size
        last = self.pages_for(end)
        table = seq.page_table
        return sum(1 for i in range(first, last) if i >= len(table) or not self._writable(table[i]))

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_available

    def prepare(self, seq: Sequence, end: int) -> list[PageCopy]:
        """Make positions [seq.num_computed, end) writable by `seq`: append missing pages,
        copy-on-write shared ones. Check `pages_needed` against `can_allocate` first."""
        copies = []
        table = seq.page_table
        for i in range(seq.num_computed // self.page_size, self.pages_for(end)):
            if i == len(table):
                table.append(self._allocate())
            elif not self._writable(table[i]):
                src = table[i]
                table[i] = self._allocate()  # before the decref, so dst can never be src
                self._decref(src)
                copies.append(PageCopy(src, table[i]))
        return copies

    def publish(self, seq: Sequence) -> None:
        """Put the sequence's full, computed pages into the tree (call after each step).

        Publishing as soon as a page fills, not only at the end, lets requests running
        side by side share a common prompt. If the tree already holds an identical page
        (two sequences computed the same prefix at once), the sequence switches to the
        tree's page and its duplicate goes back to the pool.
        """
        if not self.prefix_cache:
            return
        node = self._tail[seq.seq_id]
        full = seq.num_computed // self.page_size
        if node.depth >= full:
            return
        self._tick += 1
        table = seq.page_table
        for i in range(node.depth, full):
            key = tuple(seq.token_ids[i * self.page_size : (i + 1) * self.page_size])
            child = node.children.get(key)
            if child is None:
                assert table[i] not in self._node_of, (seq, i)
                child = _Node(key, table[i], node)
                node.children[key] = child
                self._node_of[table[i]] = child
            elif child.page != table[i]:
                self._incref(child.page)
                self._decref(table[i])
                table[i] = child.page
            child.last_used = self._tick
            node = child
        self._tail[seq.seq_id] = node

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's pages (finish, abort or preemption); full computed pages
        stay in the tree for later prefix hits, the rest return to the free list."""
        if seq.seq_id in self._tail:
            self.publish(seq)
            del self._tail[seq.seq_id]
        self._tick += 1
        for page in reversed(seq.page_table):
            node = self._node_of.get(page)
            if node is not None:
                node.last_used = self._tick
            self._decref(page)
        seq.page_table = []
        if seq.state_slot is not None:
            self._free_state_slots.append(seq.state_slot)
            seq.state_slot = None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` (same tokens) share all of `parent`'s pages, e.g. for n > 1
        samples of one prompt. The shared tail page is copied by whichever writes first."""
        assert child.token_ids == parent.token_ids and not child.page_table
        if self.num_state_slots:
            raise ArleError("Forking a sequence of a hybrid (linear-attention) model is not supported.")
        child.page_table = list(parent.page_table)
        for page in child.page_table:
            self._incref(page)
        child.num_computed = parent.num_computed
        self._tail[child.seq_id] = self._tail.get(parent.seq_id, self._root)

    def slots(self, seq: Sequence, start: int, length: int) -> list[int]:
        """Flat KV slot (page * page_size + offset) of positions [start, start + length)."""
        ps, table = self.page_size, seq.page_table
        return [table[p // ps] * ps + p % ps for p in range(start, start + length)]

    # --- internals ---------------------------------------------------------------------

    def _match(self, token_ids: list[int]) -> list[_Node]:
        nodes: list[_Node] = []
        if not self.prefix_cache:
            return nodes
        node, ps = self._root, self.page_size
        for start in range(0, len(token_ids) - ps + 1, ps):
            node = node.children.get(tuple(token_ids[start : start + ps]))
            if node is None:
                break
            nodes.append(node)
        return nodes

    def _writable(self, page: int) -> bool:
        return self._ref[page] == 1 and page not in self._node_of

    def _incref(self, page: int) -> None:
        if self._ref[page] == 0 and page in self._node_of:
            self._num_evictable -= 1
        self._ref[page] += 1

    def _decref(self, page: int) -> None:
        self._ref[page] -= 1
        assert self._ref[page] >= 0, page
        if self._ref[page]:
            return
        node = self._node_of.get(page)
        if node is None:
            self._free.append(page)
            return
        self._num_evictable += 1
        if not node.children:
            self._push(node)

    def _push(self, node: _Node) -> None:
        # Re-pinning a hot prefix pushes again each time it is released; rebuild the
        # heap from the live leaves before stale entries outgrow the tree.
        if len(self._heap) > 2 * len(self._node_of) + 64:
            self._heap = [
                (n.last_used, next(self._pushes), n)
                for n in self._node_of.values()
                if not n.children and self._ref[n.page] == 0
            ]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (node.last_used, next(self._pushes), node))

    def _allocate(self) -> int:
        if not self._free:
            self._evict_one()
        page = self._free.pop()
        self._ref[page] = 1
        return page

    def _evict_one(self) -> None:
        while self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            live = self._node_of.get(node.page) is node
            if live and not node.children and self._ref[node.page] == 0 and node.last_used == stamp:
                break
        else:
            raise RuntimeError("out of KV pages: the caller skipped can_allocate")
        parent = node.parent
        del parent.children[node.key]
        del self._node_of[node.page]
        self._num_evictable -= 1
        self._free.append(node.page)
        self.num_evicted += 1
        if parent is not self._root and not parent.children and self._ref[parent.page] == 0:
            self._push(parent)

    def check_invariants(self, live: list[Sequence]) -> None:
        """Assert the bookkeeping is consistent with the live sequences' page tables
        (tests and debugging; O(pages))."""
        refs = [0] * self.num_pages
        for seq in live:
            for page in seq.page_table:
                refs[page] += 1
        assert refs == self._ref, "ref counts differ from page-table references"
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        for page in free:
            assert self._ref[page] == 0 and page not in self._node_of, f"free page {page} is in use or cached"
        in_tree = set(self._node_of)
        idle = {p for p in range(self.num_pages) if self._ref[p] == 0}
        assert idle == free | in_tree & idle, "a page with ref 0 is neither free nor cached (leaked)"
        assert self._num_evictable == len(in_tree & idle), "evictable count is off"
        for page, node in self._node_of.items():
            assert node.page == page and node.parent.children.get(node.key) is node, "tree map out of sync"
            assert len(node.key) == self.page_size
            if self._ref[page] and node.parent is not self._root:
                assert self._ref[node.parent.page], "a used tree page has an unused parent"
        for seq in live:
            for i, page in enumerate(seq.page_table):
                node = self._node_of.get(page)
                if node is not None:
                    key = tuple(seq.token_ids[i * self.page_size : (i + 1) * self.page_size])
                    assert node.depth == i + 1 and node.key == key, f"{seq} holds tree page {page} at the wrong place"
            tail = self._tail.get(seq.seq_id)
            if tail is not None and tail is not self._root:
                assert seq.page_table[tail.depth - 1] == tail.page, f"{seq} lost its published path"
