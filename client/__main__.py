"""`python -m gradserve.client` / `gradserve-client`."""

import sys

from gradserve.client._cli import main

if __name__ == "__main__":
    sys.exit(main())
