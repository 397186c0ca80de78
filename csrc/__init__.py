"""C++ CPU kernel sources, compiled on first use with torch.utils.cpp_extension by kernels/ewc_adamw_cpp.py."""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
