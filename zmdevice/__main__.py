"""``python -m zmdevice``: the same command line as the ``zmdevice`` script."""

from zmdevice.cli import main

main()
