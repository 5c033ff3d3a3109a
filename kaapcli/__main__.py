import sys

from kaapcli.cli.app import main

sys.exit(main())
