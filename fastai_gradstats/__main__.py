"`python -m fastai_gradstats` is the `gradstats` command."
import sys

from .cli import main

sys.exit(main())
