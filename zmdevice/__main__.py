from zmdevice.cli import main

main()
