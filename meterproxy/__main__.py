from meterproxy.cli import main

raise SystemExit(main())
