"""Triton kernels, one op per file, each with a pure-torch reference (`<op>_ref`) beside it."""
