"""The pure core: no threads, no clocks, no GPIO, no sockets.

Events and the current time go in; records and commands come out. Modules
here import only the standard library, ``fastpath`` and each other (a test
enforces it).
"""
