"""C++ CPU kernels, compiled on first use with torch.utils.cpp_extension (see trainer/optim.py)."""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
