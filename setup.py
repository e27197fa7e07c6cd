"""Only the optional C part lives here (everything else is in pyproject.toml): the feature
capture's llama.cpp eval callback, built when a C compiler is present (pip builds
llama-cpp-python from source, so there is one); without it the engine uses the Python callback."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edge_metastone.engine._capture",
            ["edge_metastone/engine/_capture.c"],
            optional=True,
        )
    ]
)
