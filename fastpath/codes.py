"""Integer codes shared by both fastpath twins and the core.

The compiled twin repeats these numbers as C constants; a test checks that
the two agree. Names are the contract's words (docs/contract.md).
"""

# Directions. Reader "entry" and sensor PASS A are IN; "exit" and PASS B are OUT.
IN = 0
OUT = 1
DIRECTIONS = ("in", "out")

# Modes.
NORMAL = 0
ENTRY_ONLY = 1
FREE = 2
LOCKDOWN = 3
FIRE = 4
MODES = ("normal", "entry_only", "free", "lockdown", "fire")

# Anti-passback modes.
APB_OFF = 0
APB_SOFT = 1
APB_HARD = 2
APB_TIMED = 3
APB_MODES = ("off", "soft", "hard", "timed")

# Decision results: 0 is a grant, the rest are denial reasons, numbered in the
# order the checks run (docs/design.md#the-order-of-checks).
GRANTED = 0
LOCKDOWN_DENIED = 1
WRONG_DIRECTION = 2
BLOCKED = 3
UNKNOWN_CARD = 4
NOT_YET_VALID = 5
EXPIRED = 6
HOLIDAY = 7
OUTSIDE_SCHEDULE = 8
EXIT_RESTRICTED = 9
ANTIPASSBACK = 10
GATE_BUSY = 11
RESULTS = (
    "granted",
    "lockdown",
    "wrong_direction",
    "blocked",
    "unknown_card",
    "not_yet_valid",
    "expired",
    "holiday",
    "outside_schedule",
    "exit_restricted",
    "antipassback",
    "gate_busy",
)

# Warnings on a grant.
WARN_NONE = 0
WARN_ANTIPASSBACK = 1

# Anti-passback positions kept in GateState.
POS_UNKNOWN = 0
POS_IN = 1
POS_OUT = 2

# Card flags (TableColumns.card_flags) and person flags (person_flags).
CARD_BLOCKED = 1
PERSON_GUEST = 1

# Schedules: one bit per minute of the week, Monday 00:00 is bit 0.
MINUTES_PER_WEEK = 7 * 1440
BITMAP_BYTES = MINUTES_PER_WEEK // 8  # 1260

# Validity bounds when a person has none.
NO_START = -(2**63)
NO_END = 2**63 - 1
