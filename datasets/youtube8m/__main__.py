"""The YouTube-8M tools, run as ``python -m datasets.youtube8m``; see :func:`main`."""

import logging
import sys

from datasets.youtube8m import main

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sys.exit(main())
