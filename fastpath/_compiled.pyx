# cython: language_level=3
"""The compiled fastpath twin: card table and access decision in C arrays.

Same API and answers as fastpath/_pure.py (the reference; the property tests
compare the two). Written for the gate thread and for memory: 1,000,000 cards
must fit well within 64 MB, so nothing per card or per person is a Python
object. Cards are sorted uint64 keys searched by a branchless binary search
(with person index and flags in parallel arrays); person ids are one UTF-8
blob with offsets; schedules are one contiguous bitmap buffer.
"""
from cpython.long cimport PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cdef extern from *:
    # gcc and clang builtin: 1 when a - b overflows long long.
    bint __builtin_ssubll_overflow(long long a, long long b, long long* res) nogil

from . import _pure
from . import codes as _codes
from .columns import TableColumns

# The numbers of fastpath/codes.py, as C constants (test_fastpath checks they agree).
cdef enum:
    C_IN = 0
    C_OUT = 1
    C_NORMAL = 0
    C_ENTRY_ONLY = 1
    C_FREE = 2
    C_LOCKDOWN = 3
    C_FIRE = 4
    C_N_MODES = 5
    C_APB_OFF = 0
    C_APB_SOFT = 1
    C_APB_HARD = 2
    C_APB_TIMED = 3
    C_N_APB_MODES = 4
    C_GRANTED = 0
    C_LOCKDOWN_DENIED = 1
    C_WRONG_DIRECTION = 2
    C_BLOCKED = 3
    C_UNKNOWN_CARD = 4
    C_NOT_YET_VALID = 5
    C_EXPIRED = 6
    C_HOLIDAY = 7
    C_OUTSIDE_SCHEDULE = 8
    C_EXIT_RESTRICTED = 9
    C_ANTIPASSBACK = 10
    C_GATE_BUSY = 11
    C_WARN_NONE = 0
    C_WARN_ANTIPASSBACK = 1
    C_POS_UNKNOWN = 0
    C_POS_IN = 1
    C_POS_OUT = 2
    C_CARD_BLOCKED = 1
    C_PERSON_GUEST = 1
    C_MINUTES_PER_WEEK = 10080
    C_BITMAP_BYTES = 1260

IN = C_IN
OUT = C_OUT
NORMAL = C_NORMAL
ENTRY_ONLY = C_ENTRY_ONLY
FREE = C_FREE
LOCKDOWN = C_LOCKDOWN
FIRE = C_FIRE
APB_OFF = C_APB_OFF
APB_SOFT = C_APB_SOFT
APB_HARD = C_APB_HARD
APB_TIMED = C_APB_TIMED
GRANTED = C_GRANTED
LOCKDOWN_DENIED = C_LOCKDOWN_DENIED
WRONG_DIRECTION = C_WRONG_DIRECTION
BLOCKED = C_BLOCKED
UNKNOWN_CARD = C_UNKNOWN_CARD
NOT_YET_VALID = C_NOT_YET_VALID
EXPIRED = C_EXPIRED
HOLIDAY = C_HOLIDAY
OUTSIDE_SCHEDULE = C_OUTSIDE_SCHEDULE
EXIT_RESTRICTED = C_EXIT_RESTRICTED
ANTIPASSBACK = C_ANTIPASSBACK
GATE_BUSY = C_GATE_BUSY
WARN_NONE = C_WARN_NONE
WARN_ANTIPASSBACK = C_WARN_ANTIPASSBACK
POS_UNKNOWN = C_POS_UNKNOWN
POS_IN = C_POS_IN
POS_OUT = C_POS_OUT
CARD_BLOCKED = C_CARD_BLOCKED
PERSON_GUEST = C_PERSON_GUEST
MINUTES_PER_WEEK = C_MINUTES_PER_WEEK
BITMAP_BYTES = C_BITMAP_BYTES
# No C counterpart (not used by the C code): the same objects as codes.py.
NO_START = _codes.NO_START
NO_END = _codes.NO_END
DIRECTIONS = _codes.DIRECTIONS
MODES = _codes.MODES
APB_MODES = _codes.APB_MODES
RESULTS = _codes.RESULTS
N_MODES = C_N_MODES
N_APB_MODES = C_N_APB_MODES

__all__ = ["GateState", "Table", "decide"]


