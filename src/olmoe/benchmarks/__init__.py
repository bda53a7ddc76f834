"""Benchmarks that ship with the package, so that `olmoe bench` runs from any installation.

`cpu_inference` (what `olmoe bench` runs) measures olmoe against its peers and the machine's
limits; `engines` loads and times each engine the same way. The peers, transformers and
llama.cpp, are no dependency of olmoe: install them with the `bench` extra
(pip install 'olmoe[bench]'); an engine whose package is missing is reported as not installed.
"""
