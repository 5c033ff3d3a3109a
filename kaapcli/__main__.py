"""``kaapcli`` and ``python -m kaapcli``.  A shell-completion request is answered before click, typer or any
command module is imported (kaapcli/cli/complete.py); everything else is the app (kaapcli/cli/app.py)."""

import os
import sys

from kaapcli.cli.complete import COMPLETE_VAR


def main() -> int:
    if COMPLETE_VAR in os.environ:
        from kaapcli.cli.complete import respond

        return respond()
    from kaapcli.cli.app import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
