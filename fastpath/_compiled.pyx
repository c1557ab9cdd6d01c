"""The compiled fastpath twin: card table and access decision in C arrays.

Same API and answers as fastpath/_pure.py (the reference; the property tests
compare the two). Written for the gate thread and for memory: 1,000,000 cards
must fit well within 64 MB, so nothing per card or per person is a Python
object. Cards are 16-byte records in an open-addressing hash table carrying
their owner's groupset; validity windows and guest limits are per-person
arrays read only for the people who have them; person ids are one UTF-8 blob
with offsets; schedules are one contiguous bitmap buffer. See Table.
GateState (anti-passback, guest uses) is a C hash table keyed by the person
id's bytes, which decide() reads in the table without making a str.

Some 1,450 lines on purpose: one extension module. ``decide`` reads the C
fields of ``Table`` and ``GateState`` (the card slots, validity, bitmaps,
the state's entries) directly, which across modules would take .pxd
declarations and a second extension to build and ship; and the file mirrors
fastpath/_pure.py part for part.
"""
cimport cython
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject
from cpython.number cimport PyNumber_Index
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches, PyErr_Occurred
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from cpython cimport array as carray
from libc.stdint cimport SIZE_MAX
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
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

    /* One spare arena: the last big table freed, kept for the next table of the same
       size (a list's next version: a delta's patch, a snapshot of the same size). Its
       pages are handed to the kernel with MADV_FREE, which takes them back only when
       memory runs short; otherwise the next table is written into memory that is
       already there instead of faulting 50 MB in (0.12 s for a million cards here).
       Used with the GIL held (a Table's dealloc and _allocate). */
    static void *gate_spare = NULL;
    static size_t gate_spare_size = 0;
    #define GATE_SPARE_MIN ((size_t)8 << 20)

    static void gate_free_table(void *p, size_t n) {
        if (p == NULL) return;
    #if defined(__linux__) && defined(MADV_FREE)
        if (n >= GATE_SPARE_MIN && madvise(p, n, MADV_FREE) == 0) {
            free(gate_spare);
            gate_spare = p;
            gate_spare_size = n;
            return;
        }
    #endif
        free(p);
    }

    static void *gate_take_spare(size_t n) {
        void *p = NULL;
        if (gate_spare != NULL && gate_spare_size == n) {
            p = gate_spare;
            gate_spare = NULL;
            gate_spare_size = 0;
        }
        return p;
    }

    static size_t gate_spare_bytes(void) { return gate_spare_size; }

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
    void gate_free_table(void* p, size_t n)
    void* gate_take_spare(size_t n)
    size_t gate_spare_bytes()
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

def _c_constants():
    """The C enum's numbers by their fastpath/codes.py names: tests/test_fastpath.py checks
    they agree (the twins export no constants: callers use fastpath.codes)."""
    return {
        "IN": C_IN,
        "OUT": C_OUT,
        "NORMAL": C_NORMAL,
        "ENTRY_ONLY": C_ENTRY_ONLY,
        "FREE": C_FREE,
        "LOCKDOWN": C_LOCKDOWN,
        "FIRE": C_FIRE,
        "APB_OFF": C_APB_OFF,
        "APB_SOFT": C_APB_SOFT,
        "APB_HARD": C_APB_HARD,
        "APB_TIMED": C_APB_TIMED,
        "GRANTED": C_GRANTED,
        "LOCKDOWN_DENIED": C_LOCKDOWN_DENIED,
        "WRONG_DIRECTION": C_WRONG_DIRECTION,
        "BLOCKED": C_BLOCKED,
        "UNKNOWN_CARD": C_UNKNOWN_CARD,
        "NOT_YET_VALID": C_NOT_YET_VALID,
        "EXPIRED": C_EXPIRED,
        "HOLIDAY": C_HOLIDAY,
        "OUTSIDE_SCHEDULE": C_OUTSIDE_SCHEDULE,
        "EXIT_RESTRICTED": C_EXIT_RESTRICTED,
        "ANTIPASSBACK": C_ANTIPASSBACK,
        "GATE_BUSY": C_GATE_BUSY,
        "WARN_NONE": C_WARN_NONE,
        "WARN_ANTIPASSBACK": C_WARN_ANTIPASSBACK,
        "POS_UNKNOWN": C_POS_UNKNOWN,
        "POS_IN": C_POS_IN,
        "POS_OUT": C_POS_OUT,
        "CARD_BLOCKED": C_CARD_BLOCKED,
        "PERSON_GUEST": C_PERSON_GUEST,
        "MINUTES_PER_WEEK": C_MINUTES_PER_WEEK,
        "BITMAP_BYTES": C_BITMAP_BYTES,
        "N_MODES": C_N_MODES,
        "N_APB_MODES": C_N_APB_MODES,
    }

__all__ = ["GateState", "Table", "decide", "sort_keys"]


cdef extern from "Python.h":
    # No exception clause: (unsigned long long)-1 with the error set.
    unsigned long long _as_ull "PyLong_AsUnsignedLongLong"(object v)


