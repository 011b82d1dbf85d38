import sys

from testkit.toyworld.sets import main

sys.exit(main())
