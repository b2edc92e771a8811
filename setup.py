"""The one compiled part: the guardrails' prefilter (proxy/guardrails/_prefilter.c).

Optional: where no C compiler is found the package installs without it, and every text a
guardrail sees goes to the full detector (the same findings, more CPU). The test suite
requires it (tests/test_prefilter.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy.guardrails._prefilter",
            ["proxy/guardrails/_prefilter.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