cdef inline int _as_key(object key, unsigned long long* out) except -1:
    """1 and the key in *out; 0 for an int outside 0..2**64-1 (no card has it)."""
    cdef unsigned long long k
    if not PyLong_CheckExact(key):
        key = PyNumber_Index(key)  # TypeError for a float, as in the pure twin
    k = _as_ull(key)  # C all the way: no Python try block on every read
    if k == <unsigned long long>-1 and PyErr_Occurred():
        if not PyErr_ExceptionMatches(OverflowError):
            return -1
        PyErr_Clear()  # negative or wider than 64 bits
        return 0
    out[0] = k
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
        gate_free_table(self.arena, self.arena_size)

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
        p = gate_take_spare(total)  # the last freed table's arena, when it has this size
        with nogil:  # tens of MB to zero for a big list: not while the gate thread waits
            if p == NULL:
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

    def __init__(self, columns, base=None, change=None):
        """The table of `columns`. With `base` (the table of the list these columns
        were changed from) and `change` (a fastpath.TableChange saying how), the card
        slots are the base's, copied without the GIL and patched for the changed
        persons only, instead of filled from every card; the base is only read.
        Falls back to a whole build when the base's slots have no room left."""
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
        # At most 3/4 full, and always one free slot so every probe ends; a little more
        # (1/32) so that deltas adding cards can patch this table's slots (see below).
        self.n_slots = <unsigned long long>(n + n // 3 + n // 32 + 1)
        cdef Table old = None
        if base is not None and change is not None and by_person:
            if not isinstance(base, Table):
                raise TypeError(f"Table base must be a compiled fastpath Table, not {type(base).__name__}")
            old = <Table>base
            if not old.built or n + n // 3 + 1 > <Py_ssize_t>old.n_slots:
                old = None  # no room left at 3/4: a whole build sizes the slots anew
            else:
                self.n_slots = old.n_slots
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
            if old is not None:
                bad = -2  # filled below, with the change's columns
            elif by_person:
                bad = self._fill_by_person(&card_off[0], &pkeys[0] if m else NULL,
                                           &blocked[0] if nb else NULL, nb,
                                           &p_gs[0] if np else NULL)
            elif n:
                self._fill_slots(&keys[0], &card_person[0], &card_flags[0],
                                 &p_gs[0] if np else NULL)
            if nh:
                memcpy(self.holidays, &holidays[0], nh * sizeof(int))
        if bad == -2:
            bad = self._patch_from(old, change, &card_off[0], &pkeys[0] if m else NULL,
                                   &blocked[0] if nb else NULL, nb, &p_gs[0] if np else NULL)
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

    cdef Py_ssize_t _patch_from(self, Table old, change, const unsigned long long* card_off,
                                const unsigned long long* pkeys,
                                const unsigned long long* blocked, Py_ssize_t nb,
                                const int* p_gs) except -3:
        """The base's slots copied and changed as `change` says (fastpath.TableChange);
        the index of a card key held twice, or -1. Every step runs without the GIL."""
        cdef const long long[::1] drop = change.drop
        cdef const long long[::1] add = change.add
        cdef const unsigned long long[::1] gone = change.gone_keys
        cdef const unsigned long long[::1] old_blocked = change.old_blocked
        cdef Py_ssize_t nd = drop.shape[0], na = add.shape[0], ngone = gone.shape[0]
        cdef Py_ssize_t nob = old_blocked.shape[0], i, j, a, d, q, bad = -1
        cdef Py_ssize_t old_np = old.n_persons, np = self.n_persons
        cdef long long n_cards = old.n_cards
        cdef int* remap = NULL
        cdef bint identity = True
        cdef int old_gs = <int>old.n_gs, new_gs = <int>self.n_gs
        cdef unsigned int info
        cdef Card* card
        if old_np - nd != np - na:
            raise ValueError(f"TableChange: the base has {old_np} persons and drops {nd}, the new "
                             f"columns have {np} and add {na}; they do not match")
        for i in range(nd):
            if drop[i] < 0 or drop[i] >= old_np or (i and drop[i] <= drop[i - 1]):
                raise ValueError("TableChange.drop must be ascending base person indices")
        for i in range(na):
            if add[i] < 0 or add[i] >= np or (i and add[i] <= add[i - 1]):
                raise ValueError("TableChange.add must be ascending new person indices")
        remap = <int*>malloc((old_np if old_np else 1) * sizeof(int))
        if remap == NULL:
            raise MemoryError("fastpath.Table: no memory for the person map of a patch")
        try:
            with nogil:
                memcpy(self.slots, old.slots, self.n_slots * sizeof(Card))
                # Old blocked flags off (a blocked key of nobody goes), the dropped
                # persons' cards out.
                for i in range(nob):
                    card = self._find(old_blocked[i])
                    if card != NULL:
                        if card.info & SLOT_PERSON:
                            card.info &= ~SLOT_BLOCKED
                        else:
                            self._delete(card - self.slots)
                            n_cards -= 1
                for i in range(ngone):
                    card = self._find(gone[i])
                    if card != NULL:
                        self._delete(card - self.slots)
                        n_cards -= 1
                # Base person index -> new index: kept persons keep their order.
                j = 0
                a = 0
                d = 0
                for i in range(old_np):
                    if d < nd and drop[d] == i:
                        remap[i] = -1
                        d += 1
                        continue
                    while a < na and add[a] == j:
                        a += 1
                        j += 1
                    remap[i] = <int>j
                    if j != i:
                        identity = False
                    j += 1
                if not identity or old_gs != new_gs:
                    for q in range(<Py_ssize_t>self.n_slots):
                        card = self.slots + q
                        info = card.info
                        if not (info & SLOT_USED):
                            continue
                        if card.groupset == old_gs:
                            card.groupset = new_gs  # "no group" is the set after the last
                        if info & SLOT_PERSON and not identity:
                            i = <Py_ssize_t>(info & SLOT_PERSON) - 1
                            card.info = (info & ~SLOT_PERSON) | <unsigned int>(remap[i] + 1)
                for a in range(na):
                    i = add[a]
                    for j in range(<Py_ssize_t>card_off[i], <Py_ssize_t>card_off[i + 1]):
                        if self._find(pkeys[j]) != NULL:
                            bad = j
                            break
                        self._put(pkeys[j], <int>i, 0, p_gs)
                        n_cards += 1
                    if bad >= 0:
                        break
                if bad < 0:
                    n_cards += self._mark_blocked(blocked, nb, p_gs)
        finally:
            free(remap)
        self.n_cards = <Py_ssize_t>n_cards
        return bad

    cdef void _delete(self, Py_ssize_t at) noexcept nogil:
        """Empty slot `at`; the cards probing past it move back (linear probing's
        deletion: no tombstones, every probe still ends at an empty slot)."""
        cdef unsigned long long i = <unsigned long long>at, j = i, h
        while True:
            j += 1
            if j == self.n_slots:
                j = 0
            if not (self.slots[j].info & SLOT_USED):
                break
            h = self._slot_of(self.slots[j].key)
            # The card at j stays when its home lies cyclically in (i, j].
            if (i < j and i < h and h <= j) or (i > j and (h > i or h <= j)):
                continue
            self.slots[i] = self.slots[j]
            i = j
        self.slots[i].key = 0
        self.slots[i].info = 0
        self.slots[i].groupset = 0

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
        for p in range(self.n_persons):
            for j in range(<Py_ssize_t>card_off[p], <Py_ssize_t>card_off[p + 1]):
                if self._find(pkeys[j]) != NULL:
                    return j
                self._put(pkeys[j], <int>p, 0, p_gs)
                n += 1
        self.n_cards = n + self._mark_blocked(blocked, nb, p_gs)
        return -1

    cdef Py_ssize_t _mark_blocked(self, const unsigned long long* blocked, Py_ssize_t nb,
                                  const int* p_gs) noexcept nogil:
        """Flag each blocked key's card; a key nobody holds gets an entry of its own.
        The number of entries added."""
        cdef Py_ssize_t j, added = 0
        cdef Card* card
        for j in range(nb):
            card = self._find(blocked[j])
            if card != NULL:
                card.info |= SLOT_BLOCKED
            else:
                self._put(blocked[j], -1, SLOT_BLOCKED, p_gs)
                added += 1
        return added

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



# --------------------------------------------------------------------------- gate state

cdef extern from *:
    """
    /* n bytes on a 64-byte boundary (a state entry per cache line); free() frees it. */
    static void *gate_alloc_lines(size_t n) {
    #if defined(__unix__) || defined(__APPLE__)
        void *p = NULL;
        return posix_memalign(&p, 64, n ? n : 1) == 0 ? p : NULL;
    #else
        return malloc(n ? n : 1);
    #endif
    }
    /* A dict with room for n items (CPython's, as Cython's own code uses it). */
    static PyObject *gate_dict_presized(Py_ssize_t n) {
    #if defined(PYPY_VERSION) || defined(Py_LIMITED_API)
        (void)n;
        return PyDict_New();
    #else
        return _PyDict_NewPresized(n);
    #endif
    }
    #if defined(__GNUC__) || defined(__clang__)
    #define gate_prefetch(p) __builtin_prefetch(p)
    #else
    #define gate_prefetch(p) ((void)(p))
    #endif
    """
    void* gate_alloc_lines(size_t n) nogil
    void gate_prefetch(const void* p) nogil
    # No exception clause: NULL with the error set (a str with lone surrogates).
    const char* _utf8_or_null "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t* n)
    dict gate_dict_presized(Py_ssize_t n)


cdef struct Entry:
    # One person of the gate state: 64 bytes, one cache line, so a look-up
    # that hits reads the id and every field at once.
    unsigned long long hash  # _hash_bytes of the id (& hash_mask)
    long long day  # local day (date ordinal) of the position
    long long last  # UTC epoch s of the last entry passage (E_LAST)
    long long uses  # guest entries spent (E_USES)
    unsigned int id_len
    unsigned char pos  # C_POS_IN / C_POS_OUT; C_POS_UNKNOWN: no position recorded
    unsigned char flags  # E_LAST | E_USES: which of last / uses were recorded
    unsigned short _pad
    char id[24]  # the id's UTF-8 bytes up to ID_INLINE of them, else a char* to a copy


cdef struct Slot:
    unsigned int entry  # entry index + 1; 0: a free slot
    unsigned int tag  # the entry's hash >> 32: most other ids differ here already


# The layout above is one cache line on 64- and 32-bit boards alike.
assert sizeof(Entry) == 64 and sizeof(Slot) == 8


cdef enum:
    E_LAST = 1
    E_USES = 2
    ID_INLINE = 24
    CHUNK_BITS = 10  # entries live in chunks of 1,024 (64 KiB): no big realloc, no move
    CHUNK = 1024
    FIRST_SLOTS = 64  # a power of two


cdef inline unsigned long long _hash_bytes(const char* p, Py_ssize_t n) noexcept nogil:
    # Eight bytes at a time (memcpy: any alignment), then _mix. Person ids come
    # from the signed access list, not from a card reader: no seed needed.
    cdef unsigned long long h = 0x9E3779B97F4A7C15ULL ^ (<unsigned long long>n * 0xff51afd7ed558ccdULL)
    cdef unsigned long long w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        h = (h ^ w) * 0x9E3779B97F4A7C15ULL
        h ^= h >> 29
        i += 8
    if i < n:
        w = 0
        memcpy(&w, p + i, <size_t>(n - i))
        h = (h ^ w) * 0x9E3779B97F4A7C15ULL
    return _mix(h)


cdef inline bint _same_bytes(const char* a, const char* b, size_t n) noexcept nogil:
    # memcmp(a, b, n) == 0 for the short ids of a list, inline: eight bytes a step.
    cdef unsigned long long x, y
    while n >= 8:
        memcpy(&x, a, 8)
        memcpy(&y, b, 8)
        if x != y:
            return False
        a += 8
        b += 8
        n -= 8
    while n:
        if a[0] != b[0]:
            return False
        a += 1
        b += 1
        n -= 1
    return True


cdef inline const char* _entry_id(const Entry* e) noexcept nogil:
    cdef const char* p
    if e.id_len <= ID_INLINE:
        return e.id
    memcpy(&p, e.id, sizeof(char*))
    return p


@cython.final
cdef class GateState:
    """Anti-passback positions and guest uses, keyed by person id (see _pure.GateState).

    In C, with no Python object per person: an open-addressing hash table
    (linear probing, at most 3/4 full, doubled when it would be fuller) of
    slots pointing at 64-byte entries, keyed by a 64-bit hash of the id's
    UTF-8 bytes and checked against the bytes themselves, so two ids with the
    same hash stay two people. decide() looks a person up by the id bytes in
    the table (Table._id_bytes) without making a str; being keyed by the id,
    the state needs no remapping when a new table replaces the old one.
    to_dict()/from_dict() keep the format of _pure.state_to_dict.
    """

    cdef Slot* slots
    cdef size_t n_slots  # a power of two
    cdef size_t n_entries
    cdef Entry** chunks  # n_chunks pointers; the first ceil(n_entries / CHUNK) are in use
    cdef size_t n_chunks
    cdef unsigned long long hash_mask  # all ones; tests narrow it to force collisions
    # _warm's guess of where a person's id bytes are: for the table last seen (only
    # compared, never dereferenced), its first id and average id length x 2**16.
    cdef const void* guess_table
    cdef const char* guess_first
    cdef unsigned long long guess_stride

    def __cinit__(self):
        self.hash_mask = ~(<unsigned long long>0)
        self.guess_table = NULL
        self.guess_first = NULL
        self.guess_stride = 0
        self.n_entries = 0
        self.chunks = NULL
        self.n_chunks = 0
        self.slots = <Slot*>calloc(FIRST_SLOTS, sizeof(Slot))
        if self.slots == NULL:
            raise MemoryError("fastpath.GateState: out of memory")
        self.n_slots = FIRST_SLOTS

    def __dealloc__(self):
        cdef size_t i
        cdef Entry* e
        cdef const char* p
        for i in range(self.n_entries):
            e = self._entry(i)
            if e.id_len > ID_INLINE:
                free(<void*>_entry_id(e))
        if self.chunks != NULL:
            for i in range((self.n_entries + CHUNK - 1) >> CHUNK_BITS):
                free(self.chunks[i])
        free(self.chunks)
        free(self.slots)

    # ---------------------------------------------------------------- C helpers

    cdef inline Entry* _entry(self, size_t i) noexcept nogil:
        return &self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]

    cdef inline Py_ssize_t _find(self, const char* p, Py_ssize_t n,
                                 unsigned long long h) noexcept nogil:
        """The index of the entry of the id p[:n] whose hash is h, or -1."""
        cdef size_t mask = self.n_slots - 1
        cdef size_t i = <size_t>h & mask
        cdef unsigned int tag = <unsigned int>(h >> 32)
        cdef Slot* s = self.slots + i
        cdef Entry* e
        while s.entry:
            if s.tag == tag:
                e = self._entry(s.entry - 1)
                if e.id_len == <size_t>n and _same_bytes(_entry_id(e), p, <size_t>n):
                    return s.entry - 1
            i = (i + 1) & mask
            s = self.slots + i
        return -1

    cdef inline Entry* _find_bytes(self, const char* p, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i = self._find(p, n, _hash_bytes(p, n) & self.hash_mask)
        return self._entry(i) if i >= 0 else NULL

    cdef void _place(self, size_t i, unsigned long long h) noexcept nogil:
        cdef size_t mask = self.n_slots - 1, j = <size_t>h & mask
        while self.slots[j].entry:
            j = (j + 1) & mask
        self.slots[j].entry = <unsigned int>(i + 1)
        self.slots[j].tag = <unsigned int>(h >> 32)

    cdef bint _rehash(self, size_t n_slots) noexcept nogil:
        """Every entry placed anew in n_slots slots; False (nothing changed) for no memory."""
        cdef Slot* slots
        cdef size_t i
        if n_slots > SIZE_MAX // (2 * sizeof(Slot)):
            return False
        slots = <Slot*>calloc(n_slots, sizeof(Slot))
        if slots == NULL:
            return False
        free(self.slots)
        self.slots = slots
        self.n_slots = n_slots
        for i in range(self.n_entries):
            self._place(i, self._entry(i).hash)
        return True

    cdef Py_ssize_t _add_index(self, const char* p, Py_ssize_t n) noexcept nogil:
        """The index of the entry of the id p[:n], made (empty) when there is none.

        -1 when there is no memory for it, -2 when the id or the count is too
        large for an entry; nothing changed then.
        """
        cdef unsigned long long h = _hash_bytes(p, n) & self.hash_mask
        cdef Py_ssize_t found = self._find(p, n, h)
        cdef size_t i = self.n_entries, c, cap
        cdef Entry** chunks
        cdef Entry* e
        cdef char* copy = NULL
        if found >= 0:
            return found
        if <unsigned long long>n > 0xFFFFFFFFULL or i >= 0xFFFFFFFEUL:
            return -2
        if (i + 1) * 4 > self.n_slots * 3 and not self._rehash(self.n_slots * 2):
            return -1
        if (i & (CHUNK - 1)) == 0:  # the last chunk is full (or there is none)
            c = i >> CHUNK_BITS
            if c == self.n_chunks:
                cap = self.n_chunks * 2 if self.n_chunks else 16
                chunks = <Entry**>realloc(self.chunks, cap * sizeof(Entry*))
                if chunks == NULL:
                    return -1
                self.chunks = chunks
                self.n_chunks = cap
            self.chunks[c] = <Entry*>gate_alloc_lines(CHUNK * sizeof(Entry))
            if self.chunks[c] == NULL:
                return -1
        if n > ID_INLINE:
            copy = <char*>malloc(<size_t>n)
            if copy == NULL:
                if (i & (CHUNK - 1)) == 0:  # nothing in the new chunk yet: give it back
                    free(self.chunks[i >> CHUNK_BITS])
                return -1
            memcpy(copy, p, <size_t>n)
        e = self._entry(i)
        memset(e, 0, sizeof(Entry))
        e.hash = h
        e.id_len = <unsigned int>n
        if copy != NULL:
            memcpy(e.id, &copy, sizeof(char*))
        else:
            memcpy(e.id, p, <size_t>n)
        self.n_entries = i + 1
        self._place(i, h)
        return <Py_ssize_t>i

    cdef Entry* _add(self, const char* p, Py_ssize_t n) except NULL:
        cdef Py_ssize_t i = self._add_index(p, n)
        if i == -2:
            raise ValueError(
                f"fastpath.GateState: a person id of {n} bytes or more than 2**32 persons; "
                "use the short pseudonymous ids of the access list"
            )
        if i < 0:
            raise MemoryError("fastpath.GateState: out of memory for another person")
        return self._entry(i)

    cdef inline void _warm(self, Table table, Py_ssize_t idx) noexcept nogil:
        """Start loading what _person(table, idx) will read (decide's other checks run meanwhile).

        The id's bytes sit behind its offset, two loads one after the other,
        each from main memory in a big table. Ids of one list mostly have one
        length ("p-0001f3a9"), so where person idx's bytes start is guessed
        from the average id length and fetched alongside the offset; a wrong
        guess costs one needless fetch, never a wrong answer.
        """
        cdef Py_ssize_t n, n_last
        cdef const char* first = table._id_bytes(0, &n)
        cdef const char* last
        cdef const char* guess
        if <void*>table != self.guess_table or first != self.guess_first:
            # Another table (or a new one where an old one was: then first differs,
            # or the guess is merely worse): its average id length, 16 bits of fraction.
            last = table._id_bytes(table.n_persons - 1, &n_last)
            self.guess_table = <void*>table
            self.guess_first = first
            self.guess_stride = (<unsigned long long>(last - first + n_last) << 16) // <unsigned long long>table.n_persons
        guess = first + <size_t>((<unsigned long long>idx * self.guess_stride) >> 16)
        gate_prefetch(guess)
        gate_prefetch(guess + 24)  # the id may cross into the next cache line
        gate_prefetch(table._id_bytes(idx, &n))

    cdef Entry* _person(self, Table table, Py_ssize_t idx) noexcept nogil:
        """The entry of the table's person idx, or NULL: no str is made."""
        cdef Py_ssize_t n
        cdef const char* p = table._id_bytes(idx, &n)
        return self._find_bytes(p, n)

    cdef Entry* _of(self, person_id, bint add) except? NULL:
        """The entry of a person id (a str); NULL for none (add: made when missing)."""
        cdef Py_ssize_t n
        cdef const char* p
        cdef bytes b
        if not isinstance(person_id, str):
            if add:
                raise TypeError(
                    f"person_id is {type(person_id).__name__}; use the person's id (a str)"
                )
            return NULL
        p = _utf8_or_null(person_id, &n)
        if p == NULL:
            # Lone surrogates (a damaged state file) have no UTF-8 form: keep them
            # as "surrogatepass" bytes, which no valid id of a table can equal.
            PyErr_Clear()
            b = (<str>person_id).encode("utf-8", "surrogatepass")
            return self._add(b, len(b)) if add else self._find_bytes(b, len(b))
        return self._add(p, n) if add else self._find_bytes(p, n)

    cdef str _id_str(self, const Entry* e):
        return PyUnicode_DecodeUTF8(_entry_id(e), e.id_len, "surrogatepass")

    def _narrow_hash(self, unsigned long long mask) -> None:
        """Tests only: keep only the hash bits in `mask` (0: every id collides)."""
        cdef size_t i
        cdef Entry* e
        self.hash_mask = mask
        for i in range(self.n_entries):
            e = self._entry(i)
            e.hash = _hash_bytes(_entry_id(e), e.id_len) & mask
        if not self._rehash(self.n_slots):
            raise MemoryError("fastpath.GateState: out of memory")

    # ---------------------------------------------------------------- Python API

    def record_passage(self, person_id, int direction, long long epoch_s, long long day,
                       bint guest) -> None:
        """A card passage happened: move the person; an entry spends a guest use."""
        cdef Entry* e
        if direction != C_IN and direction != C_OUT:
            _pure._check_direction(direction)  # raises
        e = self._of(person_id, True)
        e.day = day
        if direction == C_IN:
            e.pos = C_POS_IN
            e.last = epoch_s
            e.flags |= E_LAST
            if guest:
                if not e.flags & E_USES:
                    e.uses = 0
                    e.flags |= E_USES
                if e.uses < _codes_NO_END:  # int64, as the state file holds it
                    e.uses += 1
        else:
            e.pos = C_POS_OUT

    def forget_movements(self) -> None:
        """Every position and last entry forgotten, guest uses kept (as _pure)."""
        cdef size_t i
        cdef Entry* e
        for i in range(self.n_entries):
            e = self._entry(i)
            e.pos = C_POS_UNKNOWN
            e.last = 0
            e.flags &= ~E_LAST

    def position(self, person_id, long long day) -> int:
        """POS_IN / POS_OUT if set on `day`, else POS_UNKNOWN (a new day starts unknown)."""
        cdef Entry* e = self._of(person_id, False)
        if e == NULL or e.day != day:
            return C_POS_UNKNOWN
        return e.pos

    def last_entry(self, person_id) -> int:
        cdef Entry* e = self._of(person_id, False)
        return e.last if e != NULL and e.flags & E_LAST else 0

    def uses(self, person_id) -> int:
        cdef Entry* e = self._of(person_id, False)
        return e.uses if e != NULL and e.flags & E_USES else 0

    def to_dict(self) -> dict:
        """JSON-able snapshot for the state file (the layout of _pure.state_to_dict)."""
        cdef size_t i
        cdef Entry* e
        # Sized for every entry at once: no dict grows (and rehashes) a million times.
        cdef dict positions = gate_dict_presized(<Py_ssize_t>self.n_entries)
        cdef dict last_entry = gate_dict_presized(<Py_ssize_t>self.n_entries)
        cdef dict uses = {}
        cdef long long day = 0
        cdef object day_obj = 0
        for i in range(self.n_entries):
            e = self._entry(i)
            pid = self._id_str(e)
            if e.pos != C_POS_UNKNOWN:
                if e.day != day:  # most positions are of a few days: one int object each
                    day = e.day
                    day_obj = day
                positions[pid] = [e.pos, day_obj]
            if e.flags & E_LAST:
                last_entry[pid] = e.last
            if e.flags & E_USES:
                uses[pid] = e.uses
        return {
            "format": _pure.STATE_FORMAT,
            "positions": positions,
            "last_entry": last_entry,
            "uses": uses,
        }

    @classmethod
    def from_dict(cls, d) -> GateState:
        """The state saved by to_dict(); ValueError saying what is wrong."""
        position, last_entry, uses = _pure.state_from_dict(d)  # checked as in the pure twin
        cdef GateState state = cls()
        cdef Entry* e
        for pid, (pos, day) in position.items():
            e = state._of(pid, True)
            e.pos = pos
            e.day = day
        for pid, v in last_entry.items():
            e = state._of(pid, True)
            e.last = v
            e.flags |= E_LAST
        for pid, v in uses.items():
            e = state._of(pid, True)
            e.uses = v
            e.flags |= E_USES
        return state

    def __repr__(self) -> str:
        cdef size_t i, positions = 0, guests = 0
        for i in range(self.n_entries):
            positions += self._entry(i).pos != C_POS_UNKNOWN
            guests += (self._entry(i).flags & E_USES) != 0
        return f"<GateState positions={positions} guests={guests}>"


def _spare_arena_bytes() -> int:
    """Tests only: the size of the spare arena kept from the last big table freed (0: none)."""
    return gate_spare_bytes()


# --------------------------------------------------------------------------- decision


cdef object _decide(Table table, GateState state, key, direction, mode, epoch_s,
                    minute_of_week, day, busy, apb_mode, apb_window_s):
    """decide() itself, for both ways in (_decide_fastcall, _decide_def)."""
    cdef unsigned long long k = 0  # set by _as_key when have_key; 0 keeps gcc from warning
    cdef bint have_key = False, key_read = PyLong_CheckExact(key)
    if key_read:  # (any other key is read after the argument checks, as in the pure twin)
        have_key = _as_key(key, &k)
        if have_key:
            # Start fetching the card's slot (in a big table, from main memory) and
            # convert the other arguments meanwhile.
            gate_prefetch(table.slots + table._slot_of(k))
    cdef int c_direction = direction, c_mode = mode, c_minute = minute_of_week
    cdef int c_apb = apb_mode
    cdef long long c_epoch = epoch_s, c_day = day, c_window = apb_window_s
    cdef bint c_busy = busy
    cdef Card* card = NULL
    cdef int idx = -1, pos, warning = C_WARN_NONE, guest_uses = -1
    cdef bint blocked = False, plain
    cdef const Validity* valid = NULL
    cdef const unsigned char* bm
    cdef unsigned int byte
    cdef unsigned char mask
    cdef long long last, diff
    cdef bint refused
    cdef Entry* e = NULL
    cdef bint looked_up = False

    if (
        (c_direction != C_IN and c_direction != C_OUT)
        or c_mode < 0 or c_mode >= C_N_MODES
        or c_minute < 0 or c_minute >= C_MINUTES_PER_WEEK
        or c_apb < 0 or c_apb >= C_N_APB_MODES
    ):
        _pure.check_arguments(c_direction, c_mode, c_minute, c_apb)  # raises

    if not key_read:
        have_key = _as_key(key, &k)  # TypeError for a float, as in the pure twin
    if have_key:
        card = table._find(k)
        if card != NULL:
            idx = <int>(card.info & SLOT_PERSON) - 1
            blocked = (card.info & SLOT_BLOCKED) != 0
    if c_mode == C_FIRE:
        return (C_GRANTED, idx, C_WARN_NONE)  # recorded without a check: who evacuated
    if c_mode == C_LOCKDOWN:
        return (C_LOCKDOWN_DENIED, idx, C_WARN_NONE)
    if c_mode == C_ENTRY_ONLY and c_direction == C_OUT:
        return (C_WRONG_DIRECTION, idx, C_WARN_NONE)
    if blocked:
        return (C_BLOCKED, idx, C_WARN_NONE)
    if idx < 0:
        return (C_UNKNOWN_CARD, -1, C_WARN_NONE)

    if c_apb != C_APB_OFF:
        state._warm(table, idx)
    plain = (card.info & SLOT_PLAIN) != 0
    if not plain:  # only now read the person's own records
        guest_uses = table.guest_uses[idx]
        valid = &table.validity[idx]
    # A guest can always leave: no validity, schedule or anti-passback check on exit.
    if not (guest_uses >= 0 and c_direction == C_OUT):
        if plain:
            # Valid from NO_START until NO_END: only the last second of int64 is past it.
            if c_epoch == _codes_NO_END:
                return (C_EXPIRED, idx, C_WARN_NONE)
        else:
            if c_epoch < valid.valid_from:
                return (C_NOT_YET_VALID, idx, C_WARN_NONE)
            if c_epoch >= valid.valid_until:
                return (C_EXPIRED, idx, C_WARN_NONE)
            if guest_uses > 0:
                e = state._person(table, idx)
                looked_up = True
                if e != NULL and e.flags & E_USES and e.uses >= guest_uses:
                    return (C_EXPIRED, idx, C_WARN_NONE)

        bm = table.bitmaps + card.groupset * 3 * C_BITMAP_BYTES
        byte = <unsigned int>c_minute >> 3
        mask = 1 << (c_minute & 7)
        if c_direction == C_IN:
            if table.n_holidays and table._is_holiday(c_day):
                if not table.holiday_open[card.groupset]:
                    return (C_HOLIDAY, idx, C_WARN_NONE)
                if not (bm[C_BITMAP_BYTES + byte] & mask):
                    return (C_OUTSIDE_SCHEDULE, idx, C_WARN_NONE)
            elif not (bm[byte] & mask):
                return (C_OUTSIDE_SCHEDULE, idx, C_WARN_NONE)
        elif not (bm[2 * C_BITMAP_BYTES + byte] & mask):
            return (C_EXIT_RESTRICTED, idx, C_WARN_NONE)

        if c_apb == C_APB_SOFT or c_apb == C_APB_HARD:
            if not looked_up:
                e = state._person(table, idx)
            pos = e.pos if e != NULL and e.day == c_day else C_POS_UNKNOWN
            if (c_direction == C_IN and pos == C_POS_IN) or (c_direction == C_OUT and pos == C_POS_OUT):
                if c_apb == C_APB_HARD:
                    return (C_ANTIPASSBACK, idx, C_WARN_NONE)
                warning = C_WARN_ANTIPASSBACK
        elif c_apb == C_APB_TIMED and c_direction == C_IN:
            if not looked_up:
                e = state._person(table, idx)
            last = e.last if e != NULL and e.flags & E_LAST else 0
            if last:
                # epoch_s - last < apb_window_s, exactly as Python ints would say it: on
                # int64 overflow the true difference is beyond any window, with the
                # sign of epoch_s - last.
                if gate_sub_overflows(c_epoch, last, &diff):
                    refused = c_epoch < last
                else:
                    refused = diff < c_window
                if refused:
                    return (C_ANTIPASSBACK, idx, C_WARN_NONE)

    if c_busy:
        return (C_GATE_BUSY, idx, C_WARN_NONE)
    return (C_GRANTED, idx, warning)


def decide(Table table not None, GateState state not None, key, direction, mode, epoch_s,
           minute_of_week, day, busy, apb_mode, apb_window_s):
    """decide() called with keywords or the wrong arguments: Cython's checks and messages."""
    return _decide(table, state, key, direction, mode, epoch_s, minute_of_week, day, busy,
                   apb_mode, apb_window_s)


_decide_def = decide  # replaced as `decide` below by the METH_FASTCALL builtin


cdef extern from "Python.h":
    ctypedef struct PyMethodDef:
        const char* ml_name
        void* ml_meth
        int ml_flags
        const char* ml_doc
    int METH_FASTCALL
    int METH_KEYWORDS
    object PyCFunction_NewEx(PyMethodDef* ml, PyObject* self, object module)
    object PyObject_Vectorcall(object callable, PyObject* const* args, size_t nargsf,
                               PyObject* kwnames)


cdef object _decide_fastcall(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kwnames):
    # The gate calls decide() once per card with 11 positional arguments: they
    # reach _decide as they are, with no Cython argument tuple or keyword
    # parsing. Anything else (keywords, a wrong count or type) takes _decide_def.
    if (kwnames != NULL or nargs != 11 or not isinstance(<object>args[0], Table)
            or not isinstance(<object>args[1], GateState)):
        return PyObject_Vectorcall(_decide_def, args, <size_t>nargs, kwnames)
    return _decide(<Table>args[0], <GateState>args[1], <object>args[2], <object>args[3],
                   <object>args[4], <object>args[5], <object>args[6], <object>args[7],
                   <object>args[8], <object>args[9], <object>args[10])


cdef PyMethodDef _decide_method
_decide_method.ml_name = "decide"
_decide_method.ml_meth = <void*>_decide_fastcall
_decide_method.ml_flags = METH_FASTCALL | METH_KEYWORDS
_decide_method.ml_doc = (
    "decide(table, state, key, direction, mode, epoch_s, minute_of_week, day, busy, "
    "apb_mode, apb_window_s)\n--\n\n"
    "(result, person_index, warning) for one card read; same rules as _pure.decide."
)
decide = PyCFunction_NewEx(&_decide_method, NULL, __name__)


# --------------------------------------------------------------------------- sorting keys

cdef carray.array _KEYS_TEMPLATE = carray.array("Q")


cdef int _cmp_key(const void* a, const void* b) noexcept nogil:
    cdef unsigned long long x = (<const unsigned long long*>a)[0]
    cdef unsigned long long y = (<const unsigned long long*>b)[0]
    return (x > y) - (x < y)


def sort_keys(keys):
    """array("Q") of the keys in ascending order. The copy and the sort run without the
    interpreter lock: a million card keys checked for a new list never hold up the gate
    thread (the pure twin sorts under the lock)."""
    cdef const unsigned long long[::1] src = keys
    cdef Py_ssize_t n = src.shape[0]
    cdef carray.array out = carray.clone(_KEYS_TEMPLATE, n, zero=False)
    cdef unsigned long long* dst = out.data.as_ulonglongs
    if n:
        with nogil:
            memcpy(dst, &src[0], <size_t>n * sizeof(unsigned long long))
            qsort(dst, <size_t>n, sizeof(unsigned long long), _cmp_key)
    return out
