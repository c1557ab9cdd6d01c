# cython: language_level=3
"""The compiled fastpath twin: card table and access decision in C arrays.

Same API and answers as fastpath/_pure.py (the reference; the property tests
compare the two). Written for the gate thread and for memory: 1,000,000 cards
must fit well within 64 MB, so nothing per card or per person is a Python
object. Cards are 16-byte records in an open-addressing hash table carrying
their owner's groupset; validity windows and guest limits are per-person
arrays read only for the people who have them; person ids are one UTF-8 blob
with offsets; schedules are one contiguous bitmap buffer. See Table.
"""
from cpython.long cimport PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport SIZE_MAX
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

cdef extern from *:
    """
    #include <limits.h>
    #include <stdlib.h>
    #if defined(__unix__) || defined(__APPLE__)
    #include <sys/mman.h>
    #endif

    /* A zeroed block for the table: on 2 MiB pages where the kernel allows it
       (Linux THP in "madvise" mode), so random card reads miss the TLB far
       less. Plain malloc elsewhere. Freed with free(). */
    static void *gate_alloc_table(size_t n) {
        void *p = NULL;
        const size_t huge = (size_t)2 << 20;
    #if defined(__unix__) || defined(__APPLE__)
        if (n >= huge) {
            n = (n + huge - 1) & ~(huge - 1);
            if (posix_memalign(&p, huge, n) != 0) return NULL;
    #ifdef MADV_HUGEPAGE
            (void)madvise(p, n, MADV_HUGEPAGE);  /* advice only */
    #endif
        }
    #endif
        if (p == NULL) p = malloc(n ? n : 1);
        return p;
    }

    static size_t gate_table_size(size_t n) {
        const size_t huge = (size_t)2 << 20;
    #if defined(__unix__) || defined(__APPLE__)
        if (n >= huge) return (n + huge - 1) & ~(huge - 1);
    #endif
        return n;
    }

    /* 1 when a - b overflows long long, else 0 and the difference in *r. */
    static int gate_sub_overflows(long long a, long long b, long long *r) {
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_ssubll_overflow(a, b, r);
    #else
        if ((b > 0 && a < LLONG_MIN + b) || (b < 0 && a > LLONG_MAX + b)) return 1;
        *r = a - b;
        return 0;
    #endif
    }
    """
    void* gate_alloc_table(size_t n) nogil
    size_t gate_table_size(size_t n) nogil
    bint gate_sub_overflows(long long a, long long b, long long* r) nogil

from . import _pure
from . import codes as _codes

# Validity bounds of a person with none (codes.NO_START / NO_END), for C.
cdef long long _codes_NO_START = _codes.NO_START
cdef long long _codes_NO_END = _codes.NO_END

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


cdef struct Card:
    # 16 bytes. The owner's groupset is copied in, so for most people (no
    # validity window, not a guest: SLOT_PLAIN) a decision reads this record
    # and the hot schedule bitmaps, and nothing else of the table.
    unsigned long long key
    unsigned int info  # SLOT_USED | SLOT_BLOCKED | SLOT_PLAIN | (person index + 1)
    int groupset  # the owner's; -1 (no group) stored as n_gs, the all-zero set


cdef extern from *:
    # Card.info bits, as unsigned C constants (an enum would be a signed int).
    """
    #define GATE_SLOT_USED 0x80000000u
    #define GATE_SLOT_BLOCKED 0x40000000u
    #define GATE_SLOT_PLAIN 0x20000000u
    #define GATE_SLOT_PERSON 0x1FFFFFFFu
    """
    const unsigned int SLOT_USED "GATE_SLOT_USED"
    const unsigned int SLOT_BLOCKED "GATE_SLOT_BLOCKED"
    const unsigned int SLOT_PLAIN "GATE_SLOT_PLAIN"  # no validity window, not a guest
    const unsigned int SLOT_PERSON "GATE_SLOT_PERSON"  # person index + 1; 0: nobody

cdef Py_ssize_t MAX_PERSONS = 0x1FFFFFFE  # what SLOT_PERSON can hold


cdef struct Validity:
    long long valid_from  # UTC epoch s, inclusive
    long long valid_until  # UTC epoch s, exclusive


