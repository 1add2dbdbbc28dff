"""Tessera's benchmarks: ``python -m bench [--quick] [--only NAME]`` (``make bench``).

Every figure is printed next to a baseline measured in the same run on the same machine,
because an absolute number from a shared 2-core VM means little on its own; the ratio is
what the targets of SPEC section 7 are written against. See ``docs/performance.md``.
"""
