from .cli import quantize_main

raise SystemExit(quantize_main())
