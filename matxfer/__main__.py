import sys

from matxfer.cli import main

sys.exit(main())