cdef inline unsigned long long _mix(unsigned long long k) noexcept nogil:
    # MurmurHash3's 64-bit finaliser: clustered keys (one facility code, one
    # UID vendor prefix) still spread over the whole table.
    k ^= k >> 33
    k *= 0xff51afd7ed558ccdULL
    k ^= k >> 33
    k *= 0xc4ceb9fe1a85ec53ULL
    k ^= k >> 33
    return k


cdef inline size_t _aligned(size_t n) noexcept nogil:
    return (n + 63) & ~(<size_t>63)  # each array starts on its own cache line


cdef Py_ssize_t _unsorted_u64(const unsigned long long* a, Py_ssize_t n,
                              bint strict) noexcept nogil:
    """The first i with a[i] below (strict: not above) a[i - 1], or -1."""
    cdef Py_ssize_t i
    for i in range(1, n):
        if a[i] < a[i - 1] or (strict and a[i] == a[i - 1]):
            return i
    return -1


cdef Py_ssize_t _unsorted_i32(const int* a, Py_ssize_t n) noexcept nogil:
    """The first i with a[i] not above a[i - 1], or -1."""
    cdef Py_ssize_t i
    for i in range(1, n):
        if a[i] <= a[i - 1]:
            return i
    return -1


cdef Py_ssize_t _out_of_range_i32(const int* a, Py_ssize_t n, int low, Py_ssize_t below) noexcept nogil:
    """The first i with a[i] outside low..below-1, or -1."""
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] < low or a[i] >= below:
            return i
    return -1


