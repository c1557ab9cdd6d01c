"""Hardware adapters: gpiozero turnstile I/O, Wiegand over GPIO, board profiles.

Adapters only turn signals into core events (handed to a ``submit``
callable, normally ``GateRuntime.submit``) and commands into pin writes.
Every gpiozero device is built with the pin factory passed in (the mock
factory in tests and simulation, lgpio on a Pi), never the global default.
"""
