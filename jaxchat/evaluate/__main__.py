import sys

from jaxchat.evaluate.run import main

sys.exit(main())