cdef class Table:
    """The access list as an immutable card table in C memory.

    Cards live in an open-addressing hash table with linear probing, at most
    3/4 full: a lookup reads one cache line (two now and then), where a binary
    search over 1,000,000 keys reads about twenty. Every array sits in one
    allocation (the arena), on 2 MiB pages when it is large (gate_alloc_table).
    """

    cdef readonly str version
    cdef readonly int key_width
    cdef Py_ssize_t n_cards, n_persons, n_gs, n_holidays
    cdef Py_ssize_t n_sorted  # persons 0..n_sorted-1 are in ascending id order
    cdef void* arena  # the one allocation holding every array below
    cdef size_t arena_size
    cdef Card* slots  # n_slots; a key starts probing at _slot_of(key)
    cdef unsigned long long n_slots
    cdef Validity* validity  # per person
    cdef int* guest_uses  # per person: -1 not a guest, else max_uses (0: unlimited)
    cdef unsigned int* id_off  # n_persons + 1 offsets into id_blob
    cdef char* id_blob  # person ids, UTF-8, back to back
    cdef unsigned char* bitmaps  # per groupset: entry, entry_holiday, exit bitmaps
    cdef unsigned char* holiday_open  # per groupset: entry_holiday has any bit set
    cdef int* holidays  # sorted date ordinals
    cdef bint built

    def __cinit__(self, *args, **kwargs):
        self.arena = NULL
        self.arena_size = 0
        self.built = False

    def __dealloc__(self):
        free(self.arena)

    cdef _allocate(self, unsigned long long id_bytes):
        """Carve every array out of one arena (one free, little page rounding)."""
        cdef unsigned long long np = self.n_persons, ng = self.n_gs, need = 0
        cdef unsigned long long sizes[8]
        cdef size_t total, i
        cdef char* base
        cdef void* p = NULL
        # In 64-bit arithmetic: size_t is 32 bits on a 32-bit Raspberry Pi OS.
        sizes[0] = self.n_slots * sizeof(Card)
        sizes[1] = np * sizeof(Validity)
        sizes[2] = np * sizeof(int)
        sizes[3] = (np + 1) * sizeof(unsigned int)
        sizes[4] = id_bytes
        sizes[5] = (ng + 1) * 3 * C_BITMAP_BYTES  # + the all-zero set for "no group"
        sizes[6] = ng + 1
        sizes[7] = self.n_holidays * sizeof(int)
        for i in range(8):
            need += (sizes[i] + 63) & ~(<unsigned long long>63)
        if need > SIZE_MAX // 2:
            raise MemoryError(f"fastpath.Table: {need} bytes is more than this machine can address")
        total = gate_table_size(<size_t>need)
        with nogil:  # tens of MB to zero for a big list: not while the gate thread waits
            p = gate_alloc_table(total)
            if p != NULL:
                memset(p, 0, total)
        if p == NULL:
            raise MemoryError(f"fastpath.Table: cannot allocate {total} bytes for the card table")
        self.arena = p
        self.arena_size = total
        base = <char*>p
        self.slots = <Card*>base
        base += _aligned(sizes[0])
        self.validity = <Validity*>base
        base += _aligned(sizes[1])
        self.guest_uses = <int*>base
        base += _aligned(sizes[2])
        self.id_off = <unsigned int*>base
        base += _aligned(sizes[3])
        self.id_blob = base
        base += _aligned(sizes[4])
        self.bitmaps = <unsigned char*>base
        base += _aligned(sizes[5])
        self.holiday_open = <unsigned char*>base
        base += _aligned(sizes[6])
        self.holidays = <int*>base

    def __init__(self, columns):
        if self.built:
            raise TypeError("a fastpath Table is immutable; build a new one")
        # Typed arrays and lengths, checked by the same code as the pure twin (no copies:
        # arrays and memoryviews, e.g. of a mapped list file, are read in place).
        c = _pure.normalised(columns, copy=False)
        cdef Py_ssize_t n = c["n_cards"], np = c["n_persons"], ng = c["n_groupsets"], i
        cdef bint by_person = c["by_person"]
        cdef const unsigned long long[::1] keys = c["card_keys"]
        cdef const int[::1] card_person = c["card_person"]
        cdef const unsigned char[::1] card_flags = c["card_flags"]
        cdef const unsigned long long[::1] card_off = c["person_card_off"]
        cdef const unsigned long long[::1] pkeys = c["person_card_keys"]
        cdef const unsigned long long[::1] blocked = c["blocked_keys"]
        cdef const unsigned long long[::1] id_off = c["person_id_off"]
        cdef const unsigned char[::1] id_blob = c["person_id_blob"]
        cdef const long long[::1] p_from = c["person_from"]
        cdef const long long[::1] p_until = c["person_until"]
        cdef const int[::1] p_gs = c["person_groupset"]
        cdef const unsigned char[::1] p_flags = c["person_flags"]
        cdef const int[::1] p_max_uses = c["person_max_uses"]
        cdef const int[::1] holidays = c["holidays"]
        cdef Py_ssize_t nh = holidays.shape[0], m = pkeys.shape[0], nb = blocked.shape[0]
        cdef Py_ssize_t bad = -1
        cdef unsigned long long id_total
        ids = c["person_ids"]  # a list of str, or None when the ids come as one blob

        # Per-entry checks in C without the GIL (a swap must not stall the gate thread),
        # in _pure.validated()'s order and with its messages.
        if by_person:
            with nogil:
                bad = _unsorted_u64(&card_off[0], np + 1, False)
            if bad >= 0:
                raise _pure.element_error("person_card_off", bad, card_off[bad], card_off[bad - 1])
            if nb:
                with nogil:
                    bad = _unsorted_u64(&blocked[0], nb, True)
                if bad >= 0:
                    raise _pure.element_error("blocked_keys", bad, blocked[bad], blocked[bad - 1])
        elif n:
            with nogil:
                bad = _unsorted_u64(&keys[0], n, True)
            if bad >= 0:
                raise _pure.element_error("card_keys", bad, keys[bad], keys[bad - 1])
        if nh:
            with nogil:
                bad = _unsorted_i32(&holidays[0], nh)
            if bad >= 0:
                raise _pure.element_error("holidays", bad, holidays[bad], holidays[bad - 1])
        if n and not by_person:
            with nogil:
                bad = _out_of_range_i32(&card_person[0], n, -1, np)
            if bad >= 0:
                raise _pure.element_error("card_person", bad, card_person[bad], np)
        if np:
            with nogil:
                bad = _out_of_range_i32(&p_gs[0], np, -1, ng)
            if bad >= 0:
                raise _pure.element_error("person_groupset", bad, p_gs[bad], ng)
            with nogil:
                bad = _out_of_range_i32(&p_max_uses[0], np, 0, 0x7FFFFFFF)
            if bad >= 0:
                raise _pure.element_error("person_max_uses", bad, p_max_uses[bad], 0)
        if ids is None:
            with nogil:
                bad = _unsorted_u64(&id_off[0], np + 1, False)
            if bad >= 0:
                raise _pure.element_error("person_id_off", bad, id_off[bad], id_off[bad - 1])
        if by_person:
            n = m + nb  # at most; blocked keys held by someone share that card's entry
        if n > MAX_PERSONS or np > MAX_PERSONS:
            raise ValueError(
                f"TableColumns hold {n} cards and {np} persons; a Table holds at most "
                f"{MAX_PERSONS} of each"
            )

        self.version = columns.version
        self.key_width = columns.key_width
        self.n_cards = n
        self.n_persons = np
        self.n_gs = ng
        self.n_holidays = nh
        # At most 3/4 full, and always one free slot so every probe ends.
        self.n_slots = <unsigned long long>(n + n // 3 + 1)
        id_total = self._ids_total(ids) if ids is not None else id_off[np]
        if id_total > 0xFFFFFFFF:
            raise ValueError(
                f"TableColumns person ids hold {id_total} bytes, more than 4 GiB; "
                "use shorter pseudonymous ids"
            )
        self._allocate(id_total)

        with nogil:
            for i in range(np):
                self.validity[i].valid_from = p_from[i]
                self.validity[i].valid_until = p_until[i]
                self.guest_uses[i] = p_max_uses[i] if p_flags[i] & C_PERSON_GUEST else -1
            if by_person:
                bad = self._fill_by_person(&card_off[0], &pkeys[0] if m else NULL,
                                           &blocked[0] if nb else NULL, nb,
                                           &p_gs[0] if np else NULL)
            elif n:
                self._fill_slots(&keys[0], &card_person[0], &card_flags[0],
                                 &p_gs[0] if np else NULL)
            if nh:
                memcpy(self.holidays, &holidays[0], nh * sizeof(int))
        if bad >= 0:
            raise ValueError(
                f"TableColumns.person_card_keys[{bad}] ({pkeys[bad]}) is held twice; "
                "a card belongs to one person (build the columns with agent.core.acl)"
            )
        self._copy_bitmaps(c["gs_entry"], c["gs_entry_holiday"], c["gs_exit"])
        if ids is not None:
            self._copy_ids(ids)
        else:
            with nogil:
                self._copy_id_blob(&id_off[0], &id_blob[0] if id_total else NULL)
        with nogil:
            self.n_sorted = self._sorted_prefix()
        self.built = True

    cdef void _put(self, unsigned long long k, int p, unsigned int flags,
                   const int* p_gs) noexcept nogil:
        """Store card k of person p (-1: nobody) in its free slot (k is not in the table)."""
        cdef unsigned long long slot = self._slot_of(k)
        cdef unsigned int info = SLOT_USED | <unsigned int>(p + 1) | flags
        cdef Card* card
        while self.slots[slot].info & SLOT_USED:
            slot += 1
            if slot == self.n_slots:
                slot = 0
        card = &self.slots[slot]
        card.groupset = <int>self.n_gs
        if p >= 0:
            card.groupset = p_gs[p] if p_gs[p] >= 0 else <int>self.n_gs
            if (self.guest_uses[p] < 0 and self.validity[p].valid_from == _codes_NO_START
                    and self.validity[p].valid_until == _codes_NO_END):
                info |= SLOT_PLAIN
        card.key = k
        card.info = info

    cdef void _fill_slots(self, const unsigned long long* keys, const int* card_person,
                          const unsigned char* card_flags, const int* p_gs) noexcept nogil:
        # Keys are known unique (checked sorted): no lookups before each store.
        cdef Py_ssize_t i
        for i in range(self.n_cards):
            self._put(keys[i], card_person[i],
                      SLOT_BLOCKED if card_flags[i] & C_CARD_BLOCKED else 0, p_gs)

    cdef Py_ssize_t _fill_by_person(self, const unsigned long long* card_off,
                                    const unsigned long long* pkeys,
                                    const unsigned long long* blocked, Py_ssize_t nb,
                                    const int* p_gs) noexcept nogil:
        """Cards listed by person, then blocked keys; the index of a key held twice, or -1.
        Sets n_cards: a blocked key someone holds flags that card, one nobody holds is
        an entry of its own."""
        cdef Py_ssize_t p, j, n = 0
        cdef Card* card
        for p in range(self.n_persons):
            for j in range(<Py_ssize_t>card_off[p], <Py_ssize_t>card_off[p + 1]):
                if self._find(pkeys[j]) != NULL:
                    return j
                self._put(pkeys[j], <int>p, 0, p_gs)
                n += 1
        for j in range(nb):
            card = self._find(blocked[j])
            if card != NULL:
                card.info |= SLOT_BLOCKED
            else:
                self._put(blocked[j], -1, SLOT_BLOCKED, p_gs)
                n += 1
        self.n_cards = n
        return -1

    cdef void _copy_id_blob(self, const unsigned long long* id_off,
                            const unsigned char* blob) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self.n_persons + 1):
            self.id_off[i] = <unsigned int>id_off[i]
        if id_off[self.n_persons]:
            memcpy(self.id_blob, blob, id_off[self.n_persons])

    cdef Py_ssize_t _sorted_prefix(self) noexcept nogil:
        """How many persons from the first are in ascending id order (person_index
        bisects them and scans the rest: the guests after the people of a list)."""
        cdef Py_ssize_t i
        for i in range(1, self.n_persons):
            if self._cmp_id(i - 1, self.id_blob + self.id_off[i],
                            self.id_off[i + 1] - self.id_off[i]) >= 0:
                return i
        return self.n_persons

    cdef inline int _cmp_id(self, Py_ssize_t i, const char* s, size_t n) noexcept nogil:
        """Person i's id against s[:n], as bytes (UTF-8 order is code point order)."""
        cdef size_t a = self.id_off[i + 1] - self.id_off[i]
        cdef int r = memcmp(self.id_blob + self.id_off[i], s, a if a < n else n)
        if r != 0:
            return r
        return (a > n) - (a < n)

    cdef _copy_bitmaps(self, list entry, list entry_holiday, list exit_):
        cdef Py_ssize_t ng = self.n_gs, g, b
        cdef const unsigned char[::1] bm
        cdef unsigned char* dst
        # Groupset ng stays all zero (the arena is zeroed): persons in no group.
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

    cdef unsigned long long _ids_total(self, ids) except? 0:
        # ASCII str data is read in place; a non-ASCII id gets its UTF-8 form
        # cached on the str. No per-person bytes object is made.
        cdef Py_ssize_t i, size
        cdef unsigned long long total = 0
        for i in range(self.n_persons):
            PyUnicode_AsUTF8AndSize(ids[i], &size)
            total += <unsigned long long>size
        return total

    cdef _copy_ids(self, ids):
        cdef Py_ssize_t np = self.n_persons, i, size
        cdef size_t total = 0
        cdef const char* data
        for i in range(np):
            data = PyUnicode_AsUTF8AndSize(ids[i], &size)
            self.id_off[i] = <unsigned int>total
            memcpy(self.id_blob + total, data, size)
            total += <size_t>size
        self.id_off[np] = <unsigned int>total

    # ---------------------------------------------------------------- C helpers

    cdef inline unsigned long long _slot_of(self, unsigned long long k) noexcept nogil:
        # Top 32 bits of the mixed key scaled to n_slots (< 2**32): no modulo.
        return ((_mix(k) >> 32) * self.n_slots) >> 32

    cdef inline Card* _find(self, unsigned long long k) noexcept nogil:
        """The card with key k, or NULL."""
        cdef unsigned long long slot = self._slot_of(k)
        cdef Card* card = self.slots + slot
        while card.info & SLOT_USED:
            if card.key == k:
                return card
            slot += 1
            if slot == self.n_slots:
                slot = 0
            card = self.slots + slot
        return NULL

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
        cdef Card* card
        if not _as_key(key, &k):
            return -1
        card = self._find(k)
        return <int>(card.info & SLOT_PERSON) - 1 if card != NULL else -1

    def is_blocked(self, key) -> bool:
        cdef unsigned long long k
        cdef Card* card
        if not _as_key(key, &k):
            return False
        card = self._find(k)
        return card != NULL and (card.info & SLOT_BLOCKED) != 0

    def person_id(self, Py_ssize_t index) -> str:
        self._check_index(index)
        return self._pid(index)

    def is_guest(self, Py_ssize_t index) -> bool:
        self._check_index(index)
        return self.guest_uses[index] >= 0

    def nbytes(self) -> int:
        """Memory held: the arena of C arrays plus the object itself."""
        return self.arena_size + object.__sizeof__(self)

    def person_index(self, person_id) -> int:
        """The index of the person with this id, -1 when the table has none.
        Bisects the persons in id order (the people of a list), then scans the rest."""
        cdef Py_ssize_t size, lo = 0, hi, mid, i
        cdef const char* s
        if not isinstance(person_id, str):
            raise TypeError(f"person_id must be a str, not {type(person_id).__name__}")
        s = PyUnicode_AsUTF8AndSize(person_id, &size)
        with nogil:
            hi = self.n_sorted
            while lo < hi:
                mid = (lo + hi) >> 1
                if self._cmp_id(mid, s, <size_t>size) < 0:
                    lo = mid + 1
                else:
                    hi = mid
            if not (lo < self.n_sorted and self._cmp_id(lo, s, <size_t>size) == 0):
                lo = -1
                for i in range(self.n_sorted, self.n_persons):
                    if self._cmp_id(i, s, <size_t>size) == 0:
                        lo = i
                        break
        return lo

    cdef const char* _id_bytes(self, Py_ssize_t i, Py_ssize_t* n) noexcept nogil:
        """Person i's UTF-8 id in the table (not NUL-terminated); its length in *n."""
        n[0] = self.id_off[i + 1] - self.id_off[i]
        return self.id_blob + self.id_off[i]


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
    cdef Card* card = NULL
    cdef int idx = -1, pos, warning = C_WARN_NONE, guest_uses = -1
    cdef bint blocked = False, plain
    cdef const Validity* valid = NULL
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
        card = table._find(k)
        if card != NULL:
            idx = <int>(card.info & SLOT_PERSON) - 1
            blocked = (card.info & SLOT_BLOCKED) != 0
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

    plain = (card.info & SLOT_PLAIN) != 0
    if not plain:  # only now read the person's own records
        guest_uses = table.guest_uses[idx]
        valid = &table.validity[idx]
    # A guest can always leave: no validity, schedule or anti-passback check on exit.
    if not (guest_uses >= 0 and direction == C_OUT):
        if plain:
            # Valid from NO_START until NO_END: only the last second of int64 is past it.
            if epoch_s == _codes_NO_END:
                return (C_EXPIRED, idx, C_WARN_NONE)
        else:
            if epoch_s < valid.valid_from:
                return (C_NOT_YET_VALID, idx, C_WARN_NONE)
            if epoch_s >= valid.valid_until:
                return (C_EXPIRED, idx, C_WARN_NONE)
            if guest_uses > 0 and state._uses.get(table._pid(idx), 0) >= guest_uses:
                return (C_EXPIRED, idx, C_WARN_NONE)

        bm = table.bitmaps + card.groupset * 3 * C_BITMAP_BYTES
        byte = <unsigned int>minute_of_week >> 3
        mask = 1 << (minute_of_week & 7)
        if direction == C_IN:
            if table.n_holidays and table._is_holiday(day):
                if not table.holiday_open[card.groupset]:
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
                if gate_sub_overflows(epoch_s, last, &diff):
                    refused = epoch_s < last
                else:
                    refused = diff < apb_window_s
                if refused:
                    return (C_ANTIPASSBACK, idx, C_WARN_NONE)

    if busy:
        return (C_GATE_BUSY, idx, C_WARN_NONE)
    return (C_GRANTED, idx, warning)
