import sys

from embedjob.cli import main

sys.exit(main())