cdef inline int _as_key(object key, unsigned long long* out) except -1:
    """1 and the key in *out; 0 for an int outside 0..2**64-1 (no card has it)."""
    if not PyLong_CheckExact(key):
        key = PyNumber_Index(key)  # TypeError for a float, as in the pure twin
    try:
        out[0] = key
    except OverflowError:
        return 0
    return 1


cdef class Table:
    """The access list as an immutable card table in C memory."""

    cdef readonly str version
    cdef readonly int key_width
    cdef Py_ssize_t n_cards, n_persons, n_gs, n_holidays
    cdef unsigned long long* keys  # sorted ascending, unique
    cdef int* card_person  # -1: nobody
    cdef unsigned char* card_flags
    cdef long long* p_from
    cdef long long* p_until
    cdef int* p_gs  # groupset; -1 (no group) stored as n_gs, the all-zero set
    cdef unsigned char* p_flags
    cdef int* p_max_uses
    cdef unsigned int* id_off  # n_persons + 1 offsets into id_blob
    cdef char* id_blob  # person ids, UTF-8, back to back
    cdef unsigned char* bitmaps  # per groupset: entry, entry_holiday, exit bitmaps
    cdef unsigned char* holiday_open  # per groupset: entry_holiday has any bit set
    cdef int* holidays  # sorted date ordinals
    cdef size_t allocated
    cdef bint built

    def __cinit__(self, *args, **kwargs):
        self.keys = NULL
        self.card_person = NULL
        self.card_flags = NULL
        self.p_from = NULL
        self.p_until = NULL
        self.p_gs = NULL
        self.p_flags = NULL
        self.p_max_uses = NULL
        self.id_off = NULL
        self.id_blob = NULL
        self.bitmaps = NULL
        self.holiday_open = NULL
        self.holidays = NULL
        self.allocated = 0
        self.built = False

    def __dealloc__(self):
        free(self.keys)
        free(self.card_person)
        free(self.card_flags)
        free(self.p_from)
        free(self.p_until)
        free(self.p_gs)
        free(self.p_flags)
        free(self.p_max_uses)
        free(self.id_off)
        free(self.id_blob)
        free(self.bitmaps)
        free(self.holiday_open)
        free(self.holidays)

    cdef void* _alloc(self, size_t count, size_t size) except NULL:
        cdef size_t n = count * size
        cdef void* p = malloc(n if n else 1)
        if p == NULL:
            raise MemoryError(f"fastpath.Table: cannot allocate {n} bytes for the card table")
        self.allocated += n
        return p

    def __init__(self, columns):
        if self.built:
            raise TypeError("a fastpath Table is immutable; build a new one")
        # Typed arrays and lengths, checked by the same code as the pure twin (no copies).
        c = _pure.normalised(columns, copy=False)
        cdef Py_ssize_t n = c["n_cards"], np = c["n_persons"], ng = c["n_groupsets"], i
        cdef const unsigned long long[::1] keys = c["card_keys"]
        cdef const int[::1] card_person = c["card_person"]
        cdef const unsigned char[::1] card_flags = c["card_flags"]
        cdef const long long[::1] p_from = c["person_from"]
        cdef const long long[::1] p_until = c["person_until"]
        cdef const int[::1] p_gs = c["person_groupset"]
        cdef const unsigned char[::1] p_flags = c["person_flags"]
        cdef const int[::1] p_max_uses = c["person_max_uses"]
        cdef const int[::1] holidays = c["holidays"]
        cdef Py_ssize_t nh = holidays.shape[0]

        # Per-entry checks in C, in _pure.validated()'s order and with its messages.
        for i in range(1, n):
            if keys[i - 1] >= keys[i]:
                raise _pure.element_error("card_keys", i, keys[i], keys[i - 1])
        for i in range(1, nh):
            if holidays[i - 1] >= holidays[i]:
                raise _pure.element_error("holidays", i, holidays[i], holidays[i - 1])
        for i in range(n):
            if card_person[i] < -1 or card_person[i] >= np:
                raise _pure.element_error("card_person", i, card_person[i], np)
        for i in range(np):
            if p_gs[i] < -1 or p_gs[i] >= ng:
                raise _pure.element_error("person_groupset", i, p_gs[i], ng)
        for i in range(np):
            if p_max_uses[i] < 0:
                raise _pure.element_error("person_max_uses", i, p_max_uses[i], 0)

        self.version = columns.version
        self.key_width = columns.key_width
        self.n_cards = n
        self.n_persons = np
        self.n_gs = ng
        self.n_holidays = nh

        self.keys = <unsigned long long*>self._alloc(n, sizeof(unsigned long long))
        self.card_person = <int*>self._alloc(n, sizeof(int))
        self.card_flags = <unsigned char*>self._alloc(n, 1)
        if n:
            memcpy(self.keys, &keys[0], n * sizeof(unsigned long long))
            memcpy(self.card_person, &card_person[0], n * sizeof(int))
            memcpy(self.card_flags, &card_flags[0], n)

        self.p_from = <long long*>self._alloc(np, sizeof(long long))
        self.p_until = <long long*>self._alloc(np, sizeof(long long))
        self.p_gs = <int*>self._alloc(np, sizeof(int))
        self.p_flags = <unsigned char*>self._alloc(np, 1)
        self.p_max_uses = <int*>self._alloc(np, sizeof(int))
        if np:
            memcpy(self.p_from, &p_from[0], np * sizeof(long long))
            memcpy(self.p_until, &p_until[0], np * sizeof(long long))
            memcpy(self.p_flags, &p_flags[0], np)
            memcpy(self.p_max_uses, &p_max_uses[0], np * sizeof(int))
        for i in range(np):
            self.p_gs[i] = p_gs[i] if p_gs[i] >= 0 else <int>ng

        self.holidays = <int*>self._alloc(nh, sizeof(int))
        if nh:
            memcpy(self.holidays, &holidays[0], nh * sizeof(int))

        self._copy_bitmaps(c["gs_entry"], c["gs_entry_holiday"], c["gs_exit"])
        self._copy_ids(c["person_ids"])
        self.built = True

    cdef _copy_bitmaps(self, list entry, list entry_holiday, list exit_):
        cdef Py_ssize_t ng = self.n_gs, g, b
        cdef const unsigned char[::1] bm
        cdef unsigned char* dst
        # One extra all-zero groupset at index ng for persons in no group.
        self.bitmaps = <unsigned char*>self._alloc((ng + 1) * 3, C_BITMAP_BYTES)
        self.holiday_open = <unsigned char*>self._alloc(ng + 1, 1)
        memset(self.bitmaps, 0, (ng + 1) * 3 * C_BITMAP_BYTES)
        memset(self.holiday_open, 0, ng + 1)
        for g in range(ng):
            dst = self.bitmaps + g * 3 * C_BITMAP_BYTES
            bm = entry[g]
            memcpy(dst, &bm[0], C_BITMAP_BYTES)
            bm = entry_holiday[g]
            memcpy(dst + C_BITMAP_BYTES, &bm[0], C_BITMAP_BYTES)
            for b in range(C_BITMAP_BYTES):
                if bm[b]:
                    self.holiday_open[g] = 1
                    break
            bm = exit_[g]
            memcpy(dst + 2 * C_BITMAP_BYTES, &bm[0], C_BITMAP_BYTES)

    cdef _copy_ids(self, ids):
        cdef Py_ssize_t np = self.n_persons, i, size
        cdef size_t total = 0
        cdef const char* data
        # Two passes so no per-person bytes object is ever made: ASCII str data is
        # read in place; a non-ASCII id gets its UTF-8 form cached on the str.
        for i in range(np):
            PyUnicode_AsUTF8AndSize(ids[i], &size)
            total += <size_t>size
        if total > 0xFFFFFFFF:
            raise ValueError(
                f"TableColumns.person_ids hold {total} bytes of ids, more than 4 GiB; "
                "use shorter pseudonymous ids"
            )
        self.id_off = <unsigned int*>self._alloc(np + 1, sizeof(unsigned int))
        self.id_blob = <char*>self._alloc(total, 1)
        total = 0
        for i in range(np):
            data = PyUnicode_AsUTF8AndSize(ids[i], &size)
            self.id_off[i] = <unsigned int>total
            memcpy(self.id_blob + total, data, size)
            total += <size_t>size
        self.id_off[np] = <unsigned int>total

    # ---------------------------------------------------------------- C helpers

    cdef inline Py_ssize_t _find(self, unsigned long long k) noexcept nogil:
        """Card index of key k, or -1. Branchless lower bound: the compiler
        turns the step into a conditional move, so no mispredicted branches."""
        cdef const unsigned long long* base = self.keys
        cdef Py_ssize_t n = self.n_cards, half
        if n == 0:
            return -1
        while n > 1:
            half = n >> 1
            base = base + half if base[half] <= k else base
            n -= half
        if base[0] == k:
            return base - self.keys
        return -1

    cdef inline bint _is_holiday(self, long long day) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self.n_holidays, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.holidays[mid] < day:
                lo = mid + 1
            else:
                hi = mid
        return lo < self.n_holidays and self.holidays[lo] == day

    cdef inline str _pid(self, Py_ssize_t index):
        cdef unsigned int start = self.id_off[index]
        return PyUnicode_DecodeUTF8(self.id_blob + start, self.id_off[index + 1] - start, NULL)

    cdef inline int _check_index(self, Py_ssize_t index) except -1:
        if index < 0 or index >= self.n_persons:
            raise IndexError(f"person index {index} out of range (table has {self.n_persons})")
        return 0

    # ---------------------------------------------------------------- Python API

    def __len__(self) -> int:
        return self.n_cards

    def __repr__(self) -> str:
        return f"<Table version={self.version!r} cards={self.n_cards} persons={self.n_persons}>"

    @property
    def persons(self) -> int:
        return self.n_persons

    def lookup(self, key) -> int:
        """The card's person index; -1 for an unknown card or a blocked card of nobody."""
        cdef unsigned long long k
        cdef Py_ssize_t ci
        if not _as_key(key, &k):
            return -1
        ci = self._find(k)
        return self.card_person[ci] if ci >= 0 else -1

    def is_blocked(self, key) -> bool:
        cdef unsigned long long k
        cdef Py_ssize_t ci
        if not _as_key(key, &k):
            return False
        ci = self._find(k)
        return ci >= 0 and (self.card_flags[ci] & C_CARD_BLOCKED) != 0

    def person_id(self, Py_ssize_t index) -> str:
        self._check_index(index)
        return self._pid(index)

    def is_guest(self, Py_ssize_t index) -> bool:
        self._check_index(index)
        return (self.p_flags[index] & C_PERSON_GUEST) != 0

    def nbytes(self) -> int:
        """Memory held: every C array plus the object itself."""
        return self.allocated + object.__sizeof__(self)


