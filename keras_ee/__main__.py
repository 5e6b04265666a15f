import sys

from keras_ee.cli import main

sys.exit(main())
