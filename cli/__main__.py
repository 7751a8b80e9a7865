from energybus.cli.app import main

main()
