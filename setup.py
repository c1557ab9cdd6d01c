"""Build the compiled fastpath twin with Cython, unless GATE_PUREPYTHON=1.

The pure twin (fastpath/_pure.py) is always installed; the selector module
(fastpath/__init__.py) picks the compiled one when it imports. The Cython
directives live here and only here (none in the .pyx), so every build of the
twin (make build, the Debian package, the arm64 root) compiles it the same way.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

ext_modules = []
if os.environ.get("GATE_PUREPYTHON", "") not in ("1", "true", "yes"):
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [Extension("fastpath._compiled", ["fastpath/_compiled.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )



class BuildPyWithCatalogs(build_py):
    """build_py that first compiles the message catalogues with Babel.

    Each agent/locale/<lang>/LC_MESSAGES/<domain>.po becomes the .mo beside
    it, before the package data is collected, so every way the package is
    built carries it: a wheel (install.sh's pip install, the Debian
    package's pip wheel) and an editable install (make build), where the
    package is read from the source tree. agent/i18n.py reads the .mo
    with the standard library's gettext; the .mo is not in git.

    A catalogue with an error stops the build, naming the file and line:
    what Babel cannot read (abort_invalid), what its checkers find, and a
    translation naming a {field} its msgid does not have (str.format would
    raise KeyError at run time). GNU msgfmt's stricter reading (a msgid
    given twice, an unclosed string) is a test (tests/test_i18n.py).
    SystemExit, as distutils reports its own errors: pip shows the message,
    and setuptools' editable build does not turn it into a warning as it
    does an exception from a customised build_py.
    """

    def run(self):
        self.compile_catalogs()
        super().run()

    def compile_catalogs(self):
        import io
        import re
        from datetime import UTC, datetime
        from pathlib import Path

        try:
            from babel.messages.mofile import write_mo
            from babel.messages.pofile import PoFileError, read_po
        except ImportError:
            raise SystemExit(
                "error: building gate-agent's message catalogues needs Babel: "
                "pip install Babel (pyproject.toml's [build-system] requires it)"
            ) from None
        for po in sorted(Path(__file__).resolve().parent.glob("agent/locale/*/LC_MESSAGES/*.po")):
            errors = []
            try:
                catalog = read_po(io.BytesIO(po.read_bytes()), locale=po.parent.parent.name, abort_invalid=True)
            except PoFileError as exc:  # its lineno counts from 0, its text ends "on <lineno>"
                reason = re.sub(r" on \d+$", "", str(exc))
                raise SystemExit(f"error: {po}:{exc.lineno + 1}: {reason}: {exc.line!r}; fix the .po syntax") from None
            except ValueError as exc:  # e.g. a bad Plural-Forms header
                raise SystemExit(f"error: {po}: {exc}; fix the .po") from None
            for message, problems in catalog.check():
                errors += [f"{po}:{message.lineno}: {problem}" for problem in problems]
            for message in catalog:
                if message.id and isinstance(message.string, str) and message.string:
                    extra = set(re.findall(r"{[^{}]*}", message.string)) - set(re.findall(r"{[^{}]*}", message.id))
                    if extra:
                        errors.append(f"{po}:{message.lineno}: the translation names {', '.join(sorted(extra))}, "
                                      "which its msgid does not: keep the msgid's {fields} as they are")
            if errors:
                raise SystemExit("error: message catalogue not compiled:\n  " + "\n  ".join(errors))
            # Babel dates the .mo's header "now" unless told: SOURCE_DATE_EPOCH, else a fixed date,
            # so one .po always compiles to the same bytes (reproducible packages).
            catalog.creation_date = datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), UTC)
            mo = po.with_suffix(".mo")
            tmp = mo.with_name(f".{mo.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as out:
                    write_mo(out, catalog)
                os.replace(tmp, mo)  # a reader never sees half a catalogue
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.announce(f"compiled {mo}: {len(catalog)} messages", level=2)


setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithCatalogs})