cdef class GateState:
    """Anti-passback positions and guest uses, keyed by person id (see _pure.GateState)."""

    cdef dict _position  # pid -> (POS_IN/POS_OUT, local day)
    cdef dict _last_entry  # pid -> epoch s of the last entry passage
    cdef dict _uses  # guest pid -> entries spent

    def __cinit__(self):
        self._position = {}
        self._last_entry = {}
        self._uses = {}

    def record_passage(self, person_id, int direction, long long epoch_s, long long day,
                       bint guest) -> None:
        """A card passage happened: move the person; an entry spends a guest use."""
        if direction == C_IN:
            self._position[person_id] = (C_POS_IN, day)
            self._last_entry[person_id] = epoch_s
            if guest:
                self._uses[person_id] = self._uses.get(person_id, 0) + 1
        elif direction == C_OUT:
            self._position[person_id] = (C_POS_OUT, day)
        else:
            _pure._check_direction(direction)

    cdef inline int _position_of(self, person_id, long long day) except -1:
        t = self._position.get(person_id)
        if t is None or <long long>(<tuple>t)[1] != day:
            return C_POS_UNKNOWN
        return (<tuple>t)[0]

    def position(self, person_id, long long day) -> int:
        return self._position_of(person_id, day)

    def last_entry(self, person_id) -> int:
        return self._last_entry.get(person_id, 0)

    def uses(self, person_id) -> int:
        return self._uses.get(person_id, 0)

    def to_dict(self) -> dict:
        return _pure.state_to_dict(self._position, self._last_entry, self._uses)

    @classmethod
    def from_dict(cls, d) -> GateState:
        cdef GateState state = cls()
        state._position, state._last_entry, state._uses = _pure.state_from_dict(d)
        return state

    def __repr__(self) -> str:
        return f"<GateState positions={len(self._position)} guests={len(self._uses)}>"


