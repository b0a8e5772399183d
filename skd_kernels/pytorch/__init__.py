"""The `torch` backend: each op's passes written in stock PyTorch ops, beside `triton/` and the
compiled backends (`compiled.py`). They run on any device, through the same op and autograd as the
other backends, and are the fallback when a compiled backend cannot be built. The specification
is `reference.py`, not these."""
