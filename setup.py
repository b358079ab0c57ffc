"""The one compiled part of the hub: the fan-out's socket writes
(hub/_writes.c).  Optional: where it does not build (no C compiler), pip
still installs the hub, which then takes its pure-Python path; the log says
so at start-up.  Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hub._writes",
            ["hub/_writes.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
        )
    ]
)
