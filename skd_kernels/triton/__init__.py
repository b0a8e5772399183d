"""Triton kernels. Importing this package imports Triton; the ops import it only when the
`triton` backend is used."""
