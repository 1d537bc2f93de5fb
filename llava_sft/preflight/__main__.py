import sys

from llava_sft.preflight.rehearse import main

sys.exit(main())
