"""`python -m gradserve.server` / `gradserve-server`."""

import os

# Back large CPU tensors (received payloads, activations, gradients) with transparent huge
# pages: first-touch page faults on a fresh 64 MiB buffer cost 26 ms with 4 KiB pages and
# 9 ms with huge pages here. PyTorch reads this once, at its first allocation, so it is set
# before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from gradserve.server.app import main  # noqa: E402

if __name__ == "__main__":
    main()
