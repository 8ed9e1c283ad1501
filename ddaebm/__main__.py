from ddaebm.cli import main
import sys

sys.exit(main())
