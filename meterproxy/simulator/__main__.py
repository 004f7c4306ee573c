from meterproxy.simulator.app import main

main()
