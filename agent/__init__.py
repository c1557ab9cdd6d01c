"""gate-agent: the software beside a school turnstile."""

__version__ = "0.1.0"
CONTRACT_VERSION = 1
