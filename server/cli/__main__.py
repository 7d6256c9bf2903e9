"""`python -m server.cli`: the same as `ptserve`."""

from server.cli import main

main()
