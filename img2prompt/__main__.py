"""`python -m img2prompt` is the `img2prompt` command."""
import sys

from img2prompt.cli import main

sys.exit(main())
