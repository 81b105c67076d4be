"""`python -m gradserve.server` / `gradserve-server`."""

from gradserve.server.app import main

if __name__ == "__main__":
    main()