def decide(Table table not None, GateState state not None, key, int direction, int mode,
           long long epoch_s, int minute_of_week, long long day, bint busy, int apb_mode,
           long long apb_window_s):
    """(result, person_index, warning) for one card read; same rules as _pure.decide."""
    cdef unsigned long long k
    cdef Py_ssize_t ci = -1
    cdef int idx = -1, gs, max_uses, pos, warning = C_WARN_NONE
    cdef bint blocked = False, guest
    cdef const unsigned char* bm
    cdef unsigned int byte
    cdef unsigned char mask
    cdef long long last, diff
    cdef bint refused

    if (
        (direction != C_IN and direction != C_OUT)
        or mode < 0 or mode >= C_N_MODES
        or minute_of_week < 0 or minute_of_week >= C_MINUTES_PER_WEEK
        or apb_mode < 0 or apb_mode >= C_N_APB_MODES
    ):
        _pure.check_arguments(direction, mode, minute_of_week, apb_mode)  # raises

    if _as_key(key, &k):
        ci = table._find(k)
        if ci >= 0:
            idx = table.card_person[ci]
            blocked = table.card_flags[ci] & C_CARD_BLOCKED
    if mode == C_FIRE:
        return (C_GRANTED, idx, C_WARN_NONE)  # recorded without a check: who evacuated
    if mode == C_LOCKDOWN:
        return (C_LOCKDOWN_DENIED, idx, C_WARN_NONE)
    if mode == C_ENTRY_ONLY and direction == C_OUT:
        return (C_WRONG_DIRECTION, idx, C_WARN_NONE)
    if blocked:
        return (C_BLOCKED, idx, C_WARN_NONE)
    if idx < 0:
        return (C_UNKNOWN_CARD, -1, C_WARN_NONE)

    guest = table.p_flags[idx] & C_PERSON_GUEST
    # A guest can always leave: no validity, schedule or anti-passback check on exit.
    if not (guest and direction == C_OUT):
        if epoch_s < table.p_from[idx]:
            return (C_NOT_YET_VALID, idx, C_WARN_NONE)
        if epoch_s >= table.p_until[idx]:
            return (C_EXPIRED, idx, C_WARN_NONE)
        max_uses = table.p_max_uses[idx]
        if guest and max_uses > 0 and state._uses.get(table._pid(idx), 0) >= max_uses:
            return (C_EXPIRED, idx, C_WARN_NONE)

        gs = table.p_gs[idx]
        bm = table.bitmaps + gs * 3 * C_BITMAP_BYTES
        byte = <unsigned int>minute_of_week >> 3
        mask = 1 << (minute_of_week & 7)
        if direction == C_IN:
            if table.n_holidays and table._is_holiday(day):
                if not table.holiday_open[gs]:
                    return (C_HOLIDAY, idx, C_WARN_NONE)
                if not (bm[C_BITMAP_BYTES + byte] & mask):
                    return (C_OUTSIDE_SCHEDULE, idx, C_WARN_NONE)
            elif not (bm[byte] & mask):
                return (C_OUTSIDE_SCHEDULE, idx, C_WARN_NONE)
        elif not (bm[2 * C_BITMAP_BYTES + byte] & mask):
            return (C_EXIT_RESTRICTED, idx, C_WARN_NONE)

        if apb_mode == C_APB_SOFT or apb_mode == C_APB_HARD:
            pos = state._position_of(table._pid(idx), day)
            if (direction == C_IN and pos == C_POS_IN) or (direction == C_OUT and pos == C_POS_OUT):
                if apb_mode == C_APB_HARD:
                    return (C_ANTIPASSBACK, idx, C_WARN_NONE)
                warning = C_WARN_ANTIPASSBACK
        elif apb_mode == C_APB_TIMED and direction == C_IN:
            last = state._last_entry.get(table._pid(idx), 0)
            if last:
                # epoch_s - last < apb_window_s, exactly as Python ints would say it: on
                # int64 overflow the true difference is beyond any window, with the
                # sign of epoch_s - last.
                if __builtin_ssubll_overflow(epoch_s, last, &diff):
                    refused = epoch_s < last
                else:
                    refused = diff < apb_window_s
                if refused:
                    return (C_ANTIPASSBACK, idx, C_WARN_NONE)

    if busy:
        return (C_GATE_BUSY, idx, C_WARN_NONE)
    return (C_GRANTED, idx, warning)
