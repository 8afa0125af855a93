"""Build the optional compiled data path (``pyvduse._fastpath``); all metadata is in pyproject.toml.

The extension is optional: on a machine without a C compiler or Python's headers
``pip install .`` still succeeds and pyvduse serves through its pure-Python data path
(``pyvduse serve --datapath auto`` says so once at start).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pyvduse._fastpath",
            ["src/pyvduse/_fastpath.c"],
            depends=["src/pyvduse/fastpath_core.h", "src/pyvduse/fastpath_uring.h",
                     "src/pyvduse/fastpath_loop.h", "src/pyvduse/fastpath_nbd.h",
                     "src/pyvduse/fastpath_rbd.h", "src/pyvduse/fastpath_done.h"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit"],
            optional=True,
        )
    ]
)
